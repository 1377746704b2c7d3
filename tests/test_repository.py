"""The model-repository format (serving/repository.py): writing, versioning, round trips and refusals."""
from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from serving.tasks import check_servable
from serving.repository import (CONFIG_FILE, LABELS_FILE, MODEL_FILE, ModelSpec, Preprocess, RepositoryError,
                                config_text, list_versions, next_version, parse_config, read_model,
                                scan_repository, write_model)
from tests.requirements import require_module


def _spec(name: str = "digits", **kw) -> ModelSpec:
    base = dict(name=name, version=1, preprocess=Preprocess(resize=36, crop=32, channels=3, ten_crop_default=True),
                labels=("cat", "dog", "fish"), max_batch_size=16, max_queue_delay_us=750,
                preferred_batch_sizes=(4, 8), gpu=True, instance_count=2, description="a test model",
                extra={"architecture": "resnet18"})
    base.update(kw)
    return ModelSpec(**base)


@pytest.fixture
def onnx_file(tmp_path: Path) -> Path:
    # write_model copies bytes and never parses them; the content identifies which version is which.
    f = tmp_path / "first.onnx"
    f.write_bytes(b"version-one-bytes")
    return f


def test_write_model_lays_out_a_triton_model_directory(tmp_path: Path, onnx_file: Path) -> None:
    repo = tmp_path / "repo"
    target = write_model(repo, _spec(), onnx_file)
    assert target == repo / "digits" / "1" / MODEL_FILE and target.read_bytes() == b"version-one-bytes"
    assert (repo / "digits" / LABELS_FILE).read_text() == "cat\ndog\nfish\n"
    assert (repo / "digits" / CONFIG_FILE).is_file()


def test_write_model_bumps_versions_and_never_overwrites(tmp_path: Path, onnx_file: Path) -> None:
    repo = tmp_path / "repo"
    first = write_model(repo, _spec(version=7), onnx_file)  # spec.version is ignored on write
    second_file = tmp_path / "second.onnx"
    second_file.write_bytes(b"version-two-bytes")
    second = write_model(repo, _spec(version=1), second_file)
    assert first.parent.name == "1" and second.parent.name == "2"
    assert first.read_bytes() == b"version-one-bytes" and second.read_bytes() == b"version-two-bytes"
    assert list_versions(repo / "digits") == [1, 2] and next_version(repo / "digits") == 3
    # A version directory without model.onnx is not a version (and does not block numbering).
    (repo / "digits" / "9").mkdir()
    assert list_versions(repo / "digits") == [1, 2]
    local = read_model(repo / "digits")
    assert local.spec.version == 2 and local.onnx_path == second


def test_config_round_trips_through_disk(tmp_path: Path, onnx_file: Path) -> None:
    spec = _spec()
    write_model(tmp_path, spec, onnx_file)
    back = read_model(tmp_path / "digits").spec
    assert back == spec  # every compared field: preprocess, labels, batching, gpu, instances, names
    assert back.extra["architecture"] == "resnet18"
    assert back.extra["input_layout"] == "NHWC" and back.extra["output"] == "softmax"
    assert back.input_shape == (32, 32, 3) and back.num_classes == 3


def test_config_has_batching_instances_labels_and_warmup(tmp_path: Path, onnx_file: Path) -> None:
    write_model(tmp_path, _spec(), onnx_file)
    cfg = text_format.Parse((tmp_path / "digits" / CONFIG_FILE).read_text(), mc.ModelConfig())
    assert cfg.name == "digits" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 16
    assert cfg.input[0].name == "image" and cfg.input[0].data_type == mc.TYPE_UINT8
    assert list(cfg.input[0].dims) == [32, 32, 3]
    assert cfg.output[0].name == "probabilities" and cfg.output[0].data_type == mc.TYPE_FP32
    assert list(cfg.output[0].dims) == [3] and cfg.output[0].label_filename == LABELS_FILE
    assert cfg.HasField("dynamic_batching")
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 750
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8]
    assert [(g.count, g.kind) for g in cfg.instance_group] == [(2, mc.ModelInstanceGroup.KIND_GPU)]
    (warm,) = cfg.model_warmup
    assert warm.batch_size == 1 and warm.inputs["image"].zero_data
    assert warm.inputs["image"].data_type == mc.TYPE_UINT8 and list(warm.inputs["image"].dims) == [32, 32, 3]
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert params["imgserve.resize"] == "36" and params["imgserve.crop"] == "32"
    assert params["imgserve.channels"] == "3" and params["imgserve.ten_crop_default"] == "true"
    assert params["imgserve.task"] == "classification"
    cpu = text_format.Parse(config_text(_spec(gpu=False, instance_count=1)), mc.ModelConfig())
    assert [(g.count, g.kind) for g in cpu.instance_group] == [(1, mc.ModelInstanceGroup.KIND_CPU)]


