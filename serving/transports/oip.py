"""Open Inference Protocol (KServe v2) semantics shared by the gRPC and HTTP transports.

The gateway exposes every model as a v2 model with one input, encoded images:

* input ``image``: BYTES, shape ``[N]`` (or ``[N, 1]``) -- one encoded image (PNG, JPEG, ...) per element;
* outputs: what the model's task handler (serving/tasks/) defines. A classifier answers
  ``probabilities`` FP32 ``[N, K]`` (or, with the classification extension, BYTES
  ``[N, k]`` strings ``"score:index:label"`` like Triton); a detector the four
  EfficientNMS-style tensors with boxes in original-image pixels; a segmenter ``labels``
  UINT8 ``[N, H, W]`` at the original image size.

Request parameters carry the task's options (``ten_crop``, ``top_k``, ``score_threshold``,
``max_detections``, ``tta``); ``timeout`` (int, microseconds, as tritonclient sends it)
tightens the server-side deadline.
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
from serving.repository import DATATYPES, LABELS_FILE, ModelSpec, to_model_config
from serving.tasks import handler_for
from serving.tasks.base import OutputTensor, RequestedOutput, reject_unknown_outputs, serialize_bytes
from serving.tasks.classification import V2_OUTPUT as OUTPUT_NAME

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


def check_version(status: ModelStatus, version: str) -> None:
    """A request may name the served version or none; any other version is NOT_FOUND."""
    if version and version != str(status.spec.version):
        raise ModelNotFound(f"model {status.spec.name!r} version {version} is not served "
                            f"(serving version {status.spec.version})")


async def infer(dataplane: DataPlane, model: str, version: str, images: Sequence[bytes], *,
                params: Mapping[str, object], outputs: Sequence[RequestedOutput],
                deadline: float | None) -> InferOutcome:
    """Run one v2 inference on the data plane; the model's task handler shapes the output tensors.

    ``params`` are the request's decoded parameters: the task reads its own options from them
    (``ten_crop`` and ``top_k`` for classifiers, ``score_threshold``, ``max_detections`` and ``tta``
    for detectors, ``tta`` for segmenters) and ignores the rest, as Triton does.
    """
    status = await dataplane.get_model(model)
    check_version(status, version)
    handler = handler_for(status.spec.task)
    # Requested output names are checked before any work is done: a typo costs no inference.
    reject_unknown_outputs(outputs, [entry["name"] for entry in handler.v2_output_metadata(status.spec)], model)
    for out in outputs:
        if out.class_count < 0 or (out.class_count and status.spec.task != "classification"):
            raise InvalidInput(f"output {out.name!r}: the classification extension needs a positive class "
                               f"count and a classification model ({model!r} is a {status.spec.task} model)")
    _, spec, result = await dataplane.run(model, images, options=handler.read_params(params), deadline=deadline)
    return InferOutcome(model=result.model, version=result.version,
                        outputs=handler.v2_outputs(result, spec, outputs))


# ---------------------------------------------------------------- metadata and config

def model_metadata(spec: ModelSpec) -> dict[str, Any]:
    """The v2 model-metadata document (HTTP JSON shape; the gRPC transport converts it)."""
    return {
        "name": spec.name,
        "versions": [str(spec.version)],
        "platform": PLATFORM,
        "inputs": [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}],
        "outputs": handler_for(spec.task).v2_output_metadata(spec),
        "parameters": {"task": spec.task},
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
    for entry in handler_for(spec.task).v2_output_metadata(spec):
        out = cfg.output.add(name=entry["name"], data_type=DATATYPES[entry["datatype"]][0],
                             dims=[int(d) for d in entry["shape"][1:]])
        if spec.task == "classification":
            out.label_filename = LABELS_FILE
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


def request_timeout(params: Mapping[str, object]) -> int | None:
    """The ``timeout`` parameter (microseconds) from already-decoded request parameters, if any."""
    return int_parameter("timeout", params["timeout"]) if "timeout" in params else None
