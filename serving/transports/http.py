"""The HTTP side of the gateway (aiohttp).

* ``/v1/classify``, ``/v1/detect``, ``/v1/segment`` (POST) and ``/v1/models`` (GET): the imgserve.v1 API, bodies in the
  proto3 JSON mapping (google.protobuf.json_format; bytes are base64);
* ``/v2/...``: the Open Inference Protocol (KServe v2) REST binding, including the
  binary-tensor extension (``Inference-Header-Content-Length``) and classification;
* ``/metrics`` (Prometheus), ``/openapi.json``, ``/healthz`` (live), ``/readyz`` (ready).

Errors are JSON ``{"error": {"code": "INVALID_ARGUMENT", "message": "..."}}`` with the
HTTP status from serving/errors.py; under ``/v2`` they take the protocol's own shape
``{"error": "message"}`` so v2 clients (tritonclient.http) read them.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import Message

from serving.dataplane import DataPlane, ModelStatus
from serving.errors import InvalidInput, ServingError, Unauthenticated, advertised_retry_after
from serving.metrics import Metrics
from serving.security import AuthPolicy
from serving.settings import Settings
from serving.transports import oip
from serving.tasks import HANDLERS, TaskHandler
from serving.transports.grpc_v1 import list_models_response, run_v1
from serving.transports.auth import auth_middleware
from serving.transports.grpc_v2 import repository_call
from serving.transports.observe import UNKNOWN_MODEL, observe
from serving.transports.openapi import build_openapi

log = logging.getLogger("imgserve.http")

JSON = "application/json"
BINARY = "application/octet-stream"
HEADER_LENGTH = "Inference-Header-Content-Length"
INTERNAL_MESSAGE = "internal error in the gateway (the server log has the details)"

Readiness = Callable[[], Awaitable[bool]]
# Seconds a request body may take to arrive (settings.http_body_timeout_s), kept on the app so
# read_body needs no settings argument.
BODY_TIMEOUT_KEY = web.AppKey("imgserve_body_timeout_s", float)


class HttpProblem(ServingError):
    """An HTTP-level rejection (size limit, media type, routing) with its own status and code."""

    def __init__(self, message: str, *, http_status: int, grpc_code: grpc.StatusCode) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.grpc_code = grpc_code


TIMEOUT_HEADER = "X-Request-Timeout"


def request_deadline(request: web.Request) -> float | None:
    """The client's deadline from ``X-Request-Timeout`` (seconds), HTTP's stand-in for a gRPC deadline."""
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        raise InvalidInput(f"header {TIMEOUT_HEADER} must be a number of seconds, got {raw!r}") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise InvalidInput(f"header {TIMEOUT_HEADER} must be a positive number of seconds, got {raw!r}")
    return time.monotonic() + seconds


# ---------------------------------------------------------------- responses

def dumps(doc: object) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def json_response(doc: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=dumps(doc), status=status, content_type=JSON, headers=headers)


def message_response(message: Message) -> web.Response:
    """A protobuf message in the proto3 JSON mapping, scalar defaults included (index 0 stays visible)."""
    doc = json_format.MessageToDict(message, always_print_fields_with_no_presence=True)
    return json_response(doc)


def error_response(request: web.Request, status: int, code: str, message: str,
                   retry_after_s: float | None = None) -> web.Response:
    headers: dict[str, str] = {}
    if retry_after_s is not None:
        headers["Retry-After"] = str(advertised_retry_after(retry_after_s))
    if request.path == "/v2" or request.path.startswith("/v2/"):
        return json_response({"error": message}, status, headers)
    return json_response({"error": {"code": code, "message": message}}, status, headers)


_STATUS_CODES: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


@web.middleware
async def error_middleware(request: web.Request,
                           handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Every failure leaves as a JSON error; unexpected ones are logged and get a generic message."""
    try:
        return await handler(request)
    except ServingError as exc:
        response = error_response(request, exc.http_status, exc.code_name, exc.message, exc.retry_after_s)
        if isinstance(exc, Unauthenticated):
            response.headers["WWW-Authenticate"] = exc.challenge
        if exc.http_status == 408:
            response.force_close()  # no keep-alive after a late body (http_server.py closes at once)
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _STATUS_CODES.get(exc.status, grpc.StatusCode.UNKNOWN).name
        message = {404: f"no route for {request.method} {request.path}",
                   405: f"method {request.method} is not allowed on {request.path}"}.get(exc.status, exc.reason)
        return error_response(request, exc.status, code, message)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unexpected error handling %s %s", request.method, request.path)
        return error_response(request, 500, grpc.StatusCode.INTERNAL.name, INTERNAL_MESSAGE)


# ---------------------------------------------------------------- request bodies