def test_scan_repository_finds_models_and_skips_other_directories(tmp_path: Path, onnx_file: Path) -> None:
    write_model(tmp_path, _spec("b"), onnx_file)
    write_model(tmp_path, _spec("a", labels=("x", "y")), onnx_file)
    (tmp_path / "notes").mkdir()
    (tmp_path / "README.md").write_text("generated\n")
    found = scan_repository(tmp_path)
    assert list(found) == ["a", "b"] and found["a"].spec.labels == ("x", "y")
    with pytest.raises(RepositoryError, match="does not exist"):
        scan_repository(tmp_path / "nope")


def _write_broken(tmp_path: Path, onnx_file: Path, edit) -> Path:
    write_model(tmp_path, _spec(), onnx_file)
    cfg_path = tmp_path / "digits" / CONFIG_FILE
    cfg = parse_config(cfg_path.read_text())
    result = edit(cfg, tmp_path / "digits")
    cfg_path.write_text(result if isinstance(result, str) else text_format.MessageToString(cfg))
    return tmp_path / "digits"


def _drop_param(key: str):
    def edit(cfg: mc.ModelConfig, _d: Path) -> None:
        del cfg.parameters["imgserve." + key]
    return edit


def _set_param(key: str, value: str):
    def edit(cfg: mc.ModelConfig, _d: Path) -> None:
        cfg.parameters["imgserve." + key].string_value = value
    return edit


def _float_input(cfg: mc.ModelConfig, _d: Path) -> None:
    cfg.input[0].data_type = mc.TYPE_FP32


def _two_outputs(cfg: mc.ModelConfig, _d: Path) -> None:
    cfg.output.add(name="logits", data_type=mc.TYPE_FP32, dims=[3])


def _renamed(cfg: mc.ModelConfig, _d: Path) -> None:
    cfg.name = "other"


def _garbage(_cfg: mc.ModelConfig, _d: Path) -> str:
    return "name: \"digits\"\nthis is { not protobuf text"


def _unknown_field(_cfg: mc.ModelConfig, _d: Path) -> str:
    return 'name: "digits"\nno_such_field: 3\n'


def _too_few_labels(cfg: mc.ModelConfig, model_dir: Path) -> None:
    (model_dir / LABELS_FILE).write_text("cat\ndog\n")


def _no_versions(cfg: mc.ModelConfig, model_dir: Path) -> None:
    (model_dir / "1" / MODEL_FILE).unlink()


@pytest.mark.parametrize("edit, message", [
    (_garbage, "does not parse"),
    (_unknown_field, "does not parse"),
    (_drop_param("resize"), "imgserve.resize"),
    (_drop_param("crop"), "imgserve.crop"),
    (_set_param("crop", "big"), "not an integer"),
    (_set_param("crop", "64"), "crop <= resize"),
    (_set_param("channels", "2"), "channels"),
    (_set_param("task", "segmentation"), "segmenter uses the letterbox geometry"),
    (_set_param("task", "style"), "unknown task 'style'"),
    (_set_param("geometry", "stretch"), "geometry must be one of crop, letterbox"),
    (_float_input, "UINT8"),
    (_two_outputs, "a classifier has exactly one output"),
    (_renamed, "differs from directory"),
    (_too_few_labels, "2 labels for 3 classes"),
    (_no_versions, "no version directory"),
], ids=lambda v: getattr(v, "__name__", None) if callable(v) else None)
def test_broken_models_raise_repository_error(tmp_path: Path, onnx_file: Path, edit, message: str) -> None:
    """Refused when read (the format) or when checked against its task's handler (what backends do at load)."""
    model_dir = _write_broken(tmp_path, onnx_file, edit)
    with pytest.raises(RepositoryError, match=message):
        check_servable(read_model(model_dir).spec)
    with pytest.raises(RepositoryError):
        for local in scan_repository(tmp_path).values():
            check_servable(local.spec)


