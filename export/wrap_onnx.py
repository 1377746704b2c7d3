"""``imgserve wrap-onnx``: put an existing ONNX classifier into the model repository format.

The gateway has no per-model code: it feeds every graph raw uint8 NHWC crops
(input ``image``, ``[N, C, C, channels]``) and expects softmax probabilities
back (output ``probabilities``, float32 ``[N, classes]``). Classifiers exported
elsewhere usually take float NCHW tensors normalized with some mean/std and
return logits. Rather than asking users to re-export, this command edits the
graph itself: it prepends Cast -> /255 -> (x - mean) / std -> Transpose and
appends Softmax, checks with ONNX Runtime that the wrapped graph equals
"preprocess in NumPy, run the original", and writes a new repository version.
No torch is needed.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.repository import (ModelSpec, Preprocess, RepositoryError, next_version, read_labels, write_model)

INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
LAYOUTS = ("NCHW", "NHWC")
OUTPUT_KINDS = ("logits", "probabilities")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PARITY_ATOL = 1e-4
_SOURCE_INPUT = "imgserve_source_input"
_SOURCE_OUTPUT = "imgserve_source_output"


class WrapError(ValueError):
    """The source graph cannot be served as asked; the message says why and what to pass."""


@dataclass(frozen=True)
class WrapOptions:
    """How the source graph wants its input, and what it returns.

    ``layout``: the source's input layout; ``mean``/``std``: per channel, on the 0-1 pixel
    scale (the graph computes ``(pixel / 255 - mean) / std``); ``output``: whether the source
    returns logits (a Softmax is appended) or probabilities already.
    """

    crop: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    layout: str = "NCHW"
    output: str = "logits"

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise WrapError(f"layout must be one of {LAYOUTS}, not {self.layout!r}")
        if self.output not in OUTPUT_KINDS:
            raise WrapError(f"output must be one of {OUTPUT_KINDS}, not {self.output!r}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise WrapError(f"need {self.channels} mean and std values (one per channel), "
                            f"got {len(self.mean)} and {len(self.std)}")
        if any(s <= 0 for s in self.std):
            raise WrapError(f"std values must be positive, got {self.std}")


@dataclass(frozen=True)
class WrapResult:
    path: Path               # the written model.onnx
    version: int
    num_classes: int
    parity_max_abs_diff: float


def _rename(graph: object, old: str, new: str) -> None:
    """Rename a tensor everywhere it is produced or consumed (subgraphs of If/Loop included)."""
    for node in graph.node:  # type: ignore[attr-defined]
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
        for attr in node.attribute:
            if attr.g is not None and len(attr.g.node):
                _rename(attr.g, old, new)
            for sub in attr.graphs:
                _rename(sub, old, new)


def _source_io(model: object, output_name: str | None) -> tuple[object, object]:
    """The source graph's one real input and the chosen output (ValueInfoProto each)."""
    graph = model.graph  # type: ignore[attr-defined]
    initializers = {init.name for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise WrapError(f"the graph has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
                        f"a classifier served by imgserve takes exactly one image tensor")
    outputs = list(graph.output)
    if output_name is not None:
        chosen = [o for o in outputs if o.name == output_name]
        if not chosen:
            raise WrapError(f"no output named {output_name!r}; the graph has {', '.join(o.name for o in outputs)}")
    elif len(outputs) != 1:
        raise WrapError(f"the graph has {len(outputs)} outputs ({', '.join(o.name for o in outputs)}); "
                        f"name the class scores with --output-name")
    else:
        chosen = outputs
    return inputs[0], chosen[0]


def _check_input(value_info: object, options: WrapOptions) -> None:
    import onnx

    tensor = value_info.type.tensor_type  # type: ignore[attr-defined]
    if tensor.elem_type != onnx.TensorProto.FLOAT:
        raise WrapError(f"input {value_info.name!r} is {onnx.TensorProto.DataType.Name(tensor.elem_type)}; "  # type: ignore[attr-defined]
                        f"wrap-onnx handles float32 inputs")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    if len(dims) != 4:
        raise WrapError(f"input {value_info.name!r} has rank {len(dims)}; an image classifier takes "  # type: ignore[attr-defined]
                        f"[N, C, H, W] or [N, H, W, C]")
    c_axis, h_axis, w_axis = (1, 2, 3) if options.layout == "NCHW" else (3, 1, 2)
    expected = {c_axis: options.channels, h_axis: options.crop, w_axis: options.crop}
    if any(dims[axis] is not None and dims[axis] != want for axis, want in expected.items()):
        def show(d: int | None) -> str:
            return "?" if d is None else str(d)
        raise WrapError(f"input {value_info.name!r} has shape {[show(d) for d in dims]}: read as {options.layout} "  # type: ignore[attr-defined]
                        f"that is {show(dims[h_axis])}x{show(dims[w_axis])} pixels with {show(dims[c_axis])} "
                        f"channels, not --crop {options.crop} and --channels {options.channels}; "
                        f"check --layout, --crop and --channels")


def wrap_graph(source: Path, options: WrapOptions, output_name: str | None = None) -> object:
    """The source ModelProto with preprocessing in front and a softmax behind (not yet checked for parity)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(source))
    graph = model.graph
    source_input, source_output = _source_io(model, output_name)
    _check_input(source_input, options)
    _rename(graph, source_input.name, _SOURCE_INPUT)
    _rename(graph, source_output.name, _SOURCE_OUTPUT)

    shape = [1, 1, 1, options.channels]  # broadcasts over the NHWC uint8 input
    graph.initializer.extend([
        numpy_helper.from_array(np.array(255.0, np.float32), "imgserve_255"),
        numpy_helper.from_array(np.array(options.mean, np.float32).reshape(shape), "imgserve_mean"),
        numpy_helper.from_array(np.array(options.std, np.float32).reshape(shape), "imgserve_std"),
    ])
    normalized = "imgserve_normalized" if options.layout == "NCHW" else _SOURCE_INPUT
    front = [
        helper.make_node("Cast", [INPUT_NAME], ["imgserve_float"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Div", ["imgserve_float", "imgserve_255"], ["imgserve_unit"]),
        helper.make_node("Sub", ["imgserve_unit", "imgserve_mean"], ["imgserve_centred"]),
        helper.make_node("Div", ["imgserve_centred", "imgserve_std"], [normalized]),
    ]
    if options.layout == "NCHW":
        front.append(helper.make_node("Transpose", [normalized], [_SOURCE_INPUT], perm=[0, 3, 1, 2]))
    back = ([helper.make_node("Softmax", [_SOURCE_OUTPUT], [OUTPUT_NAME], axis=1)] if options.output == "logits"
            else [helper.make_node("Identity", [_SOURCE_OUTPUT], [OUTPUT_NAME])])
    nodes = front + list(graph.node) + back
    del graph.node[:]
    graph.node.extend(nodes)

    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info(
        INPUT_NAME, onnx.TensorProto.UINT8, ["N", options.crop, options.crop, options.channels]))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(OUTPUT_NAME, onnx.TensorProto.FLOAT, ["N", None]))
    # shapes inferred for the old input/output names no longer hold
    kept = [v for v in graph.value_info if v.name not in (_SOURCE_INPUT, _SOURCE_OUTPUT)]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    onnx.checker.check_model(model)
    return model


def check_parity(source: Path, wrapped: Path, options: WrapOptions, output_name: str | None,
                 num_classes: int, seed: int = 0) -> float:
    """Max |wrapped - softmax(source(preprocessed))| over random crops; raises WrapError on a mismatch."""
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    crops = rng.integers(0, 256, size=(3, options.crop, options.crop, options.channels), dtype=np.uint8)
    x = (crops.astype(np.float32) / 255.0 - np.array(options.mean, np.float32)) / np.array(options.std, np.float32)
    if options.layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    providers = ["CPUExecutionProvider"]
    src = ort.InferenceSession(str(source), providers=providers)
    src_out = output_name or src.get_outputs()[0].name
    try:
        expected = src.run([src_out], {src.get_inputs()[0].name: np.ascontiguousarray(x)})[0]
    except Exception as exc:  # ORT's own exception types
        raise WrapError(f"the source graph does not run on a batch of 3 {options.layout} inputs "
                        f"(it needs a dynamic batch axis): {exc}") from exc
    if expected.ndim != 2 or expected.shape[1] != num_classes:
        raise WrapError(f"the source output {src_out!r} has shape {list(expected.shape)} for 3 images; "
                        f"expected [3, {num_classes}] (one score per label)")
    if options.output == "logits":
        shifted = np.exp(expected - expected.max(axis=1, keepdims=True))
        expected = shifted / shifted.sum(axis=1, keepdims=True)
    got = ort.InferenceSession(str(wrapped), providers=providers).run([OUTPUT_NAME], {INPUT_NAME: crops})[0]
    diff = float(np.max(np.abs(got - expected)))
    if not np.isfinite(diff) or diff > PARITY_ATOL:
        raise WrapError(f"wrapped graph differs from the source by {diff:.3g} (limit {PARITY_ATOL:g})")
    if options.output == "probabilities" and not np.allclose(got.sum(axis=1), 1.0, atol=1e-3):
        raise WrapError("--output probabilities, but the rows do not sum to 1: the graph returns logits "
                        "(drop --output probabilities)")
    return diff


def wrap_to_repository(source: Path, repo: Path, name: str, labels: Sequence[str], options: WrapOptions, *,
                       resize: int, ten_crop_default: bool = False, max_batch_size: int = 32,
                       output_name: str | None = None, description: str = "") -> WrapResult:
    """Wrap ``source`` and publish it as a new version of ``name`` in ``repo`` (nothing is written on failure)."""
    import onnx

    if not name or "/" in name or name.startswith("."):
        raise WrapError(f"invalid model name {name!r}")
    labels = tuple(labels)
    if not labels:
        raise WrapError("need at least one label")
    model = wrap_graph(source, options, output_name)
    with tempfile.TemporaryDirectory(prefix="imgserve-wrap-") as tmp:
        wrapped = Path(tmp) / "model.onnx"
        onnx.save(model, str(wrapped))
        diff = check_parity(source, wrapped, options, output_name, len(labels))
        spec = ModelSpec(
            name=name, version=next_version(repo / name),
            preprocess=Preprocess(resize=resize, crop=options.crop, channels=options.channels,
                                  ten_crop_default=ten_crop_default),
            labels=labels, max_batch_size=max_batch_size, input_name=INPUT_NAME, output_name=OUTPUT_NAME,
            description=description or f"{source.name}, wrapped ({len(labels)} classes)",
            extra={"source": source.name, "source_layout": options.layout})
        repo.mkdir(parents=True, exist_ok=True)
        target = write_model(repo, spec, wrapped)
    return WrapResult(path=target, version=int(target.parent.name), num_classes=len(labels),
                      parity_max_abs_diff=diff)


# ---------------------------------------------------------------- CLI

def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.5,0.5,0.5, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imgserve wrap-onnx", description=__doc__.split("\n\n")[0])
    p.add_argument("onnx", type=Path, help="the classifier to wrap (float input, logits or probabilities out)")
    p.add_argument("--name", required=True, help="model name in the repository")
    p.add_argument("--model-repository", type=Path, default=Path("model_repository"),
                   help="repository to write into (default model_repository)")
    p.add_argument("--labels", type=Path, required=True, help="class names, one per line, in output order")
    p.add_argument("--resize", type=int, required=True, help="S: the shorter image side is resized to S")
    p.add_argument("--crop", type=int, required=True, help="C: the graph sees C x C crops")
    p.add_argument("--channels", type=int, choices=(1, 3), default=3, help="1 greyscale, 3 RGB (default 3)")
    p.add_argument("--layout", choices=LAYOUTS, default="NCHW", help="the source's input layout (default NCHW)")
    p.add_argument("--mean", type=_floats, default=None,
                   help="per-channel mean on the 0-1 scale (default: ImageNet's for 3 channels, 0 for 1)")
    p.add_argument("--std", type=_floats, default=None,
                   help="per-channel std on the 0-1 scale (default: ImageNet's for 3 channels, 1 for 1)")
    p.add_argument("--output", choices=OUTPUT_KINDS, default="logits",
                   help="what the source returns (default logits: a Softmax is appended)")
    p.add_argument("--output-name", default=None, help="the class-score output, when the graph has several")
    p.add_argument("--ten-crop-default", action="store_true", help="10-crop TTA when a request does not say")
    p.add_argument("--max-batch-size", type=int, default=32, help="largest batch per backend call (default 32)")
    p.add_argument("--description", default="", help="shown by imgserve models / ListModels")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    default_mean, default_std = (IMAGENET_MEAN, IMAGENET_STD) if args.channels == 3 else ((0.0,), (1.0,))
    try:
        if not args.labels.is_file():
            raise WrapError(f"--labels {args.labels}: no such file")
        labels = read_labels(args.labels)
        options = WrapOptions(crop=args.crop, channels=args.channels, mean=args.mean or default_mean,
                              std=args.std or default_std, layout=args.layout, output=args.output)
        if args.resize < args.crop:
            raise WrapError(f"--resize ({args.resize}) must be >= --crop ({args.crop})")
        result = wrap_to_repository(args.onnx, args.model_repository, args.name, labels, options,
                                    resize=args.resize, ten_crop_default=args.ten_crop_default,
                                    max_batch_size=args.max_batch_size, output_name=args.output_name,
                                    description=args.description)
    except (WrapError, RepositoryError, OSError) as exc:
        print(f"imgserve wrap-onnx: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # onnx's checker and parser raise their own types
        if type(exc).__module__.startswith(("onnx", "google.protobuf")):
            print(f"imgserve wrap-onnx: {args.onnx} is not a usable ONNX model: {exc}", file=sys.stderr)
            return 2
        raise
    print(f"{args.name} v{result.version}: {result.path} ({result.num_classes} classes, "
          f"parity {result.parity_max_abs_diff:.1e}); restart the gateway to serve it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