async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body, refusing anything over the gateway's message limit with 413."""
    too_big = HttpProblem(f"request body exceeds the {limit}-byte limit (--max-message-mb)",
                          http_status=413, grpc_code=grpc.StatusCode.RESOURCE_EXHAUSTED)
    if request.content_length is not None and request.content_length > limit:
        raise too_big
    timeout_s = request.config_dict.get(BODY_TIMEOUT_KEY)
    try:
        async with asyncio.timeout(timeout_s):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_big from None
    except TimeoutError:
        raise HttpProblem(f"the request body did not arrive within {timeout_s:g} s (--http-body-timeout-s)",
                          http_status=408, grpc_code=grpc.StatusCode.DEADLINE_EXCEEDED) from None


def require_json(request: web.Request) -> None:
    ctype = request.content_type
    if ctype != JSON and not ctype.endswith("+json"):
        raise HttpProblem(f"Content-Type must be {JSON}, not {ctype}", http_status=415,
                          grpc_code=grpc.StatusCode.INVALID_ARGUMENT)


def parse_v1_request(body: bytes, message_type: type[Message]) -> Any:
    """An imgserve.v1 request message from JSON, with every image checked to be strict base64 first.

    protobuf's JSON parser decodes base64 leniently (it drops stray characters), so a
    mangled image would otherwise reach the decoder and be blamed on the image format.
    """
    doc = parse_json_object(body, f"request body ({message_type.DESCRIPTOR.full_name})")
    images = doc.get("images")
    if isinstance(images, list):
        for i, item in enumerate(images):
            if isinstance(item, str):
                problem = base64_problem(item)
                if problem is not None:
                    raise InvalidInput(f"image {i} (images[{i}]) is not valid base64: {problem}; the JSON "
                                       f"mapping carries bytes as standard or URL-safe base64")
    message = message_type()
    try:
        json_format.ParseDict(doc, message)
    except (json_format.ParseError, ValueError, TypeError, AttributeError) as exc:
        raise InvalidInput(f"invalid JSON for {message.DESCRIPTOR.full_name}: {exc}") from None
    return message


# The proto3 JSON mapping accepts standard and URL-safe base64, padded or not (a regex, so
# checking a 64 MiB body stays at C speed on the event loop).
_BASE64 = re.compile(r"[A-Za-z0-9+/_-]*={0,2}")
_NOT_BASE64 = re.compile(r"[^A-Za-z0-9+/_-]")


def base64_problem(text: str) -> str | None:
    """Why ``text`` is not base64 as the proto3 JSON mapping allows it, or None when it is."""
    body = text.rstrip("=")
    if not _BASE64.fullmatch(text):
        bad = _NOT_BASE64.search(body) or _NOT_BASE64.search(text)
        assert bad is not None
        return f"character {bad.group()!r} at offset {bad.start()}"
    padding = len(text) - len(body)
    if len(body) % 4 == 1 or (padding and (len(body) + padding) % 4):
        return f"length {len(text)} cannot be base64"
    return None


def parse_json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{what} is not UTF-8: {exc}") from None
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise InvalidInput(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    return doc


def _flatten(data: object) -> list[object]:
    if isinstance(data, list):
        out: list[object] = []
        for item in data:
            out.extend(_flatten(item))
        return out
    return [data]


# ---------------------------------------------------------------- v2 request decoding

def v2_images(doc: dict[str, Any], binary: bytes) -> list[bytes]:
    """The encoded images of a v2 JSON inference request (binary section or JSON ``data``)."""
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise InvalidInput(f"'inputs' must be a list with exactly one tensor ({oip.INPUT_NAME!r})")
    tensor = inputs[0]
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InvalidInput("input 'shape' must be a list of integers")
    count = oip.check_image_input(str(tensor.get("name")), str(tensor.get("datatype")), shape)
    params = tensor.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidInput("input 'parameters' must be a JSON object")
    if "binary_data_size" in params:
        size = oip.int_parameter("binary_data_size", params["binary_data_size"])
        if size < 0 or size != len(binary):
            raise InvalidInput(f"binary_data_size is {size} but the request carries {len(binary)} binary bytes")
        images = oip.deserialize_bytes(binary)
    else:
        if binary:
            raise InvalidInput("the request has a binary section but no input declares binary_data_size")
        if "data" not in tensor:
            raise InvalidInput(f"input {oip.INPUT_NAME!r} has neither 'data' nor parameters.binary_data_size")
        items = _flatten(tensor["data"])
        if not all(isinstance(x, str) for x in items):
            raise InvalidInput("BYTES input 'data' must hold strings")
        images = [str(x).encode("utf-8") for x in items]
    if len(images) != count:
        raise InvalidInput(f"input {oip.INPUT_NAME!r} has shape {shape} but carries {len(images)} elements")
    return images


def v2_outputs(doc: dict[str, Any]) -> tuple[list[oip.RequestedOutput], bool]:
    """Requested outputs and the request-wide binary default (``binary_data_output``)."""
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):  # found by tests/test_fuzz.py: {"parameters": true} was a 500
        raise InvalidInput("request 'parameters' must be a JSON object")
    binary_default = oip.bool_parameter("binary_data_output", params.get("binary_data_output", False))
    outs: list[oip.RequestedOutput] = []
    raw = doc.get("outputs") or []
    if not isinstance(raw, list):
        raise InvalidInput("'outputs' must be a list")
    for entry in raw:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise InvalidInput("each requested output needs a 'name'")
        oparams = entry.get("parameters") or {}
        if not isinstance(oparams, dict):
            raise InvalidInput("output 'parameters' must be a JSON object")
        count = 0
        if "classification" in oparams:
            count = oip.int_parameter("classification", oparams["classification"])
            if count <= 0:
                raise InvalidInput("output parameter 'classification' must be a positive integer")
        binary = oip.bool_parameter("binary_data", oparams["binary_data"]) if "binary_data" in oparams else None
        outs.append(oip.RequestedOutput(entry["name"], count, binary))
    return outs, binary_default


