"""What both transports share: target parsing, request building, and the HTTP/JSON mapping.

The HTTP mirror carries the proto3 JSON mapping of the same imgserve.v1
messages, so both transports build and decode the same protobuf objects and
convert them to dataclasses in one place (clients.types).
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

from clients.proto.imgserve.v1 import imgserve_pb2 as pb
from clients.sdk.connection import ConnectionSecurity
from clients.sdk.errors import InternalError, InvalidArgument
from clients.sdk.retry import Retrier, RetryPolicy

Protocol = Literal["grpc", "http"]
PROTOCOLS: tuple[str, ...] = ("grpc", "http")
DEFAULT_GRPC_PORT = 8500
DEFAULT_MAX_MESSAGE_MB = 64  # the gateway's default send/receive limit
CLASSIFY_PATH = "/v1/classify"
MODELS_PATH = "/v1/models"
JSON_CONTENT_TYPE = "application/json"
# Seconds the gateway may spend on an HTTP request (HTTP has no deadline of its own, gRPC does).
TIMEOUT_HEADER = "X-Request-Timeout"

M = TypeVar("M", bound=Message)


@dataclass(frozen=True)
class Endpoint:
    """Where and how to reach a gateway: ``address`` is host:port (gRPC) or a base URL (HTTP)."""

    protocol: Protocol
    address: str

    def __str__(self) -> str:
        return self.address if self.protocol == "http" else f"{self.address} (grpc)"


def parse_target(target: str, protocol: str | None = None) -> Endpoint:
    """Resolve ``target`` and an optional ``protocol`` into an Endpoint.

    "host:port" means gRPC unless protocol="http"; "http(s)://host:port" means HTTP;
    a "grpc://" prefix is accepted and dropped. A bare host gets gRPC port 8500.
    """
    if not isinstance(target, str) or not target.strip():
        raise ValueError("server target must be a non-empty string such as 'localhost:8500'")
    target = target.strip()
    if protocol is not None and protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, not {protocol!r}")
    lowered = target.lower()
    if lowered.startswith(("http://", "https://")):
        if protocol == "grpc":
            raise ValueError(f"target {target!r} is an HTTP URL but protocol='grpc'; pass host:port for gRPC")
        return Endpoint("http", target.rstrip("/"))
    if lowered.startswith("grpc://"):
        if protocol == "http":
            raise ValueError(f"target {target!r} is a grpc:// address but protocol='http'")
        target, protocol = target[len("grpc://"):], "grpc"
    if protocol == "http":
        return Endpoint("http", "http://" + target.rstrip("/"))
    if ":" not in target:
        target = f"{target}:{DEFAULT_GRPC_PORT}"
    return Endpoint("grpc", target)


def grpc_channel_options(max_message_mb: int) -> list[tuple[str, int]]:
    limit = int(max_message_mb) * 1024 * 1024
    return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]


def classify_request(model: str, images: Sequence[bytes], top_k: int | None,
                     ten_crop: bool | None) -> pb.ClassifyRequest:
    """The request message; range checks (top_k <= 0, too many images) are the server's to make."""
    _check_model(model)
    req = pb.ClassifyRequest(model=model, images=images)
    if top_k is not None:
        req.top_k = _int32("top_k", top_k)
    if ten_crop is not None:
        req.ten_crop = bool(ten_crop)
    return req


# imgserve.v1 inference methods: HTTP path and response type (the gRPC stub method has the same name).
V1_METHODS: dict[str, tuple[str, type[Message]]] = {
    "Classify": (CLASSIFY_PATH, pb.ClassifyResponse),
    "Detect": ("/v1/detect", pb.DetectResponse),
    "Segment": ("/v1/segment", pb.SegmentResponse),
}


