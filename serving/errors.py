"""Typed errors of the data plane and their one mapping to gRPC and HTTP codes."""
from __future__ import annotations

import math

import grpc


class ServingError(Exception):
    """Base of every error the data plane raises on purpose; carries a client-safe message."""

    grpc_code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    http_status: int = 500
    retry_after_s: float | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def code_name(self) -> str:
        return self.grpc_code.name


class InvalidInput(ServingError):
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400


class ModelNotFound(ServingError):
    grpc_code = grpc.StatusCode.NOT_FOUND
    http_status = 404


def advertised_retry_after(seconds: float) -> int:
    """The whole seconds a client is told to wait (HTTP ``Retry-After`` allows only integers, >= 1).

    Messages, the HTTP header and the gRPC trailer all use this, so they never disagree.
    """
    return max(1, math.ceil(seconds))


class Overloaded(ServingError):
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BackendUnavailable(ServingError):
    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 503


class ShuttingDown(BackendUnavailable):
    """The gateway is draining and takes no new requests: retry elsewhere (UNAVAILABLE / 503 + Retry-After)."""

    def __init__(self, message: str = "the server is shutting down; retry on another replica",
                 retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(ServingError):
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 504


class BackendError(ServingError):
    """The backend failed on a well-formed request."""

    grpc_code = grpc.StatusCode.INTERNAL
    http_status = 500


class Unauthenticated(ServingError):
    """No valid bearer token (HTTP adds ``WWW-Authenticate: Bearer``)."""

    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401

    def __init__(self, message: str, challenge: str = 'Bearer realm="imgserve"') -> None:
        super().__init__(message)
        self.challenge = challenge  # the WWW-Authenticate value (RFC 6750)


def http_status_for(code: grpc.StatusCode) -> int:
    """HTTP status for a gRPC code, for errors that did not come from a ServingError."""
    return {
        grpc.StatusCode.INVALID_ARGUMENT: 400,
        grpc.StatusCode.NOT_FOUND: 404,
        grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
        grpc.StatusCode.UNAVAILABLE: 503,
        grpc.StatusCode.DEADLINE_EXCEEDED: 504,
        grpc.StatusCode.UNIMPLEMENTED: 501,
        grpc.StatusCode.UNAUTHENTICATED: 401,
    }.get(code, 500)
