"""Bearer-token checks at both doors: a gRPC server interceptor and an aiohttp middleware.

Both consult one serving.security.AuthPolicy, so exemptions and accepted tokens are the
same everywhere. A refused call never reaches a servicer or a route handler: on gRPC the
refusing handler does not even parse the request bytes (request_deserializer=None), so
an unauthenticated client cannot exercise the protobuf parser either.
"""
from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
from aiohttp import web

from serving.errors import Unauthenticated
from serving.security import AuthPolicy, ThrottledLog, bearer_token

log = logging.getLogger("imgserve.auth")
_refusals = ThrottledLog(log)

AUTH_METADATA_KEY = "authorization"
MISSING = "missing bearer token: send the header 'authorization: Bearer <token>'"
INVALID = "invalid bearer token"
CHALLENGE = 'Bearer realm="imgserve"'
INVALID_CHALLENGE = 'Bearer realm="imgserve", error="invalid_token"'


def _metadata_value(metadata: Any, key: str) -> str | None:
    for item in metadata or ():
        k, v = item[0], item[1]
        if k == key:
            return v.decode("latin-1") if isinstance(v, bytes) else str(v)
    return None


def refusing_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind (unary/streaming) as ``handler`` that only aborts with ``code``."""
    async def refuse(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    kind = {(False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler}[(handler.request_streaming,
                                                                  handler.response_streaming)]
    # request_deserializer=None: the payload of a refused call is never parsed
    return kind(refuse, request_deserializer=None, response_serializer=handler.response_serializer)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for every method outside the policy's exemptions without an accepted token."""

    def __init__(self, policy: AuthPolicy) -> None:
        self._policy = policy

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method  # type: ignore[attr-defined]
        if handler is None or self._policy.grpc_exempt(method):
            return handler
        token = bearer_token(_metadata_value(details.invocation_metadata, AUTH_METADATA_KEY))  # type: ignore[attr-defined]
        if self._policy.tokens.accepts(token):
            return handler
        _refusals.warning("refused gRPC %s: %s", method, "no bearer token" if token is None else "wrong token")
        return refusing_handler(handler, grpc.StatusCode.UNAUTHENTICATED, MISSING if token is None else INVALID)


def auth_middleware(policy: AuthPolicy) -> Callable[..., Awaitable[web.StreamResponse]]:
    """aiohttp middleware raising Unauthenticated (401, ``WWW-Authenticate: Bearer``) for calls without a token.

    It sits inside serving/transports/http.py's error_middleware, which renders the JSON answer.
    """
    @web.middleware
    async def check_token(request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        if policy.http_exempt(request.path):
            return await handler(request)
        token = bearer_token(request.headers.get("Authorization"))
        if policy.tokens.accepts(token):
            return await handler(request)
        _refusals.warning("refused HTTP %s %s: %s", request.method, request.path,
                          "no bearer token" if token is None else "wrong token")
        if token is None:
            raise Unauthenticated(MISSING.replace("'authorization", "'Authorization"), CHALLENGE)
        raise Unauthenticated(INVALID, INVALID_CHALLENGE)

    return check_token
