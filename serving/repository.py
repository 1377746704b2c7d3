"""The model repository format, defined once.

A repository is a Triton model repository. Each model directory holds
``config.pbtxt`` (Triton's ModelConfig in protobuf text format), a label file
and numbered version directories with ``model.onnx``. imgserve's preprocessing
facts travel inside ``config.pbtxt`` as ``parameters`` entries prefixed
``imgserve.``, so Triton ignores them and both backends can read them (the
embedded one from disk, the Triton one through Triton's model-config API).

This module is pure Python (protobuf + tritonclient's ModelConfig message):
``export/`` writes through it and ``serving/`` reads through it.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

CONFIG_FILE = "config.pbtxt"
LABELS_FILE = "labels.txt"
MODEL_FILE = "model.onnx"
PARAM_PREFIX = "imgserve."
ONNX_PLATFORM = "onnxruntime_onnx"
# The tasks the gateway ships handlers for (serving/tasks/); the schema itself accepts any
# task name, and serving.tasks refuses a model whose task has no handler.
TASKS = ("classification", "detection", "segmentation")
GEOMETRIES = ("crop", "letterbox")
# Wire datatype names (Triton / Open Inference Protocol) <-> ModelConfig enum <-> numpy dtype.
DATATYPES: dict[str, tuple[int, str]] = {
    "FP32": (mc.TYPE_FP32, "float32"),
    "FP16": (mc.TYPE_FP16, "float16"),
    "INT32": (mc.TYPE_INT32, "int32"),
    "INT64": (mc.TYPE_INT64, "int64"),
    "UINT8": (mc.TYPE_UINT8, "uint8"),
}
_DATATYPE_OF_ENUM = {enum: name for name, (enum, _) in DATATYPES.items()}


class RepositoryError(ValueError):
    """The repository on disk (or a config from Triton) does not follow the format."""


@dataclass(frozen=True)
class Preprocess:
    """How the gateway turns a decoded image into model input crops.

    geometry "crop" (classifiers): the shorter side is resized to ``resize`` (S), then
        centre-cropped to S x S; the model input is a crop x crop window (C) of that square.
    geometry "letterbox" (detectors, segmenters): the whole image is scaled to fit an
        S x S square (aspect kept) and padded; resize == crop == S. Nothing is cut off,
        so boxes and masks map back to every pixel of the original.
    channels: 1 (greyscale) or 3 (RGB).
    ten_crop_default: whether test-time augmentation is used when a request does not say.
    """

    resize: int
    crop: int
    channels: int = 3
    ten_crop_default: bool = False
    geometry: str = "crop"

    def __post_init__(self) -> None:
        if self.crop <= 0 or self.resize < self.crop:
            raise RepositoryError(f"need 0 < crop <= resize, got resize={self.resize} crop={self.crop}")
        if self.channels not in (1, 3):
            raise RepositoryError(f"channels must be 1 or 3, got {self.channels}")
        if self.geometry not in GEOMETRIES:
            raise RepositoryError(f"geometry must be one of {', '.join(GEOMETRIES)}, got {self.geometry!r}")
        if self.geometry == "letterbox" and self.resize != self.crop:
            raise RepositoryError(f"a letterbox model takes the whole S x S square: resize ({self.resize}) "
                                  f"must equal crop ({self.crop})")


@dataclass(frozen=True)
class TensorSpec:
    """One model output as the engine returns it: name, wire datatype and per-item dims (no batch axis)."""

    name: str
    datatype: str
    dims: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.datatype not in DATATYPES:
            raise RepositoryError(f"output {self.name!r}: datatype {self.datatype!r} is not one of "
                                  f"{', '.join(DATATYPES)}")
        object.__setattr__(self, "dims", tuple(int(d) for d in self.dims))

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(DATATYPES[self.datatype][1])


@dataclass(frozen=True)
class ModelSpec:
    """Everything the gateway needs to know to serve one model version."""

    name: str
    version: int
    preprocess: Preprocess
    labels: tuple[str, ...]
    task: str = "classification"
    max_batch_size: int = 32
    input_name: str = "image"
    output_name: str = "probabilities"
    max_queue_delay_us: int = 2000
    preferred_batch_sizes: tuple[int, ...] = ()
    gpu: bool = False
    instance_count: int = 1
    description: str = ""
    extra: dict[str, str] = field(default_factory=dict, compare=False)
    # Triton GPU execution accelerator: "" (none) or "tensorrt" (ONNX Runtime's TensorRT EP in
    # Triton, FP16 precision); only meaningful with gpu (KIND_GPU instances)
    accelerator: str = ""
    # The engine's outputs; empty means the classifier default: one FP32 [num_classes]
    # tensor named output_name. Detectors and segmenters list theirs (see serving/tasks/).
    outputs: tuple[TensorSpec, ...] = ()

    def __post_init__(self) -> None:
        if not self.outputs:
            object.__setattr__(self, "outputs", (TensorSpec(self.output_name, "FP32", (len(self.labels),)),))
        else:
            object.__setattr__(self, "outputs", tuple(self.outputs))
        names = [o.name for o in self.outputs]
        if len(set(names)) != len(names):
            raise RepositoryError(f"model {self.name!r}: output names repeat: {names}")

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.outputs)

    def output(self, name: str) -> TensorSpec:
        for out in self.outputs:
            if out.name == name:
                return out
        raise KeyError(name)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Per-item input dims (H, W, C) without the batch axis; dtype is uint8."""
        c = self.preprocess.crop
        return (c, c, self.preprocess.channels)


