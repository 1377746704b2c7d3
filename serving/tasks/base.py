"""What a task handler is: the one place that knows what a model's tensors mean.

Why this seam: the data plane, the batcher, the backends and the transports are the
same for every kind of model. What differs per task is how an image becomes model
input (crops, or a letterbox), what must be remembered to undo that, what the outputs
mean (probabilities, boxes, masks) and how the answer looks on each API. A handler
holds exactly those four things, in the shape of KServe's ``Model``
(preprocess -> predict -> postprocess), so a new task is one module plus its
registration in serving/tasks/__init__.py.

A request runs like this (serving/dataplane.py)::

    options  = handler.parse_options(spec, params)           # validate request options
    prepared = [handler.prepare(bytes, spec, options, ...)]  # thread pool: decode + geometry
    outputs  = await batcher.submit(concat(p.inputs))        # the backend's named outputs
    result   = handler.postprocess(spec, options, prepared, outputs)

and a transport turns ``result`` into an imgserve.v1 message (``v1_response``) or
Open Inference Protocol tensors (``v2_outputs``).
"""
from __future__ import annotations

import abc
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from google.protobuf.message import Message

from serving.errors import InvalidInput
from serving.preprocess import DecodeOptions, decode, letterbox
from serving.repository import ModelSpec, RepositoryError

Outputs = dict[str, np.ndarray]
_LENGTH_PREFIX = struct.Struct("<I")


def serialize_bytes(elements: Sequence[bytes]) -> bytes:
    """Concatenate elements, each prefixed by its 4-byte little-endian length (v2 BYTES raw layout)."""
    return b"".join(part for item in elements for part in (_LENGTH_PREFIX.pack(len(item)), item))


@dataclass(frozen=True)
class Prepared:
    """One image made ready for the model: its input views and what undoes the geometry.

    inputs: uint8 [views, H, W, C], the rows the batcher sends (1 view, 10 crops, or an
        image and its mirror).
    geometry: whatever postprocess needs to map results back (a Letterbox, or None).
    """

    inputs: np.ndarray
    geometry: Any = None


@dataclass(frozen=True)
class TaskResult:
    """The answer to one request: which model answered and one entry per image."""

    model: str
    version: str
    tta: bool
    images: list[Any]


@dataclass(frozen=True)
class RequestedOutput:
    """One entry of a v2 request's ``outputs`` list; class_count > 0 asks for classification strings."""

    name: str
    class_count: int = 0
    binary: bool | None = None  # HTTP only: binary_data parameter (None: request default)


@dataclass(frozen=True)
class OutputTensor:
    """A v2 response tensor before wire encoding: a numeric ndarray, or BYTES as a list of byte strings."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    array: np.ndarray | None = None
    strings: list[bytes] | None = None
    binary: bool | None = None

    _LITTLE_ENDIAN: ClassVar[dict[str, str]] = {"FP32": "<f4", "FP16": "<f2", "INT32": "<i4", "INT64": "<i8",
                                                "UINT8": "u1", "BOOL": "?"}

    def raw(self) -> bytes:
        """The tensor in the v2 raw (binary) layout: little-endian, row-major; BYTES length-prefixed."""
        if self.datatype == "BYTES":
            return serialize_bytes(self.strings or [])
        assert self.array is not None
        return np.ascontiguousarray(self.array, dtype=self._LITTLE_ENDIAN[self.datatype]).tobytes()

    def json_data(self) -> list[Any]:
        """The tensor flattened row-major for the JSON ``data`` field."""
        if self.datatype == "BYTES":
            return [s.decode("utf-8", errors="replace") for s in (self.strings or [])]
        assert self.array is not None
        return np.asarray(self.array).reshape(-1).tolist()


@dataclass(frozen=True)
class OptionSpec:
    """One request option a task accepts: its name, kind and a line for error messages and docs."""

    name: str
    kind: type
    doc: str
    aliases: tuple[str, ...] = field(default=())


class TaskHandler(abc.ABC):
    """Preprocess, postprocess and wire shapes for one task (see the module docstring)."""

    task: ClassVar[str]
    #: the imgserve.v1 RPC serving this task, and its request message type
    v1_method: ClassVar[str]
    v1_request: ClassVar[type[Message]]
    #: request options (v1 fields with presence, v2 parameters, JSON body fields)
    options: ClassVar[tuple[OptionSpec, ...]]
    #: postprocessing does enough numpy work per image to belong in the thread pool
    postprocess_in_pool: ClassVar[bool] = False

    # ---- model checks

    @abc.abstractmethod
    def check_spec(self, spec: ModelSpec) -> None:
        """Raise RepositoryError when the model's outputs or geometry do not fit this task."""

    # ---- request options

    def raw_options(self, request: Message) -> dict[str, object]:
        """The options a v1 request sets (proto3 presence: unset fields are absent)."""
        return {opt.name: getattr(request, opt.name) for opt in self.options if request.HasField(opt.name)}

    def read_params(self, params: Mapping[str, object]) -> dict[str, object]:
        """This task's options out of v2 request parameters, type-checked; other keys are ignored."""
        found: dict[str, object] = {}
        for opt in self.options:
            for key in (opt.name, *opt.aliases):
                if key in params:
                    found[opt.name] = check_kind(key, params[key], opt.kind)
        return found

    @abc.abstractmethod
    def parse_options(self, spec: ModelSpec, raw: Mapping[str, object], defaults: "TaskDefaults") -> Any:
        """Validated, defaulted options for one request; InvalidInput names what is wrong."""

    @abc.abstractmethod
    def tta(self, options: Any) -> bool:
        """Whether test-time augmentation runs for these options (reported in responses)."""

    # ---- the request path

    @abc.abstractmethod
    def prepare(self, data: bytes, spec: ModelSpec, options: Any, *, index: int,
                decode: DecodeOptions) -> Prepared:
        """Decode one image and build its model input views (runs in the preprocessing pool)."""

    @abc.abstractmethod
    def postprocess(self, spec: ModelSpec, options: Any, prepared: Sequence[Prepared],
                    outputs: Outputs) -> list[Any]:
        """Per-image results from the backend outputs of all views (rows in ``prepared`` order)."""

    # ---- wire shapes

    @abc.abstractmethod
    def v1_response(self, result: TaskResult, spec: ModelSpec) -> Message:
        """The imgserve.v1 response message (the HTTP mirror uses its proto3 JSON mapping)."""

    @abc.abstractmethod
    def v2_outputs(self, result: TaskResult, spec: ModelSpec,
                   requested: Sequence[RequestedOutput]) -> list[OutputTensor]:
        """Open Inference Protocol output tensors; ``requested`` is empty when the client named none."""

    @abc.abstractmethod
    def v2_output_metadata(self, spec: ModelSpec) -> list[dict[str, Any]]:
        """The outputs the v2 model metadata lists: name, datatype and shape (-1 for free axes)."""


