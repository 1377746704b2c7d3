"""/openapi.json documents every HTTP route, and real responses validate against its schemas."""
from __future__ import annotations

import base64
import io
import json
import re
import struct
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from PIL import Image

from serving.backends.onnxruntime import OnnxRuntimeBackend
from serving.dataplane import DataPlane
from serving.metrics import Metrics
from serving.settings import Settings
from serving.transports.http import create_app
from serving.transports.openapi import build_openapi
from tests.procs import GatewayProcess, run_gateway


def fetch(url: str, body: dict | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def validator(doc: dict, schema_name: str) -> jsonschema.Draft202012Validator:
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": doc["components"]}
    return jsonschema.Draft202012Validator(schema)


def refs(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


def test_document_structure_and_refs() -> None:
    doc = build_openapi("1.2.3")
    assert doc["openapi"].startswith("3.1") and doc["info"]["version"] == "1.2.3"
    schemas = doc["components"]["schemas"]
    for ref in set(refs(doc)):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref
    operation_ids = [op["operationId"] for item in doc["paths"].values() for op in item.values()]
    assert len(operation_ids) == len(set(operation_ids))
    for item in doc["paths"].values():
        for op in item.values():
            assert op["responses"], op["operationId"]
    jsonschema.Draft202012Validator.check_schema({"components": doc["components"]})
    # the v1 schemas follow the proto3 JSON mapping (lowerCamelCase)
    assert set(schemas["ClassifyRequest"]["properties"]) == {"model", "images", "topK", "tenCrop"}


def test_every_route_is_documented() -> None:
    settings = Settings()
    app = create_app(DataPlane(settings, OnnxRuntimeBackend(settings), Metrics()), Metrics(), settings)
    documented = build_openapi("x")["paths"]
    for route in app.router.routes():
        if route.method == "HEAD":
            continue
        path = route.resource.canonical if route.resource is not None else ""
        assert path in documented, f"{route.method} {path} is not in /openapi.json"
        assert route.method.lower() in documented[path], f"{route.method} {path}"
    for path in documented:
        assert re.fullmatch(r"/[\w/{}.]*", path)


@pytest.fixture(scope="module")
def gateway(model_repo: Path) -> Iterator[GatewayProcess]:
    with run_gateway(model_repo, extra_args=["--preprocess-threads", "1", "--backend-threads", "1"]) as gw:
        yield gw


def test_live_responses_match_the_served_document(gateway: GatewayProcess) -> None:
    status, doc = fetch(f"{gateway.http_url}/openapi.json")
    assert status == 200 and doc["paths"]["/v1/classify"]["post"]["operationId"] == "classify"
    buf = io.BytesIO()
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(buf, format="PNG")
    request = {"model": "lenet5", "images": [base64.b64encode(buf.getvalue()).decode()], "topK": 3}
    validator(doc, "ClassifyRequest").validate(request)
    status, body = fetch(f"{gateway.http_url}/v1/classify", request)
    assert status == 200
    validator(doc, "ClassifyResponse").validate(body)
    status, body = fetch(f"{gateway.http_url}/v1/models")
    assert status == 200
    validator(doc, "ListModelsResponse").validate(body)
    status, body = fetch(f"{gateway.http_url}/v1/classify", {"model": "nope", "images": request["images"]})
    assert status == 404
    validator(doc, "Error").validate(body)
    status, body = fetch(f"{gateway.http_url}/v2/models/lenet5")
    validator(doc, "V2ModelMetadata").validate(body)
    status, body = fetch(f"{gateway.http_url}/v2")
    validator(doc, "V2ServerMetadata").validate(body)
    v2_request = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["not a png"]}]}
    validator(doc, "V2InferenceRequest").validate(v2_request)
    status, body = fetch(f"{gateway.http_url}/v2/models/lenet5/infer", v2_request)
    assert status == 400
    validator(doc, "V2Error").validate(body)
    # binary-tensor extension by hand: JSON header + length-prefixed PNG, JSON output
    blob = struct.pack("<I", len(buf.getvalue())) + buf.getvalue()
    head = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                   "parameters": {"binary_data_size": len(blob)}}],
                       "outputs": [{"name": "probabilities", "parameters": {"binary_data": False}}]}).encode()
    raw = urllib.request.Request(f"{gateway.http_url}/v2/models/lenet5/infer", data=head + blob,
                                 headers={"Inference-Header-Content-Length": str(len(head)),
                                          "Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(raw, timeout=30) as resp:
        assert "Inference-Header-Content-Length" not in resp.headers
        body = json.loads(resp.read())
    validator(doc, "V2InferenceResponse").validate(body)
    assert body["outputs"][0]["shape"] == [1, 10] and len(body["outputs"][0]["data"]) == 10
    # a schema violation is caught: the validators are not vacuous
    with pytest.raises(jsonschema.ValidationError):
        validator(doc, "ClassifyResponse").validate({"model": "lenet5"})