# ---------------------------------------------------------------- writing

def to_model_config(spec: ModelSpec) -> mc.ModelConfig:
    """Build the Triton ModelConfig for a spec (label_filename names the label file)."""
    cfg = mc.ModelConfig(name=spec.name, platform=ONNX_PLATFORM, max_batch_size=spec.max_batch_size)
    cfg.input.add(name=spec.input_name, data_type=mc.TYPE_UINT8, dims=list(spec.input_shape))
    for out in spec.outputs:
        entry = cfg.output.add(name=out.name, data_type=DATATYPES[out.datatype][0], dims=list(out.dims))
        if spec.task == "classification" and out.name == spec.output_name:
            entry.label_filename = LABELS_FILE  # Triton's classification extension reads it
    db = cfg.dynamic_batching
    db.max_queue_delay_microseconds = spec.max_queue_delay_us
    db.preferred_batch_size.extend(list(spec.preferred_batch_sizes))
    cfg.instance_group.add(count=spec.instance_count,
                           kind=mc.ModelInstanceGroup.KIND_GPU if spec.gpu else mc.ModelInstanceGroup.KIND_CPU)
    if spec.accelerator == TENSORRT:
        add_tensorrt(cfg)
    cfg.version_policy.latest.num_versions = 1
    warm = cfg.model_warmup.add(name="zeros", batch_size=1)
    warm.inputs[spec.input_name].CopyFrom(mc.ModelWarmup.Input(
        data_type=mc.TYPE_UINT8, dims=list(spec.input_shape), zero_data=True))
    p = spec.preprocess
    params = {
        "task": spec.task,
        "resize": str(p.resize),
        "crop": str(p.crop),
        "channels": str(p.channels),
        "ten_crop_default": "true" if p.ten_crop_default else "false",
        "geometry": p.geometry,
        "input_layout": "NHWC",
        **({"output": "softmax"} if spec.task == "classification" else {}),
        "description": spec.description,
        **{k: str(v) for k, v in spec.extra.items()},
    }
    for key, value in params.items():
        cfg.parameters[PARAM_PREFIX + key].string_value = value
    return cfg