def _int32(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not -(2**31) <= value < 2**31:
        raise InvalidArgument(f"{name} must be a 32-bit integer, got {value!r}")
    return value


def _check_model(model: object) -> None:
    if not isinstance(model, str) or not model:
        raise InvalidArgument("model must be a non-empty string")


def detect_request(model: str, images: Sequence[bytes], score_threshold: float | None,
                   max_detections: int | None, tta: bool | None) -> pb.DetectRequest:
    """The Detect request; ranges (threshold in [0, 1], 1 <= max_detections <= K) are the server's to check."""
    _check_model(model)
    req = pb.DetectRequest(model=model, images=images)
    if score_threshold is not None:
        if isinstance(score_threshold, bool) or not isinstance(score_threshold, (int, float)):
            raise InvalidArgument(f"score_threshold must be a number, got {score_threshold!r}")
        req.score_threshold = float(score_threshold)
    if max_detections is not None:
        req.max_detections = _int32("max_detections", max_detections)
    if tta is not None:
        req.tta = bool(tta)
    return req


def segment_request(model: str, images: Sequence[bytes], tta: bool | None, rle: bool | None) -> pb.SegmentRequest:
    _check_model(model)
    req = pb.SegmentRequest(model=model, images=images)
    if tta is not None:
        req.tta = bool(tta)
    if rle is not None:
        req.rle = bool(rle)
    return req


def to_json(message: Message) -> bytes:
    """Compact proto3 JSON (bytes fields base64) for an HTTP body."""
    return json.dumps(json_format.MessageToDict(message), separators=(",", ":")).encode()


def from_json(body: bytes, message_type: type[M]) -> M:
    """Decode a proto3 JSON answer; unknown fields from a newer server are ignored."""
    try:
        return json_format.Parse(body.decode("utf-8"), message_type(), ignore_unknown_fields=True)
    except (json_format.ParseError, UnicodeDecodeError) as exc:
        snippet = body[:120].decode("utf-8", "replace")
        raise InternalError(f"server sent an unreadable {message_type.DESCRIPTOR.name}: {exc}; body starts {snippet!r}") from exc


def check_result_count(response: Any, n_images: int) -> None:
    """Results are matched to inputs by position, so a count mismatch must not pass silently."""
    if len(response.results) != n_images:
        raise InternalError(f"server returned {len(response.results)} results for {n_images} images")


def metadata_pairs(headers: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """gRPC metadata from user headers (gRPC requires lower-case keys)."""
    return tuple((str(k).lower(), str(v)) for k, v in headers.items())


class ClientState:
    """What ImageClient and AsyncImageClient share: the endpoint, the default timeout, closed-ness,
    the token/TLS options and the retry policy."""

    def __init__(self, target: str, protocol: str | None, timeout: float | None,
                 security: ConnectionSecurity | None = None, retries: RetryPolicy | int | None = None,
                 credentials: Any = None) -> None:
        self.endpoint = parse_target(target, protocol)
        self.timeout = timeout
        self.security = security or ConnectionSecurity()
        self._retrier = Retrier(retries)
        self._closed = False
        https = self.endpoint.address.lower().startswith("https://")
        if self.endpoint.protocol == "http" and not https and self.security.wants_tls():
            raise ValueError(f"TLS options (ca_file, client_cert, tls=True) need an https:// URL, not "
                             f"{self.endpoint.address}")
        if credentials is not None and self.security.wants_tls():
            raise ValueError("give credentials= or ca_file/client_cert/tls, not both")

    def _headers(self, headers: Mapping[str, str] | None) -> dict[str, str]:
        """User headers plus the token's authorization header (the token wins over a user one)."""
        merged = {k: v for k, v in (headers or {}).items()
                  if not (self.security.token and k.lower() == "authorization")}
        merged.update(self.security.headers())
        return merged

    @property
    def protocol(self) -> str:
        return self.endpoint.protocol

    def _timeout(self, timeout: float | None) -> float | None:
        """The per-call timeout (the client default when None); refuses calls after close()."""
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed")
        return self.timeout if timeout is None else timeout
