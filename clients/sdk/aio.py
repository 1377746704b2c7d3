"""The asyncio client: ``AsyncImageClient`` over grpc.aio or aiohttp.

Channels and HTTP sessions are created on first use inside the running loop
(both bind to the loop that creates them); use one client from one event loop.
Many concurrent calls on one client share its channel / connection pool.
"""
from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any

import aiohttp
import grpc
import grpc.aio

from clients.proto.imgserve.v1 import imgserve_pb2 as pb
from clients.proto.imgserve.v1 import imgserve_pb2_grpc as pb_grpc
from clients.sdk.client import find_model
from clients.sdk.connection import ConnectionSecurity
from clients.sdk.errors import DeadlineExceeded, ImgserveError, Unavailable, from_grpc, from_http, not_http
from clients.sdk.images import as_image_list, encode_images
from clients.sdk.retry import RetryPolicy
from clients.sdk.wire import (DEFAULT_MAX_MESSAGE_MB, JSON_CONTENT_TYPE, MODELS_PATH, TIMEOUT_HEADER, V1_METHODS,
                              ClientState, Endpoint, check_result_count, classify_request, detect_request,
                              from_json, grpc_channel_options, metadata_pairs, segment_request, to_json)
from clients.types import ClassifyResult, DetectResult, ModelInfo, SegmentResult