TENSORRT = "tensorrt"
# What Triton's onnxruntime backend passes to the TensorRT execution provider (its docs'
# "TensorRT Optimization" example): FP16 kernels, a 1 GiB workspace for building engines.
TENSORRT_PARAMETERS = {"precision_mode": "FP16", "max_workspace_size_bytes": str(1 << 30)}


def add_tensorrt(cfg: mc.ModelConfig) -> None:
    """``optimization { execution_accelerators { gpu_execution_accelerator: [{ name: "tensorrt" ... }] } }``."""
    accelerator = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add(name=TENSORRT)
    for key, value in TENSORRT_PARAMETERS.items():
        accelerator.parameters[key] = value


def config_text(spec: ModelSpec) -> str:
    return text_format.MessageToString(to_model_config(spec))


def next_version(model_dir: Path) -> int:
    """The version number a new export gets: one above the highest present."""
    return max(list_versions(model_dir), default=0) + 1


def list_versions(model_dir: Path) -> list[int]:
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir()
                  if p.is_dir() and p.name.isdigit() and (p / MODEL_FILE).is_file())


def write_model(repo: Path, spec: ModelSpec, onnx_file: Path) -> Path:
    """Add ``onnx_file`` to the repository as a new version of ``spec.name``.

    Never overwrites a served version: the version is one above the highest
    present (``spec.version`` is ignored). Returns the new model.onnx path.
    """
    model_dir = Path(repo) / spec.name
    version = next_version(model_dir)
    vdir = model_dir / str(version)
    vdir.mkdir(parents=True, exist_ok=False)
    target = vdir / MODEL_FILE
    shutil.copyfile(onnx_file, target)
    (model_dir / LABELS_FILE).write_text("\n".join(spec.labels) + "\n")
    (model_dir / CONFIG_FILE).write_text(config_text(spec))
    return target


# ---------------------------------------------------------------- reading

def parse_config(text: str) -> mc.ModelConfig:
    try:
        return text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError as exc:
        raise RepositoryError(f"config.pbtxt does not parse: {exc}") from exc


def _param(cfg: mc.ModelConfig, key: str, default: str | None = None) -> str:
    entry = cfg.parameters.get(PARAM_PREFIX + key)
    if entry is None or entry.string_value == "":
        if default is None:
            raise RepositoryError(f"model {cfg.name!r}: config.pbtxt lacks parameter {PARAM_PREFIX}{key}")
        return default
    return entry.string_value


def _int_param(cfg: mc.ModelConfig, key: str) -> int:
    raw = _param(cfg, key)
    try:
        return int(raw)
    except ValueError as exc:
        raise RepositoryError(f"model {cfg.name!r}: {PARAM_PREFIX}{key}={raw!r} is not an integer") from exc


