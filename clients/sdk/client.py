"""The blocking client: ``ImageClient`` over gRPC (grpcio) or HTTP/JSON (urllib).

One ImageClient may be shared by threads: the gRPC channel is thread-safe and
every HTTP call opens its own connection.
"""
from __future__ import annotations

import http.client
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import grpc

from clients.proto.imgserve.v1 import imgserve_pb2 as pb
from clients.proto.imgserve.v1 import imgserve_pb2_grpc as pb_grpc
from clients.sdk.connection import ConnectionSecurity
from clients.sdk.errors import (DeadlineExceeded, ImgserveError, NotFound, Unavailable, from_grpc, from_http,
                                not_http)
from clients.sdk.images import encode_images
from clients.sdk.retry import RetryPolicy
from clients.sdk.wire import (DEFAULT_MAX_MESSAGE_MB, JSON_CONTENT_TYPE, MODELS_PATH, TIMEOUT_HEADER, V1_METHODS,
                              ClientState, Endpoint, check_result_count, classify_request, detect_request,
                              from_json, grpc_channel_options, metadata_pairs, segment_request, to_json)
from clients.types import ClassifyResult, DetectResult, ModelInfo, SegmentResult


class _GrpcTransport:
    def __init__(self, endpoint: Endpoint, max_message_mb: int, headers: Mapping[str, str],
                 credentials: grpc.ChannelCredentials | None) -> None:
        options = grpc_channel_options(max_message_mb)
        if credentials is None:
            self._channel = grpc.insecure_channel(endpoint.address, options=options)
        else:
            self._channel = grpc.secure_channel(endpoint.address, credentials, options=options)
        self._stub = pb_grpc.ImageServiceStub(self._channel)
        self._metadata = metadata_pairs(headers)

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            call: Any = exc  # client-side RpcErrors are also grpc.Call
            raise from_grpc(call.code().name, call.details(), dict(call.trailing_metadata() or ())) from None

    def infer(self, method: str, request: Any, timeout: float | None) -> Any:
        return self._call(getattr(self._stub, method), request, timeout)

    def list_models(self, timeout: float | None) -> pb.ListModelsResponse:
        return self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout)

    def close(self) -> None:
        self._channel.close()


class _HttpTransport:
    def __init__(self, endpoint: Endpoint, headers: Mapping[str, str], ssl_context: ssl.SSLContext | None) -> None:
        self._base = endpoint.address
        self._headers = {"Accept": JSON_CONTENT_TYPE, **headers}
        # Like aiohttp (the async client), ignore *_proxy variables: gateways are usually on the LAN.
        handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
        if ssl_context is not None:
            handlers.append(urllib.request.HTTPSHandler(context=ssl_context))
        self._opener = urllib.request.build_opener(*handlers)

    def _request(self, method: str, path: str, body: bytes | None, timeout: float | None) -> bytes:
        headers = dict(self._headers)
        if body is not None:
            headers["Content-Type"] = JSON_CONTENT_TYPE
        if timeout is not None:
            headers[TIMEOUT_HEADER] = f"{timeout:g}"  # the server drops the request once it is late
        req = urllib.request.Request(self._base + path, data=body, method=method, headers=headers)
        try:
            with self._opener.open(req, timeout=timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            try:
                payload = exc.read()
            finally:
                exc.close()
            raise from_http(exc.code, payload, exc.headers) from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, (TimeoutError, socket.timeout)):
                raise DeadlineExceeded(f"no answer from {self._base} within {timeout} s") from None
            if isinstance(exc.reason, ssl.SSLError):
                # a certificate problem does not heal by retrying
                raise Unavailable(f"TLS with {self._base} failed: {exc.reason}", permanent=True) from None
            raise Unavailable(f"cannot reach {self._base}: {exc.reason}") from None
        except TimeoutError:
            raise DeadlineExceeded(f"no answer from {self._base} within {timeout} s") from None
        except http.client.BadStatusLine as exc:
            if isinstance(exc, http.client.RemoteDisconnected):
                raise Unavailable(f"connection to {self._base} failed: {exc}") from None
            raise not_http(self._base) from None
        except (ConnectionError, http.client.HTTPException) as exc:
            raise Unavailable(f"connection to {self._base} failed: {exc}") from None

    def infer(self, method: str, request: Any, timeout: float | None) -> Any:
        path, response_type = V1_METHODS[method]
        return from_json(self._request("POST", path, to_json(request), timeout), response_type)

    def list_models(self, timeout: float | None) -> pb.ListModelsResponse:
        return from_json(self._request("GET", MODELS_PATH, None, timeout), pb.ListModelsResponse)

    def close(self) -> None:
        self._opener.close()