def v2_response(outcome: oip.InferOutcome, request_id: object, binary_default: bool) -> web.Response:
    header: dict[str, Any] = {"model_name": outcome.model, "model_version": outcome.version, "outputs": []}
    if isinstance(request_id, str) and request_id:
        header["id"] = request_id
    blobs: list[bytes] = []
    for tensor in outcome.outputs:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if tensor.binary if tensor.binary is not None else binary_default:
            blob = tensor.raw()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = tensor.json_data()
        header["outputs"].append(entry)
    head = dumps(header)
    if not blobs:
        return web.Response(body=head, content_type=JSON)
    return web.Response(body=b"".join([head, *blobs]), content_type=BINARY,
                        headers={HEADER_LENGTH: str(len(head))})


# ---------------------------------------------------------------- the application

class HttpApi:
    """Route handlers bound to one DataPlane."""

    def __init__(self, dataplane: DataPlane, metrics: Metrics, settings: Settings,
                 readiness: Readiness | None = None) -> None:
        self.dataplane = dataplane
        self.metrics = metrics
        self.settings = settings
        self.readiness: Readiness = readiness or dataplane.ready
        self._openapi: bytes | None = None

    # ---- imgserve.v1 mirror

    def v1_route(self, handler: TaskHandler) -> Callable[[web.Request], Awaitable[web.Response]]:
        """POST /v1/<method>: the task's imgserve.v1 request in the proto3 JSON mapping."""
        path_name = handler.v1_method.lower()

        async def serve(request: web.Request) -> web.Response:
            # the model is unknown until the body parses: errors before that count as "(unknown)"
            with observe(self.metrics, f"http.{path_name}", UNKNOWN_MODEL) as record:
                require_json(request)
                body = await read_body(request, self.settings.max_message_bytes)
                message = parse_v1_request(body, handler.v1_request)
                record.model = message.model or UNKNOWN_MODEL
                response = await run_v1(self.dataplane, handler, message, request_deadline(request))
                return message_response(response)

        return serve

    async def list_models(self, request: web.Request) -> web.Response:
        with observe(self.metrics, "http.models", ""):
            return message_response(list_models_response(await self.dataplane.list_models()))

    # ---- Open Inference Protocol (v2)

    async def v2_live(self, request: web.Request) -> web.Response:
        return json_response({"live": True})

    async def v2_ready(self, request: web.Request) -> web.Response:
        ready = await self.readiness()
        return json_response({"ready": ready}, 200 if ready else 400)

    async def v2_server_metadata(self, request: web.Request) -> web.Response:
        return json_response(oip.server_metadata())

    async def _model(self, request: web.Request) -> ModelStatus:
        status = await self.dataplane.get_model(request.match_info["model"])
        oip.check_version(status, request.match_info.get("version", ""))
        return status

    async def v2_model_ready(self, request: web.Request) -> web.Response:
        status = await self._model(request)
        return json_response({"name": status.spec.name, "ready": status.ready}, 200 if status.ready else 400)

    async def v2_model_metadata(self, request: web.Request) -> web.Response:
        with observe(self.metrics, "http.v2.metadata", request.match_info["model"]):
            return json_response(oip.model_metadata((await self._model(request)).spec))

    async def v2_model_config(self, request: web.Request) -> web.Response:
        with observe(self.metrics, "http.v2.config", request.match_info["model"]):
            spec = (await self._model(request)).spec
            cfg = oip.gateway_model_config(spec, self.settings.max_images_per_request)
            return json_response(json_format.MessageToDict(cfg, preserving_proto_field_name=True))

    async def v2_repository_index(self, request: web.Request) -> web.Response:
        with observe(self.metrics, "http.v2.index", ""):
            body = await read_body(request, self.settings.max_message_bytes)
            only_ready = bool(parse_json_object(body, "request body").get("ready", False)) if body.strip() else False
            control = self.dataplane.model_control
            if control is not None:   # the embedded backend: unloaded repository models are listed too
                return json_response([{"name": e.name, "version": e.version, "state": e.state, "reason": e.reason}
                                      for e in await control.index() if not only_ready or e.state == "READY"])
            statuses = sorted(await self.dataplane.list_models(), key=lambda s: s.spec.name)
            return json_response([{"name": s.spec.name, "version": str(s.spec.version),
                                   "state": "READY" if s.ready else "UNAVAILABLE"}
                                  for s in statuses if not only_ready or s.ready])

    async def v2_repository_model(self, action: str, request: web.Request) -> web.Response:
        """POST /v2/repository/models/{model}/load|unload (--model-control-mode explicit)."""
        model = request.match_info["model"]
        with observe(self.metrics, f"http.v2.{action}", model):
            body = await read_body(request, self.settings.max_message_bytes)
            if body.strip():
                parse_json_object(body, "request body")   # Triton's optional {"parameters": ...}
            await repository_call(self.dataplane, action, model)
            return json_response({})

    async def v2_infer(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        with observe(self.metrics, "http.v2.infer", model):
            await self._model(request)  # unknown model: 404 before looking at the body
            body = await read_body(request, self.settings.max_message_bytes)
            header_len = request.headers.get(HEADER_LENGTH)
            if header_len is None:
                head, binary = body, b""
            else:
                try:
                    n = int(header_len)
                except ValueError:
                    raise InvalidInput(f"{HEADER_LENGTH} must be an integer, not {header_len!r}") from None
                if not 0 <= n <= len(body):
                    raise InvalidInput(f"{HEADER_LENGTH} is {n} but the body has {len(body)} bytes")
                head, binary = body[:n], body[n:]
            doc = parse_json_object(head, "inference request header")
            images = v2_images(doc, binary)
            outputs, binary_default = v2_outputs(doc)
            params = doc.get("parameters") or {}
            if not isinstance(params, dict):
                raise InvalidInput("request 'parameters' must be a JSON object")
            timeout_us = oip.request_timeout(params)
            outcome = await oip.infer(self.dataplane, model, request.match_info.get("version", ""), images,
                                      params=params, outputs=outputs,
                                      deadline=oip.deadline_from(request_deadline(request), timeout_us))
            return v2_response(outcome, doc.get("id"), binary_default)

    # ---- operations

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        body, content_type = self.metrics.exposition(request.headers.get("Accept"))
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    async def openapi(self, request: web.Request) -> web.Response:
        if self._openapi is None:
            self._openapi = dumps(build_openapi(oip.server_version()))
        return web.Response(body=self._openapi, content_type=JSON)

    async def healthz(self, request: web.Request) -> web.Response:
        return json_response({"status": "live"})

    async def readyz(self, request: web.Request) -> web.Response:
        ready = await self.readiness()
        return json_response({"status": "ready" if ready else "not ready"}, 200 if ready else 503)


def create_app(dataplane: DataPlane, metrics: Metrics, settings: Settings,
               readiness: Readiness | None = None, auth: AuthPolicy | None = None) -> web.Application:
    """The aiohttp application; the body limit is settings.max_message_bytes (413 beyond it).

    With ``auth`` every route outside its exemptions needs a bearer token (401 otherwise).
    """
    api = HttpApi(dataplane, metrics, settings, readiness)
    middlewares = [error_middleware] + ([auth_middleware(auth)] if auth is not None else [])
    app = web.Application(middlewares=middlewares, client_max_size=settings.max_message_bytes)
    app[BODY_TIMEOUT_KEY] = settings.http_body_timeout_s
    r = app.router
    for handler in HANDLERS.values():
        r.add_post(f"/v1/{handler.v1_method.lower()}", api.v1_route(handler))
    r.add_get("/v1/models", api.list_models)
    r.add_get("/v2", api.v2_server_metadata)
    r.add_get("/v2/health/live", api.v2_live)
    r.add_get("/v2/health/ready", api.v2_ready)
    r.add_post("/v2/repository/index", api.v2_repository_index)
    for action in ("load", "unload"):
        r.add_post(f"/v2/repository/models/{{model}}/{action}", functools.partial(api.v2_repository_model, action))
    for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        r.add_get(base, api.v2_model_metadata)
        r.add_get(base + "/ready", api.v2_model_ready)
        r.add_get(base + "/config", api.v2_model_config)
        r.add_post(base + "/infer", api.v2_infer)
    r.add_get("/metrics", api.metrics_endpoint)
    r.add_get("/openapi.json", api.openapi)
    r.add_get("/healthz", api.healthz)
    r.add_get("/readyz", api.readyz)
    return app