def spec_from_config(cfg: mc.ModelConfig, labels: list[str], version: int) -> ModelSpec:
    """Turn a ModelConfig (from disk or from Triton) plus its labels into a ModelSpec."""
    if len(cfg.input) != 1 or len(cfg.output) < 1:
        raise RepositoryError(f"model {cfg.name!r}: expected one input and at least one output")
    inp = cfg.input[0]
    if inp.data_type != mc.TYPE_UINT8:
        raise RepositoryError(f"model {cfg.name!r}: input must be TYPE_UINT8 NHWC")
    try:
        pre = Preprocess(
            resize=_int_param(cfg, "resize"),
            crop=_int_param(cfg, "crop"),
            channels=_int_param(cfg, "channels"),
            ten_crop_default=_param(cfg, "ten_crop_default", "false").lower() == "true",
            geometry=_param(cfg, "geometry", "crop"),
        )
    except RepositoryError as exc:
        raise RepositoryError(f"model {cfg.name!r}: {exc}") from None
    task = _param(cfg, "task", "classification")
    outputs = []
    for out in cfg.output:
        if out.data_type not in _DATATYPE_OF_ENUM:
            raise RepositoryError(f"model {cfg.name!r}: output {out.name!r} has datatype "
                                  f"{mc.DataType.Name(out.data_type)}; supported: {', '.join(DATATYPES)}")
        outputs.append(TensorSpec(out.name, _DATATYPE_OF_ENUM[out.data_type], tuple(out.dims)))
    if task == "classification":
        if len(cfg.output) != 1:
            raise RepositoryError(f"model {cfg.name!r}: a classifier has exactly one output")
        out = cfg.output[0]
        num_classes = int(out.dims[-1]) if out.dims else len(labels)
        if labels and len(labels) != num_classes:
            raise RepositoryError(f"model {cfg.name!r}: {len(labels)} labels for {num_classes} classes")
        if not labels:
            labels = [str(i) for i in range(num_classes)]
    known = {"task", "resize", "crop", "channels", "ten_crop_default", "description", "geometry"}
    extra = {k[len(PARAM_PREFIX):]: v.string_value for k, v in cfg.parameters.items()
             if k.startswith(PARAM_PREFIX) and k[len(PARAM_PREFIX):] not in known}
    gpu = any(g.kind == mc.ModelInstanceGroup.KIND_GPU for g in cfg.instance_group)
    accelerators = {a.name for a in cfg.optimization.execution_accelerators.gpu_execution_accelerator}
    return ModelSpec(
        name=cfg.name,
        version=version,
        preprocess=pre,
        labels=tuple(labels),
        task=task,
        max_batch_size=max(1, cfg.max_batch_size),
        input_name=inp.name,
        output_name=cfg.output[0].name,
        outputs=tuple(outputs),
        max_queue_delay_us=cfg.dynamic_batching.max_queue_delay_microseconds,
        preferred_batch_sizes=tuple(cfg.dynamic_batching.preferred_batch_size),
        gpu=gpu,
        instance_count=sum(g.count for g in cfg.instance_group) or 1,
        description=_param(cfg, "description", ""),
        extra=extra,
        accelerator=TENSORRT if TENSORRT in accelerators else "",
    )


def label_file_of(cfg: mc.ModelConfig) -> str:
    """The label file a config names (Triton's label_filename on an output), else labels.txt."""
    return next((out.label_filename for out in cfg.output if out.label_filename), LABELS_FILE)


def read_labels(path: Path) -> list[str]:
    if not path.is_file():
        return []
    return [line.rstrip("\n") for line in path.read_text().splitlines() if line.strip()]


@dataclass(frozen=True)
class LocalModel:
    """A model found on disk: its spec and the ONNX file of the served (latest) version."""

    spec: ModelSpec
    onnx_path: Path


def read_model(model_dir: Path) -> LocalModel:
    model_dir = Path(model_dir)
    cfg_path = model_dir / CONFIG_FILE
    if not cfg_path.is_file():
        raise RepositoryError(f"{model_dir}: no {CONFIG_FILE}")
    cfg = parse_config(cfg_path.read_text())
    if not cfg.name:
        cfg.name = model_dir.name
    if cfg.name != model_dir.name:
        raise RepositoryError(f"{cfg_path}: name {cfg.name!r} differs from directory {model_dir.name!r}")
    versions = list_versions(model_dir)
    if not versions:
        raise RepositoryError(f"{model_dir}: no version directory with {MODEL_FILE}")
    label_file = label_file_of(cfg)
    spec = spec_from_config(cfg, read_labels(model_dir / label_file), versions[-1])
    return LocalModel(spec=spec, onnx_path=model_dir / str(versions[-1]) / MODEL_FILE)


def scan_repository(repo: Path) -> dict[str, LocalModel]:
    """All models in a repository, by name. Directories without config.pbtxt are skipped."""
    repo = Path(repo)
    if not repo.is_dir():
        raise RepositoryError(f"model repository {repo} does not exist")
    found: dict[str, LocalModel] = {}
    for child in sorted(repo.iterdir()):
        if child.is_dir() and (child / CONFIG_FILE).is_file():
            found[child.name] = read_model(child)
    return found