class ImageClient(ClientState):
    """Blocking imgserve client.

    ``ImageClient("localhost:8500")`` talks gRPC; ``ImageClient("http://localhost:8080")``
    (or ``protocol="http"``) talks the HTTP/JSON mirror. Results and errors are the
    same either way. ``timeout`` (seconds) is the default per call; None waits for
    the server's own deadline. ``headers`` go out as HTTP headers / gRPC metadata.

    Security: ``token`` (or ``token_file``) is sent as ``authorization: Bearer <token>``;
    ``ca_file`` verifies the gateway's TLS certificate (gRPC; for HTTP use an https:// URL),
    ``client_cert``/``client_key`` answer a gateway that requires mTLS; ``tls=True`` uses TLS
    with the system's CAs. Retries: UNAVAILABLE and RESOURCE_EXHAUSTED-with-Retry-After are
    retried (``retries``: a RetryPolicy, a number of retries, 0 or None for none; default 3,
    see clients/sdk/retry.py) within ``timeout`` and a retry budget.
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
        self._transport: _GrpcTransport | _HttpTransport
        if self.endpoint.protocol == "grpc":
            if credentials is None and security.wants_tls():
                credentials = security.grpc_credentials()
            self._transport = _GrpcTransport(self.endpoint, max_message_mb, headers, credentials)
        else:
            https = self.endpoint.address.lower().startswith("https://")
            self._transport = _HttpTransport(self.endpoint, headers,
                                             security.ssl_context() if security.wants_tls(https) else None)

    def classify(self, images: Any, model: str, *, top_k: int | None = 5, ten_crop: bool | None = None,
                 timeout: float | None = None) -> ClassifyResult:
        """Classify one image or many (paths, bytes, PIL images, uint8 arrays) in one request.

        ``top_k=None`` uses the server default; ``ten_crop=None`` the model default.
        Raises an ImgserveError subclass on failure.
        """
        timeout = self._timeout(timeout)
        encoded = encode_images(images)
        response = self._call("Classify", classify_request(model, encoded, top_k, ten_crop), len(encoded), timeout)
        return ClassifyResult.from_proto(response)

    def detect(self, images: Any, model: str, *, score_threshold: float | None = None,
               max_detections: int | None = None, tta: bool | None = None,
               timeout: float | None = None) -> DetectResult:
        """Detect objects in one image or many; boxes come back in each original image's pixels.

        ``score_threshold`` (in [0, 1]) and ``max_detections`` (1..K) default to the model's
        settings; ``tta`` adds horizontal-flip test-time augmentation. Calling it on a model
        that is not a detector raises InvalidArgument naming the model's task.
        """
        timeout = self._timeout(timeout)
        encoded = encode_images(images)
        request = detect_request(model, encoded, score_threshold, max_detections, tta)
        return DetectResult.from_proto(self._call("Detect", request, len(encoded), timeout))

    def segment(self, images: Any, model: str, *, tta: bool | None = None, rle: bool | None = None,
                timeout: float | None = None) -> SegmentResult:
        """Segment one image or many: a class-index mask at each original image's size.

        ``tta`` averages the image with its mirror; ``rle`` adds COCO RLE per class present.
        """
        timeout = self._timeout(timeout)
        encoded = encode_images(images)
        request = segment_request(model, encoded, tta, rle)
        return SegmentResult.from_proto(self._call("Segment", request, len(encoded), timeout))

    def _call(self, method: str, request: Any, n_images: int, timeout: float | None) -> Any:
        response = self._retrying(lambda remaining: self._transport.infer(method, request, remaining), timeout)
        check_result_count(response, n_images)
        return response

    def _retrying(self, attempt: Any, timeout: float | None) -> Any:
        """Run ``attempt(remaining_timeout)`` until it succeeds or the retry policy says stop."""
        state = self._retrier.start(timeout)
        while True:
            try:
                return attempt(state.remaining())
            except ImgserveError as exc:
                delay = state.delay_before_retry(exc)
                if delay is None:
                    raise
            time.sleep(delay)

    def models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """Every model the gateway serves."""
        response = self._retrying(self._transport.list_models, self._timeout(timeout))
        return [ModelInfo.from_proto(m) for m in response.models]

    def model(self, name: str, *, timeout: float | None = None) -> ModelInfo:
        """One model's info; NotFound when the gateway does not serve it."""
        return find_model(self.models(timeout=timeout), name)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._transport.close()

    def __enter__(self) -> ImageClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ImageClient({self.endpoint.address!r}, protocol={self.endpoint.protocol!r})"


def find_model(models: list[ModelInfo], name: str) -> ModelInfo:
    for info in models:
        if info.name == name:
            return info
    available = ", ".join(sorted(m.name for m in models)) or "none"
    raise NotFound(f"model {name!r} is not served here (available: {available})")


__all__ = ["ImageClient", "find_model"]
