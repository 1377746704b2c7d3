"""One exception hierarchy for every transport.

A failed call raises the same class with the same ``code`` (the gRPC status
name) whether it went over gRPC or HTTP/JSON, so callers write one ``except``.
Client-side failures map onto the same codes: a refused connection is
``Unavailable``, a client timeout ``DeadlineExceeded``, an unusable local image
``InvalidArgument``.
"""
from __future__ import annotations

import json
from collections.abc import Mapping


class ImgserveError(Exception):
    """Base of every SDK error. ``code`` is a gRPC status name such as "NOT_FOUND"."""

    default_code = "UNKNOWN"

    def __init__(self, message: str, *, code: str | None = None, retry_after: float | None = None,
                 permanent: bool = False) -> None:
        self.code: str = code or self.default_code
        self.message: str = message
        self.retry_after: float | None = retry_after
        # permanent: retrying cannot help even though the code says "try later" (wrong port, bad certificate)
        self.permanent: bool = permanent
        self.attempts: int = 1  # how many times the call was sent (the SDK's retries, clients/sdk/retry.py)
        super().__init__(f"{self.code}: {message}")


class InvalidArgument(ImgserveError):
    """The request was rejected as malformed: bad image bytes, top_k <= 0, an unusable local input."""

    default_code = "INVALID_ARGUMENT"


class NotFound(ImgserveError):
    """The model (or endpoint) does not exist on the server."""

    default_code = "NOT_FOUND"


class ResourceExhausted(ImgserveError):
    """The server is overloaded; ``retry_after`` (seconds) says when to try again, when it said so."""

    default_code = "RESOURCE_EXHAUSTED"


class Unavailable(ImgserveError):
    """The server (or its inference backend) cannot be reached right now; retrying later may work."""

    default_code = "UNAVAILABLE"


class Unauthenticated(ImgserveError):
    """The gateway wants a bearer token and got none or a wrong one (pass token= / --token)."""

    default_code = "UNAUTHENTICATED"


class DeadlineExceeded(ImgserveError):
    """No answer within the timeout."""

    default_code = "DEADLINE_EXCEEDED"


class InternalError(ImgserveError):
    """The server failed on a well-formed request, or answered with something unreadable."""

    default_code = "INTERNAL"


_BY_CODE: dict[str, type[ImgserveError]] = {
    cls.default_code: cls
    for cls in (InvalidArgument, NotFound, ResourceExhausted, Unavailable, DeadlineExceeded, InternalError,
                Unauthenticated)
}

# For HTTP answers that carry no imgserve error body (a proxy, a wrong URL).
_CODE_BY_HTTP_STATUS: dict[int, str] = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND", 405: "UNIMPLEMENTED", 413: "RESOURCE_EXHAUSTED", 415: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED", 501: "UNIMPLEMENTED", 502: "UNAVAILABLE", 503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def error_for(code: str, message: str, retry_after: float | None = None) -> ImgserveError:
    """The exception instance for a status name; unknown names give the base class with that code."""
    cls = _BY_CODE.get(code, ImgserveError)
    return cls(message, code=code, retry_after=retry_after)


def parse_retry_after(value: str | bytes | None) -> float | None:
    """Seconds from a Retry-After header / metadata value (delta-seconds form only)."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


# grpc-core's words when the address answers HTTP/1.1 (e.g. the gateway's HTTP port).
_GRPC_SAW_HTTP1 = "http1.x server"
GRPC_TO_HTTP_PORT_HINT = ("that port speaks HTTP/1.1, not gRPC: for HTTP use --server http://HOST:PORT, "
                          "for gRPC the gateway's gRPC port (--grpc-port, default 8500)")
HTTP_TO_GRPC_PORT_HINT = ("the server did not answer HTTP/1.1 (a gRPC port answers with HTTP/2 frames): for gRPC "
                          "use --server HOST:PORT without http://, for HTTP the gateway's HTTP port "
                          "(--http-port, default 8080)")


def not_http(address: str) -> Unavailable:
    """The error for an HTTP call answered by something that is not HTTP/1.1, typically a gRPC port.

    Never echoes the answer's bytes: raw HTTP/2 frames are noise to a user.
    """
    return Unavailable(f"{address}: {HTTP_TO_GRPC_PORT_HINT}", permanent=True)


def from_grpc(code_name: str, details: str | None, trailing: Mapping[str, str | bytes] | None) -> ImgserveError:
    """Map a gRPC status (name, details, trailing metadata) to an SDK error."""
    retry = parse_retry_after((trailing or {}).get("retry-after"))
    message = details or code_name.lower().replace("_", " ")
    if code_name == "UNAVAILABLE" and _GRPC_SAW_HTTP1 in message:
        return Unavailable(f"{GRPC_TO_HTTP_PORT_HINT} ({message})", permanent=True)
    return error_for(code_name, message, retry)


def from_http(status: int, body: bytes, headers: Mapping[str, str]) -> ImgserveError:
    """Map an HTTP error answer to an SDK error.

    The gateway answers ``{"error": {"code": "NOT_FOUND", "message": "..."}}``;
    anything else (a proxy page, an unrelated server) is mapped by status.
    """
    retry = parse_retry_after(headers.get("Retry-After"))
    try:
        payload = json.loads(body)
        err = payload["error"]
        code, message = str(err["code"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        text = body.decode("utf-8", "replace").strip().replace("\n", " ")
        if len(text) > 200:
            text = text[:200] + "..."
        code = _CODE_BY_HTTP_STATUS.get(status, "INTERNAL" if status >= 500 else "UNKNOWN")
        return error_for(code, f"HTTP {status}" + (f": {text}" if text else ""), retry)
    if retry is None and isinstance(err, dict):
        retry = parse_retry_after(str(err.get("retry_after_s", err.get("retryAfterS", ""))) or None)
    return error_for(code, message, retry)
