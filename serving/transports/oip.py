"""Open Inference Protocol (KServe v2) semantics shared by the gRPC and HTTP transports.

The gateway exposes every classifier as a v2 model with one input and one output:

* input ``image``: BYTES, shape ``[N]`` (or ``[N, 1]``) -- one encoded image (PNG, JPEG, ...) per element;
* output ``probabilities``: FP32 ``[N, K]`` softmax scores, or, with the classification
  extension (output parameter ``classification`` = k), BYTES ``[N, k]`` strings
  ``"score:index:label"`` best first, like Triton.

Request parameter ``ten_crop`` (bool) switches 10-crop test-time averaging; ``timeout``
(int, microseconds, as tritonclient sends it) tightens the server-side deadline.
This module holds the wire-independent part: tensor checks, the BYTES element codec,
running a request on the data plane and the metadata/config documents.
"""
from __future__ import annotations

import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from serving.dataplane import DataPlane, ModelStatus
from serving.errors import InvalidInput, ModelNotFound
from serving.repository import LABELS_FILE, ModelSpec, to_model_config

INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
PLATFORM = "imgserve"
SERVER_NAME = "imgserve"
# Extensions as the v2 server-metadata call lists them.
EXTENSIONS = ("classification", "model_configuration", "binary_tensor_data", "parameters")
_LEN = struct.Struct("<I")


def server_version() -> str:
    """The installed imgserve version (the v2 server metadata reports it)."""
    from clients.version import installed_version

    return installed_version()


# ---------------------------------------------------------------- BYTES codec

def serialize_bytes(elements: Sequence[bytes]) -> bytes:
    """Concatenate elements, each prefixed by its 4-byte little-endian length (v2 BYTES raw layout)."""
    parts: list[bytes] = []
    for item in elements:
        parts.append(_LEN.pack(len(item)))
        parts.append(item)
    return b"".join(parts)


def deserialize_bytes(buffer: bytes | memoryview) -> list[bytes]:
    """Split a v2 BYTES raw buffer into its elements; a malformed buffer is InvalidInput."""
    view = memoryview(buffer)
    out: list[bytes] = []
    offset = 0
    while offset < len(view):
        if offset + 4 > len(view):
            raise InvalidInput("BYTES tensor data is truncated: a 4-byte length prefix is cut off")
        (size,) = _LEN.unpack_from(view, offset)
        offset += 4
        if offset + size > len(view):
            raise InvalidInput(f"BYTES tensor data is truncated: element {len(out)} declares {size} bytes, "
                               f"{len(view) - offset} remain")
        out.append(bytes(view[offset:offset + size]))
        offset += size
    return out


# ---------------------------------------------------------------- requests

@dataclass(frozen=True)
class RequestedOutput:
    """One entry of a request's ``outputs`` list; class_count > 0 asks for classification strings."""

    name: str
    class_count: int = 0
    binary: bool | None = None  # HTTP only: binary_data parameter (None: request default)


@dataclass(frozen=True)
class OutputTensor:
    """A response tensor before wire encoding: FP32 ndarray, or BYTES as a list of byte strings."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    fp32: np.ndarray | None = None
    strings: list[bytes] | None = None
    binary: bool | None = None

    def raw(self) -> bytes:
        """The tensor in the v2 raw (binary) layout."""
        if self.datatype == "FP32":
            assert self.fp32 is not None
            return np.ascontiguousarray(self.fp32, dtype="<f4").tobytes()
        return serialize_bytes(self.strings or [])

    def json_data(self) -> list[float] | list[str]:
        """The tensor flattened row-major for the JSON ``data`` field."""
        if self.datatype == "FP32":
            assert self.fp32 is not None
            return [float(v) for v in self.fp32.reshape(-1)]
        return [s.decode("utf-8", errors="replace") for s in (self.strings or [])]


@dataclass(frozen=True)
class InferOutcome:
    model: str
    version: str
    outputs: list[OutputTensor]


def check_image_input(name: str, datatype: str, shape: Sequence[int]) -> int:
    """Validate the one input tensor's header; returns the number of images N."""
    if name != INPUT_NAME:
        raise InvalidInput(f"unexpected input {name!r}: the model takes one BYTES input named {INPUT_NAME!r}")
    if datatype != "BYTES":
        raise InvalidInput(f"input {INPUT_NAME!r} must be BYTES (one encoded image per element), not {datatype}")
    dims = [int(d) for d in shape]
    if not dims or len(dims) > 2 or any(d < 0 for d in dims) or (len(dims) == 2 and dims[1] != 1):
        raise InvalidInput(f"input {INPUT_NAME!r} must have shape [N] or [N, 1], got {dims}")
    if dims[0] == 0:
        raise InvalidInput("the request holds no images")
    return dims[0]


def deadline_from(grpc_deadline: float | None, timeout_us: int | None) -> float | None:
    """Combine a transport deadline with the v2 ``timeout`` parameter (microseconds); the earlier wins."""
    candidates = [d for d in (grpc_deadline,) if d is not None]
    if timeout_us is not None:
        if timeout_us < 0:
            raise InvalidInput("parameter 'timeout' must be >= 0 microseconds")
        if timeout_us > 0:
            candidates.append(time.monotonic() + timeout_us / 1e6)
    return min(candidates) if candidates else None