class _AioGrpcTransport:
    def __init__(self, endpoint: Endpoint, max_message_mb: int, headers: Mapping[str, str],
                 credentials: grpc.ChannelCredentials | None) -> None:
        self._endpoint = endpoint
        self._options = grpc_channel_options(max_message_mb)
        self._credentials = credentials
        self._metadata = metadata_pairs(headers)
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.ImageServiceStub | None = None

    def _get_stub(self) -> pb_grpc.ImageServiceStub:
        if self._stub is None:
            if self._credentials is None:
                self._channel = grpc.aio.insecure_channel(self._endpoint.address, options=self._options)
            else:
                self._channel = grpc.aio.secure_channel(self._endpoint.address, self._credentials,
                                                        options=self._options)
            self._stub = pb_grpc.ImageServiceStub(self._channel)
        return self._stub

    async def _call(self, method_name: str, request: Any, timeout: float | None) -> Any:
        method = getattr(self._get_stub(), method_name)
        try:
            return await method(request, timeout=timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            trailing = {k: v for k, v in (exc.trailing_metadata() or ())}
            raise from_grpc(exc.code().name, exc.details(), trailing) from None

    async def infer(self, method: str, request: Any, timeout: float | None) -> Any:
        return await self._call(method, request, timeout)

    async def list_models(self, timeout: float | None) -> pb.ListModelsResponse:
        return await self._call("ListModels", pb.ListModelsRequest(), timeout)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()


class _AioHttpTransport:
    def __init__(self, endpoint: Endpoint, headers: Mapping[str, str], ssl_context: ssl.SSLContext | None) -> None:
        self._base = endpoint.address
        self._headers = {"Accept": JSON_CONTENT_TYPE, **headers}
        self._ssl = ssl_context
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            # limit=0: concurrency is bounded by the caller (e.g. the bench's workers), not the pool.
            connector = aiohttp.TCPConnector(limit=0, ssl=self._ssl if self._ssl is not None else True)
            self._session = aiohttp.ClientSession(connector=connector, headers=self._headers)
        return self._session

    async def _request(self, method: str, path: str, body: bytes | None, timeout: float | None) -> bytes:
        headers = {"Content-Type": JSON_CONTENT_TYPE} if body is not None else {}
        if timeout is not None:
            headers[TIMEOUT_HEADER] = f"{timeout:g}"  # the server drops the request once it is late
        try:
            async with self._get_session().request(
                    method, self._base + path, data=body, headers=headers,
                    timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                payload = await resp.read()
                if resp.status != 200:
                    raise from_http(resp.status, payload, resp.headers)
                return payload
        except asyncio.TimeoutError:  # aiohttp's timeouts subclass it
            raise DeadlineExceeded(f"no answer from {self._base} within {timeout} s") from None
        except aiohttp.ClientSSLError as exc:
            # a certificate problem does not heal by retrying
            raise Unavailable(f"TLS with {self._base} failed: {exc}", permanent=True) from None
        except aiohttp.ClientConnectorError as exc:
            raise Unavailable(f"cannot reach {self._base}: {exc.os_error or exc}") from None
        except aiohttp.ClientResponseError:  # non-200 answers are handled above: this one did not parse as HTTP
            raise not_http(self._base) from None
        except aiohttp.ClientError as exc:
            raise Unavailable(f"connection to {self._base} failed: {exc}") from None

    async def infer(self, method: str, request: Any, timeout: float | None) -> Any:
        path, response_type = V1_METHODS[method]
        return from_json(await self._request("POST", path, to_json(request), timeout), response_type)

    async def list_models(self, timeout: float | None) -> pb.ListModelsResponse:
        return from_json(await self._request("GET", MODELS_PATH, None, timeout), pb.ListModelsResponse)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class AsyncImageClient(ClientState):
    """asyncio imgserve client; same arguments, results and errors as ImageClient.

    Use ``async with AsyncImageClient(...) as client`` or ``await client.close()``.
    """

    def __init__(self, target: str = "localhost:8500", *, protocol: str | None = None,
                 timeout: float | None = None, max_message_mb: int = DEFAULT_MAX_MESSAGE_MB,
                 headers: Mapping[str, str] | None = None,
                 credentials: grpc.ChannelCredentials | None = None,
                 token: str | None = None, token_file: str | None = None, ca_file: str | None = None,
                 client_cert: str | None = None, client_key: str | None = None, tls: bool | None = None,
                 retries: RetryPolicy | int | None = RetryPolicy()) -> None:
        security = ConnectionSecurity.create(token, token_file, ca_file, client_cert, client_key, tls)
        super().__init__(target, protocol, timeout, security, retries, credentials)
        headers = self._headers(headers)
        self._transport: _AioGrpcTransport | _AioHttpTransport
        if self.endpoint.protocol == "grpc":
            if credentials is None and security.wants_tls():
                credentials = security.grpc_credentials()
            self._transport = _AioGrpcTransport(self.endpoint, max_message_mb, headers, credentials)
        else:
            https = self.endpoint.address.lower().startswith("https://")
            self._transport = _AioHttpTransport(self.endpoint, headers,
                                                security.ssl_context() if security.wants_tls(https) else None)

    async def classify(self, images: Any, model: str, *, top_k: int | None = 5, ten_crop: bool | None = None,
                       timeout: float | None = None) -> ClassifyResult:
        """Classify one image or many in one request (see ImageClient.classify)."""
        timeout = self._timeout(timeout)
        encoded = await self._encode(images)
        response = await self._call("Classify", classify_request(model, encoded, top_k, ten_crop), len(encoded),
                                    timeout)
        return ClassifyResult.from_proto(response)

    async def detect(self, images: Any, model: str, *, score_threshold: float | None = None,
                     max_detections: int | None = None, tta: bool | None = None,
                     timeout: float | None = None) -> DetectResult:
        """Detect objects in one image or many (see ImageClient.detect)."""
        timeout = self._timeout(timeout)
        encoded = await self._encode(images)
        request = detect_request(model, encoded, score_threshold, max_detections, tta)
        return DetectResult.from_proto(await self._call("Detect", request, len(encoded), timeout))

    async def segment(self, images: Any, model: str, *, tta: bool | None = None, rle: bool | None = None,
                      timeout: float | None = None) -> SegmentResult:
        """Segment one image or many (see ImageClient.segment)."""
        timeout = self._timeout(timeout)
        encoded = await self._encode(images)
        request = segment_request(model, encoded, tta, rle)
        return SegmentResult.from_proto(await self._call("Segment", request, len(encoded), timeout))

    @staticmethod
    async def _encode(images: Any) -> list[bytes]:
        items = as_image_list(images)
        if all(isinstance(i, (bytes, bytearray, memoryview)) for i in items):
            return encode_images(items)
        return await asyncio.to_thread(encode_images, items)  # file reads and PNG encoding would block the loop

    async def _call(self, method: str, request: Any, n_images: int, timeout: float | None) -> Any:
        response = await self._retrying(lambda remaining: self._transport.infer(method, request, remaining), timeout)
        check_result_count(response, n_images)
        return response

    async def _retrying(self, attempt: Callable[[float | None], Awaitable[Any]], timeout: float | None) -> Any:
        """Await ``attempt(remaining_timeout)`` until it succeeds or the retry policy says stop."""
        state = self._retrier.start(timeout)
        while True:
            try:
                return await attempt(state.remaining())
            except ImgserveError as exc:
                delay = state.delay_before_retry(exc)
                if delay is None:
                    raise
            await asyncio.sleep(delay)

    async def models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """Every model the gateway serves."""
        response = await self._retrying(self._transport.list_models, self._timeout(timeout))
        return [ModelInfo.from_proto(m) for m in response.models]

    async def model(self, name: str, *, timeout: float | None = None) -> ModelInfo:
        """One model's info; NotFound when the gateway does not serve it."""
        return find_model(await self.models(timeout=timeout), name)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._transport.close()

    async def __aenter__(self) -> AsyncImageClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncImageClient({self.endpoint.address!r}, protocol={self.endpoint.protocol!r})"