def test_missing_config_is_an_error_for_read_model(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(RepositoryError, match="no config.pbtxt"):
        read_model(tmp_path / "empty")
    assert scan_repository(tmp_path) == {}


def test_preprocess_validates_sizes() -> None:
    with pytest.raises(RepositoryError):
        Preprocess(resize=10, crop=20)
    with pytest.raises(RepositoryError):
        Preprocess(resize=10, crop=0)
    assert Preprocess(resize=20, crop=20, channels=1).channels == 1


# ------------------------------------------------------------------ imgserve build-repo

def test_build_repo_if_missing_leaves_a_filled_repository_alone(tmp_path: Path, onnx_file: Path, capsys) -> None:
    require_module("torch")
    from export.build_repo import main, repository_has_models

    repo = tmp_path / "repo"
    assert not repository_has_models(repo)
    write_model(repo, _spec(), onnx_file)
    assert repository_has_models(repo)
    assert main(["--model-repository", str(repo), "--if-missing", "--runs-dir", str(tmp_path / "runs")]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert list_versions(repo / "digits") == [1] and not (tmp_path / "runs").exists()


def test_publish_adds_new_versions_next_to_served_ones(tmp_path: Path, onnx_file: Path) -> None:
    require_module("torch")
    from export.build_repo import publish

    repo, staging = tmp_path / "repo", tmp_path / "staging"
    write_model(repo, _spec(), onnx_file)
    newer = tmp_path / "newer.onnx"
    newer.write_bytes(b"newer-bytes")
    write_model(staging, _spec(), newer)
    write_model(staging, _spec("fresh"), newer)
    assert publish(staging, repo) == [("digits", 2), ("fresh", 1)]
    assert (repo / "digits" / "1" / MODEL_FILE).read_bytes() == b"version-one-bytes"
    assert read_model(repo / "digits").onnx_path.read_bytes() == b"newer-bytes"


def test_a_failing_builder_leaves_the_repository_unchanged(tmp_path: Path, onnx_file: Path) -> None:
    require_module("torch")
    from export.build_repo import BuildContext, BuiltModel, DefaultModel, build_repository

    def good(ctx: BuildContext) -> BuiltModel:
        write_model(ctx.repo, _spec("good"), onnx_file)
        return BuiltModel(name="good", summary="ok")

    def bad(ctx: BuildContext) -> BuiltModel:
        raise RuntimeError("training diverged")

    repo = tmp_path / "repo"
    with pytest.raises(RuntimeError, match="diverged"):
        build_repository(repo, [DefaultModel("good", "", good), DefaultModel("bad", "", bad)],
                         runs_dir=tmp_path / "runs", progress=False)
    assert not (repo.exists() and any(repo.iterdir()))
    assert [p.name for p in tmp_path.iterdir() if "staging" in p.name] == []
    built = build_repository(repo, [DefaultModel("good", "", good)], runs_dir=tmp_path / "runs", progress=False)
    assert [(b.name, v) for b, v in built] == [("good", 1)] and list(scan_repository(repo)) == ["good"]


def test_build_commands_carry_the_recipe_switches_and_the_precision_override(tmp_path: Path) -> None:
    require_module("torch")
    from export.build_repo import SCENE_RECIPES, SHAPES_RECIPES, BuildContext, train_argv
    from export.recipes import common, load_task
    from export.train import parse_args

    ctx = BuildContext(repo=tmp_path / "repo", runs_dir=tmp_path / "runs")
    argv = train_argv(SHAPES_RECIPES["densenet_cifar"].options, ctx, tmp_path / "data", tmp_path / "run", "d")
    args = parse_args(argv)
    assert (args.amp, args.channels_last) == ("auto", True)  # "true" became a switch, not a value
    float32 = BuildContext(repo=tmp_path / "repo", runs_dir=tmp_path / "runs", amp="off")
    assert parse_args(train_argv(SHAPES_RECIPES["resnet20"].options, float32, tmp_path, tmp_path, "r")).amp == "off"
    recipe = SCENE_RECIPES["unet_scenes"]
    dense = common.parse_args(load_task(recipe.options["task"]),
                              train_argv(recipe.options, float32, tmp_path, tmp_path / "u", "u"))
    assert (dense.amp, dense.channels_last) == ("off", True)
    assert train_argv({"channels-last": "false"}, ctx, tmp_path, tmp_path, "x")[0] == "--no-channels-last"


@pytest.mark.slow
def test_build_repo_command_trains_and_exports_lenet(tmp_path: Path, capsys) -> None:
    require_module("torch")
    from clients.cli import main as imgserve

    repo, runs = tmp_path / "model_repository", tmp_path / "runs"
    # The full default build is the session's default_repository fixture; here the CLI path, with --only.
    rc = imgserve(["build-repo", "--model-repository", str(repo), "--runs-dir", str(runs), "--epochs", "2",
                   "--quiet", "--only", "lenet5"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "lenet5 v1: test accuracy" in out and str(runs / "lenet5") in out
    accuracy = float(out.split("test accuracy ")[1].split()[0])
    assert accuracy > 0.8  # two epochs are plenty to leave chance (0.1) far behind
    assert set(scan_repository(repo)) == {"lenet5"}
    local = scan_repository(repo)["lenet5"]
    assert local.spec.input_shape == (28, 28, 1) and local.spec.labels == tuple(str(i) for i in range(10))
    assert (runs / "lenet5" / "metrics.png").is_file() and (runs / "lenet5" / "metrics.json").is_file()