@dataclass(frozen=True)
class TaskDefaults:
    """Gateway-wide defaults a handler may need (from Settings)."""

    top_k: int = 5


# ---------------------------------------------------------------- small shared helpers

def check_kind(name: str, value: object, kind: type) -> object:
    """A request option of the declared kind (bool, int or float); InvalidInput otherwise."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise InvalidInput(f"parameter {name!r} must be a boolean, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise InvalidInput(f"parameter {name!r} must be an integer, got {value!r}")
        return int(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise InvalidInput(f"parameter {name!r} must be a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise InvalidInput(f"parameter {name!r} must be a finite number, got {value!r}")
        return float(value)
    raise TypeError(f"unsupported option kind {kind}")


def require_outputs(spec: ModelSpec, task: str, wanted: Mapping[str, tuple[str, int]]) -> None:
    """Check that ``spec`` has each output name with (datatype, rank without batch); RepositoryError if not."""
    have = {o.name: o for o in spec.outputs}
    for name, (datatype, rank) in wanted.items():
        out = have.get(name)
        if out is None:
            raise RepositoryError(f"model {spec.name!r}: a {task} model needs an output {name!r} "
                                  f"({datatype}, {rank} dims); it has {', '.join(have) or 'none'}")
        if out.datatype != datatype or len(out.dims) != rank:
            raise RepositoryError(f"model {spec.name!r}: output {name!r} must be {datatype} with {rank} dims "
                                  f"(without the batch axis), config.pbtxt says {out.datatype} {list(out.dims)}")


def reject_unknown_outputs(requested: Sequence[RequestedOutput], available: Sequence[str], model: str) -> None:
    seen: set[str] = set()
    for out in requested:
        if out.name not in available:
            raise InvalidInput(f"unknown output {out.name!r}: model {model!r} has outputs {', '.join(available)}")
        if out.name in seen:
            raise InvalidInput(f"output {out.name!r} is requested twice")
        seen.add(out.name)


def label_of(spec: ModelSpec, index: int) -> str:
    return spec.labels[index] if 0 <= index < len(spec.labels) else str(index)


def letterbox_views(data: bytes, spec: ModelSpec, mirrored: bool, *, index: int,
                    decode_options: DecodeOptions) -> Prepared:
    """Decode, letterbox to S x S, and add the mirrored canvas as a second view when asked.

    The canvas itself is mirrored (padding included), so a mirrored result maps back
    with x -> S - x exactly, whatever the padding.
    """
    pre = spec.preprocess
    # No JPEG draft (DCT downscaling) here: the letterbox record must hold the ORIGINAL size, since
    # boxes and masks are mapped back to it; a drafted decode would report half or a quarter of it.
    img = decode(data, channels=pre.channels, index=index, target=None, options=decode_options)
    try:
        canvas, geometry = letterbox(img, pre.crop)
    finally:
        img.close()
    if canvas.ndim == 2:
        canvas = canvas[:, :, None]
    views = np.stack([canvas, canvas[:, ::-1]]) if mirrored else canvas[None]
    return Prepared(np.ascontiguousarray(views), geometry)
