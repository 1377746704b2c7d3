"""Malformed protobuf on any gRPC method: INVALID_ARGUMENT with a plain message, no traceback.

grpc.aio parses the request bytes with the method's ``request_deserializer`` before the
servicer runs; a DecodeError there escapes into grpc's own handler, which answers
UNKNOWN with the exception's class name and logs an ERROR traceback. This interceptor
wraps every method's deserializer so a parse failure yields a ``Malformed`` marker
instead, and wraps the method's behaviour so the marker is answered INVALID_ARGUMENT
before any servicer code sees it. It applies to every service on the server (imgserve.v1,
the v2 protocol, health, reflection), present and future.
"""
from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio

from serving.security import ThrottledLog

log = logging.getLogger("imgserve.grpc")
_refusals = ThrottledLog(log)


@dataclass(frozen=True)
class Malformed:
    """What a request that did not parse becomes: its message type and size, never its bytes."""

    type_name: str
    size: int

    @property
    def message(self) -> str:
        return f"the request is not a valid {self.type_name} message (protobuf parse failed on {self.size} bytes)"


def safe_deserializer(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """``deserialize`` that returns a Malformed marker instead of raising."""
    if deserialize is None:
        return None
    owner = getattr(deserialize, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    type_name = getattr(descriptor, "full_name", None) or "request"

    def parse(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except Exception:  # DecodeError, or anything a parser may raise on hostile bytes
            return Malformed(type_name, len(raw))

    return parse


async def _refuse(method: str, bad: Malformed, context: grpc.aio.ServicerContext) -> None:
    _refusals.warning("refused gRPC %s: %s", method, bad.message)
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, bad.message)


def _guard_unary_request(method: str, behaviour: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behaviour):
        async def guarded_gen(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if isinstance(request, Malformed):
                await _refuse(method, request, context)
            async for item in behaviour(request, context):
                yield item
        return guarded_gen

    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Malformed):
            await _refuse(method, request, context)
        result = behaviour(request, context)
        return await result if inspect.isawaitable(result) else result
    return guarded


def _guard_stream_request(method: str, behaviour: Callable[..., Any]) -> Callable[..., Any]:
    async def checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, Malformed):
                await _refuse(method, request, context)
            yield request

    if inspect.isasyncgenfunction(behaviour):
        async def guarded_gen(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async for item in behaviour(checked(requests, context), context):
                yield item
        return guarded_gen

    async def guarded(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        result = behaviour(checked(requests, context), context)
        return await result if inspect.isawaitable(result) else result
    return guarded


def guard_handler(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """The same handler with a deserializer that cannot raise and a behaviour that refuses Malformed."""
    kinds = {(False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler, _guard_unary_request),
             (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler, _guard_unary_request),
             (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler, _guard_stream_request),
             (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler, _guard_stream_request)}
    attr, make, guard = kinds[(handler.request_streaming, handler.response_streaming)]
    behaviour = getattr(handler, attr)
    if behaviour is None or handler.request_deserializer is None:
        return handler
    return make(guard(method, behaviour), request_deserializer=safe_deserializer(handler.request_deserializer),
                response_serializer=handler.response_serializer)


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Applies guard_handler to every method the server routes (built once per method, then reused)."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method: str = details.method  # type: ignore[attr-defined]
        cached = self._cache.get(method)
        if cached is None or cached[0] is not handler:
            cached = (handler, guard_handler(method, handler))
            self._cache[method] = cached
        return cached[1]