def classification_strings(probabilities: np.ndarray, labels: Sequence[str], k: int) -> list[bytes]:
    """Triton-style classification results, row-major [N, k]: "score:index:label", best first.

    Scores are printed as the shortest decimal that round-trips to the float32 value,
    so a client parsing them gets exactly the probability the FP32 output carries.
    """
    k = min(k, probabilities.shape[1])
    # stable sort on -p keeps the lower index first among equal scores
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    out: list[bytes] = []
    for row, idx in zip(probabilities, order):
        for i in idx:
            label = labels[i] if i < len(labels) else ""
            text = f"{str(np.float32(row[i]))}:{int(i)}" + (f":{label}" if label else "")
            out.append(text.encode("utf-8"))
    return out


def check_version(status: ModelStatus, version: str) -> None:
    """A request may name the served version or none; any other version is NOT_FOUND."""
    if version and version != str(status.spec.version):
        raise ModelNotFound(f"model {status.spec.name!r} version {version} is not served "
                            f"(serving version {status.spec.version})")


async def infer(dataplane: DataPlane, model: str, version: str, images: Sequence[bytes], *,
                ten_crop: bool | None, outputs: Sequence[RequestedOutput],
                deadline: float | None) -> InferOutcome:
    """Run one v2 inference: probabilities from the data plane, shaped into the requested outputs."""
    status = await dataplane.get_model(model)
    check_version(status, version)
    requested = list(outputs) or [RequestedOutput(OUTPUT_NAME)]
    seen: set[str] = set()
    for out in requested:
        if out.name != OUTPUT_NAME:
            raise InvalidInput(f"unknown output {out.name!r}: the model has one output named {OUTPUT_NAME!r}")
        if out.name in seen:
            raise InvalidInput(f"output {out.name!r} is requested twice")
        if out.class_count < 0:
            raise InvalidInput("classification class_count must be > 0")
        seen.add(out.name)
    result = await dataplane.probabilities(model, images, ten_crop=ten_crop, deadline=deadline)
    probs = np.asarray(result.probabilities, dtype=np.float32)
    tensors: list[OutputTensor] = []
    for out in requested:
        if out.class_count > 0:
            k = min(out.class_count, probs.shape[1])
            strings = classification_strings(probs, status.spec.labels, k)
            tensors.append(OutputTensor(out.name, "BYTES", (probs.shape[0], k), strings=strings, binary=out.binary))
        else:
            tensors.append(OutputTensor(out.name, "FP32", tuple(probs.shape), fp32=probs, binary=out.binary))
    return InferOutcome(model=result.model, version=str(result.version), outputs=tensors)


# ---------------------------------------------------------------- metadata and config

def model_metadata(spec: ModelSpec) -> dict[str, Any]:
    """The v2 model-metadata document (HTTP JSON shape; the gRPC transport converts it)."""
    return {
        "name": spec.name,
        "versions": [str(spec.version)],
        "platform": PLATFORM,
        "inputs": [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, spec.num_classes]}],
    }


def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": server_version(), "extensions": list(EXTENSIONS)}


def gateway_model_config(spec: ModelSpec, max_images_per_request: int) -> mc.ModelConfig:
    """The model as this gateway serves it, as a Triton ModelConfig.

    It starts from the repository config (so the ``imgserve.*`` preprocessing
    parameters, labels file and batching settings are all there) and replaces
    the tensor section with the gateway's view: one encoded image per batch item
    in, probabilities out; max_batch_size is the images a request may carry.
    """
    cfg = to_model_config(spec)
    cfg.platform = PLATFORM
    cfg.max_batch_size = max_images_per_request
    del cfg.input[:]
    del cfg.output[:]
    del cfg.model_warmup[:]
    cfg.input.add(name=INPUT_NAME, data_type=mc.TYPE_STRING, dims=[1], reshape=mc.ModelTensorReshape(shape=[]))
    cfg.output.add(name=OUTPUT_NAME, data_type=mc.TYPE_FP32, dims=[spec.num_classes], label_filename=LABELS_FILE)
    return cfg


def bool_parameter(name: str, value: object) -> bool:
    """A request parameter that must be a boolean (JSON true/false, or gRPC bool_param)."""
    if isinstance(value, bool):
        return value
    raise InvalidInput(f"parameter {name!r} must be a boolean")


def int_parameter(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"parameter {name!r} must be an integer")
    return value


def request_options(params: Mapping[str, object]) -> tuple[bool | None, int | None]:
    """(ten_crop, timeout_us) from already-decoded request parameters; others are ignored like Triton does."""
    ten_crop = bool_parameter("ten_crop", params["ten_crop"]) if "ten_crop" in params else None
    timeout = int_parameter("timeout", params["timeout"]) if "timeout" in params else None
    return ten_crop, timeout
