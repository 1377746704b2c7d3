"""Bad requests get the right gRPC status / HTTP status and JSON error, and never hurt the gateway.

After every bad request a good one must still succeed, and the process must be alive.
"""
from __future__ import annotations

import base64
import io
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from clients.proto.imgserve.v1 import imgserve_pb2 as pb
from clients.proto.imgserve.v1 import imgserve_pb2_grpc as pb_grpc
from tests.procs import GatewayProcess, run_gateway

MAX_IMAGES = 8
MAX_MESSAGE_MB = 1


def png(size: tuple[int, int] = (28, 28), seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(size[1], size[0]), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


GOOD = png()
TRUNCATED = GOOD[: len(GOOD) // 2]
TEXT = b"this is not an image, just some text\n"


@pytest.fixture(scope="module")
def gateway(model_repo: Path) -> Iterator[GatewayProcess]:
    args = ["--max-images-per-request", str(MAX_IMAGES), "--max-message-mb", str(MAX_MESSAGE_MB),
            "--preprocess-threads", "1", "--backend-threads", "1"]
    with run_gateway(model_repo, extra_args=args) as gw:
        yield gw


@pytest.fixture(scope="module")
def stub(gateway: GatewayProcess) -> Iterator[pb_grpc.ImageServiceStub]:
    with grpc.insecure_channel(gateway.grpc_target) as channel:
        yield pb_grpc.ImageServiceStub(channel)


def post(url: str, body: bytes, content_type: str | None = "application/json",
         method: str = "POST") -> tuple[int, dict[str, str], bytes]:
    headers = {"Content-Type": content_type} if content_type else {}
    request = urllib.request.Request(url, data=body if method == "POST" else None, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def classify_body(images: list[bytes], model: str = "lenet5", **extra: object) -> bytes:
    return json.dumps({"model": model, "images": [base64.b64encode(i).decode() for i in images], **extra}).encode()


def assert_good_grpc(stub: pb_grpc.ImageServiceStub, gateway: GatewayProcess) -> None:
    response = stub.Classify(pb.ClassifyRequest(model="lenet5", images=[GOOD]), timeout=30)
    assert len(response.results) == 1 and len(response.results[0].classes) == 5
    assert gateway.alive()


def assert_good_http(gateway: GatewayProcess) -> None:
    status, _, body = post(f"{gateway.http_url}/v1/classify", classify_body([GOOD], topK=2))
    assert status == 200, body
    assert len(json.loads(body)["results"][0]["classes"]) == 2
    assert gateway.alive()


GRPC_CASES = [
    # (id, request, expected code, text the message must contain)
    ("empty-bytes", pb.ClassifyRequest(model="lenet5", images=[b""]), grpc.StatusCode.INVALID_ARGUMENT, "image 0"),
    ("truncated-png", pb.ClassifyRequest(model="lenet5", images=[GOOD, TRUNCATED]),
     grpc.StatusCode.INVALID_ARGUMENT, "image 1"),
    ("text-bytes", pb.ClassifyRequest(model="lenet5", images=[TEXT]), grpc.StatusCode.INVALID_ARGUMENT, "image 0"),
    ("unknown-model", pb.ClassifyRequest(model="nope", images=[GOOD]), grpc.StatusCode.NOT_FOUND, "nope"),
    ("no-model", pb.ClassifyRequest(images=[GOOD]), grpc.StatusCode.INVALID_ARGUMENT, "field 'model'"),
    ("top-k-0", pb.ClassifyRequest(model="lenet5", images=[GOOD], top_k=0), grpc.StatusCode.INVALID_ARGUMENT,
     "top_k"),
    ("top-k-negative", pb.ClassifyRequest(model="lenet5", images=[GOOD], top_k=-1),
     grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
    ("no-images", pb.ClassifyRequest(model="lenet5"), grpc.StatusCode.INVALID_ARGUMENT, "image"),
    ("too-many-images", pb.ClassifyRequest(model="lenet5", images=[GOOD] * (MAX_IMAGES + 1)),
     grpc.StatusCode.INVALID_ARGUMENT, str(MAX_IMAGES)),
]


@pytest.mark.parametrize("request_, code, text", [c[1:] for c in GRPC_CASES], ids=[c[0] for c in GRPC_CASES])
def test_grpc_bad_request(stub: pb_grpc.ImageServiceStub, gateway: GatewayProcess,
                          request_: pb.ClassifyRequest, code: grpc.StatusCode, text: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.Classify(request_, timeout=30)
    assert info.value.code() == code, info.value.details()
    assert text in info.value.details()
    assert_good_grpc(stub, gateway)


def test_grpc_message_over_the_size_limit(stub: pb_grpc.ImageServiceStub, gateway: GatewayProcess) -> None:
    huge = b"\x00" * (MAX_MESSAGE_MB * 1024 * 1024 + 1)
    with pytest.raises(grpc.RpcError) as info:
        stub.Classify(pb.ClassifyRequest(model="lenet5", images=[huge]), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_good_grpc(stub, gateway)


def test_grpc_top_k_unset_means_default_and_large_is_clamped(stub: pb_grpc.ImageServiceStub) -> None:
    assert len(stub.Classify(pb.ClassifyRequest(model="lenet5", images=[GOOD])).results[0].classes) == 5
    assert len(stub.Classify(pb.ClassifyRequest(model="lenet5", images=[GOOD], top_k=1000)).results[0].classes) == 10


HTTP_CASES = [
    # (id, body, content type, status, code, text)
    ("empty-bytes", classify_body([b""]), "application/json", 400, "INVALID_ARGUMENT", "image 0"),
    ("truncated-png", classify_body([TRUNCATED]), "application/json", 400, "INVALID_ARGUMENT", "image 0"),
    ("text-bytes", classify_body([GOOD, TEXT]), "application/json", 400, "INVALID_ARGUMENT", "image 1"),
    ("unknown-model", classify_body([GOOD], model="nope"), "application/json", 404, "NOT_FOUND", "nope"),
    ("no-model", json.dumps({"images": [base64.b64encode(GOOD).decode()]}).encode(), "application/json", 400,
     "INVALID_ARGUMENT", "field 'model'"),
    ("empty-model", classify_body([GOOD], model=""), "application/json", 400, "INVALID_ARGUMENT", "field 'model'"),
    ("top-k-0", classify_body([GOOD], topK=0), "application/json", 400, "INVALID_ARGUMENT", "top_k"),
    ("top-k-negative", classify_body([GOOD], top_k=-1), "application/json", 400, "INVALID_ARGUMENT", "top_k"),
    ("too-many-images", classify_body([GOOD] * (MAX_IMAGES + 1)), "application/json", 400, "INVALID_ARGUMENT",
     str(MAX_IMAGES)),
    ("malformed-json", b'{"model": "lenet5", "images": [', "application/json", 400, "INVALID_ARGUMENT", "JSON"),
    ("json-array", b"[1, 2]", "application/json", 400, "INVALID_ARGUMENT", "ClassifyRequest"),
    ("unknown-field", b'{"model": "lenet5", "imagez": []}', "application/json", 400, "INVALID_ARGUMENT", "imagez"),
    ("bad-base64", b'{"model": "lenet5", "images": ["abcde"]}', "application/json", 400, "INVALID_ARGUMENT",
     "images"),
    # protobuf alone would drop the stray characters and blame the image format
    ("base64-with-junk", json.dumps({"model": "lenet5", "images": [base64.b64encode(GOOD).decode()[:40] + "!!"
                                                                     + base64.b64encode(GOOD).decode()[40:]]}).encode(),
     "application/json", 400, "INVALID_ARGUMENT", "image 0 (images[0]) is not valid base64: character '!'"),
    ("base64-line-breaks", json.dumps({"model": "lenet5", "images": [base64.encodebytes(GOOD).decode()]}).encode(),
     "application/json", 400, "INVALID_ARGUMENT", "not valid base64: character '\\n'"),
    ("top-k-string", b'{"model": "lenet5", "images": [], "topK": "many"}', "application/json", 400,
     "INVALID_ARGUMENT", "topK"),
    ("not-utf8", b'{"model": "\xff"}', "application/json", 400, "INVALID_ARGUMENT", "UTF-8"),
    ("wrong-content-type", classify_body([GOOD]), "text/plain", 415, "INVALID_ARGUMENT", "Content-Type"),
    ("form-content-type", classify_body([GOOD]), "application/x-www-form-urlencoded", 415, "INVALID_ARGUMENT",
     "application/json"),
]


@pytest.mark.parametrize("body, ctype, status, code, text", [c[1:] for c in HTTP_CASES],
                         ids=[c[0] for c in HTTP_CASES])
def test_http_bad_request(gateway: GatewayProcess, body: bytes, ctype: str, status: int, code: str,
                          text: str) -> None:
    got_status, headers, raw = post(f"{gateway.http_url}/v1/classify", body, ctype)
    assert got_status == status, raw
    assert headers["Content-Type"].startswith("application/json")
    error = json.loads(raw)["error"]
    assert error["code"] == code
    assert text in error["message"], error["message"]
    assert_good_http(gateway)


def test_http_body_over_the_size_limit(gateway: GatewayProcess) -> None:
    body = classify_body([b"\x00" * (MAX_MESSAGE_MB * 1024 * 1024)])
    status, _, raw = post(f"{gateway.http_url}/v1/classify", body)
    assert status == 413
    assert json.loads(raw)["error"]["code"] == "RESOURCE_EXHAUSTED"
    assert_good_http(gateway)


@pytest.mark.parametrize("method, path, status, code", [
    ("GET", "/no/such/route", 404, "NOT_FOUND"),
    ("GET", "/v1/classify", 405, "UNIMPLEMENTED"),
    ("POST", "/v1/models", 405, "UNIMPLEMENTED"),
])
def test_http_routing_errors_are_json(gateway: GatewayProcess, method: str, path: str, status: int,
                                      code: str) -> None:
    got, headers, raw = post(gateway.http_url + path, b"{}", method=method)
    assert got == status
    assert headers["Content-Type"].startswith("application/json")
    assert json.loads(raw)["error"]["code"] == code


def test_v2_errors_use_the_protocol_shape(gateway: GatewayProcess) -> None:
    """Under /v2 errors are {"error": "message"} so v2 clients can read them."""
    infer = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["not an image"]}]}
    status, _, raw = post(f"{gateway.http_url}/v2/models/nope/infer", json.dumps(infer).encode())
    assert status == 404 and "nope" in json.loads(raw)["error"]
    status, _, raw = post(f"{gateway.http_url}/v2/models/lenet5/infer", json.dumps(infer).encode())
    assert status == 400 and "image 0" in json.loads(raw)["error"]
    status, _, raw = post(f"{gateway.http_url}/v2/models/lenet5/infer", b"{nope")
    assert status == 400 and isinstance(json.loads(raw)["error"], str)
    bad_shape = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": ["x"]}]}
    status, _, raw = post(f"{gateway.http_url}/v2/models/lenet5/infer", json.dumps(bad_shape).encode())
    assert status == 400 and "shape" in json.loads(raw)["error"]
    status, _, raw = post(f"{gateway.http_url}/v2/models/lenet5/versions/999/infer", json.dumps(infer).encode())
    assert status == 404 and "version 999" in json.loads(raw)["error"]
    assert_good_http(gateway)


def test_errors_are_counted_by_code(gateway: GatewayProcess, stub: pb_grpc.ImageServiceStub) -> None:
    with pytest.raises(grpc.RpcError):
        stub.Classify(pb.ClassifyRequest(model="lenet5", images=[TEXT]), timeout=30)
    post(f"{gateway.http_url}/v1/classify", classify_body([GOOD], model="nope"))
    assert gateway.alive()
    status, _, raw = post(f"{gateway.http_url}/metrics", b"", method="GET")
    assert status == 200
    text = raw.decode()
    assert 'imgserve_request_errors_total{code="INVALID_ARGUMENT",endpoint="grpc.Classify",model="lenet5"}' in text
    # unknown model names never become label values (bounded series)
    assert 'imgserve_request_errors_total{code="NOT_FOUND",endpoint="http.classify",model="(unknown)"}' in text
    assert 'model="nope"' not in text
    # client mistakes are answered, not logged as crashes
    assert "Traceback" not in gateway.stderr(), gateway.stderr()[-3000:]


def queue_depth(gw: GatewayProcess, model: str = "lenet5") -> float:
    status, _, body = post(f"{gw.http_url}/metrics", b"", method="GET")
    assert status == 200
    for line in body.decode().splitlines():
        if line.startswith(f'imgserve_queue_depth{{model="{model}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_for_depth(gw: GatewayProcess, depth: float) -> None:
    deadline = time.monotonic() + 120   # only turns a hang into a failure
    while queue_depth(gw) != depth:
        assert time.monotonic() < deadline, f"queue depth never reached {depth}"
        time.sleep(0.02)


def test_errors_before_the_model_is_known_count_as_unknown(gateway: GatewayProcess,
                                                           stub: pb_grpc.ImageServiceStub) -> None:
    """A body that does not parse, or names no model, is recorded as model="(unknown)", never model=""."""
    post(f"{gateway.http_url}/v1/classify", b"{not json")
    post(f"{gateway.http_url}/v1/classify", classify_body([GOOD]), "text/plain")
    with pytest.raises(grpc.RpcError):
        stub.Classify(pb.ClassifyRequest(images=[GOOD]), timeout=30)
    text = post(f"{gateway.http_url}/metrics", b"", method="GET")[2].decode()
    for code, endpoint in (("INVALID_ARGUMENT", "http.classify"), ("INVALID_ARGUMENT", "grpc.Classify")):
        assert f'imgserve_request_errors_total{{code="{code}",endpoint="{endpoint}",model="(unknown)"}}' in text
    assert not [line for line in text.splitlines()
                if line.startswith("imgserve_request_errors_total") and 'model=""' in line and "classify" in line.lower()]


@pytest.mark.parametrize("timeout, status, code", [
    ("abc", 400, "INVALID_ARGUMENT"),
    ("-1", 400, "INVALID_ARGUMENT"),
    ("1e-9", 504, "DEADLINE_EXCEEDED"),   # already late when it reaches the queue: dropped before compute
])
def test_http_request_timeout_header(gateway: GatewayProcess, timeout: str, status: int, code: str) -> None:
    request = urllib.request.Request(f"{gateway.http_url}/v1/classify", data=classify_body([GOOD]), method="POST",
                                     headers={"Content-Type": "application/json", "X-Request-Timeout": timeout})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            got_status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        got_status, raw = err.code, err.read()
    assert got_status == status, raw
    assert json.loads(raw)["error"]["code"] == code
    assert_good_http(gateway)
