"""The OpenAPI 3.1 document served at ``/openapi.json``.

The imgserve.v1 schemas are derived from the proto descriptors (proto3 JSON
mapping: lowerCamelCase names, bytes as base64 strings), so the document can
never drift from the messages the gateway actually parses and prints. The v2
(Open Inference Protocol) schemas follow the KServe v2 REST specification.
"""
from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from clients.proto.imgserve.v1 import imgserve_pb2 as pb

Schema = dict[str, Any]

_SCALARS: dict[int, Schema] = {
    FieldDescriptor.TYPE_DOUBLE: {"type": "number"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number", "format": "float"},
    FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_UINT32: {"type": "integer", "format": "int32", "minimum": 0},
    FieldDescriptor.TYPE_INT64: {"type": ["string", "integer"], "format": "int64"},
    FieldDescriptor.TYPE_UINT64: {"type": ["string", "integer"], "format": "int64"},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "contentEncoding": "base64"},
}

# Messages the gateway prints: every field without explicit presence is always present.
_RESPONSE_MESSAGES = ("ClassifyResponse", "Classification", "ClassScore", "ListModelsResponse", "ModelInfo",
                      "DetectResponse", "ImageDetections", "Detection", "Box",
                      "SegmentResponse", "ImageSegmentation", "ClassFraction", "ClassRle")
_REQUIRED_IN_REQUESTS = {"ClassifyRequest": ["model", "images"], "DetectRequest": ["model", "images"],
                         "SegmentRequest": ["model", "images"]}
# imgserve.v1 inference methods: (method, request, response, what the response holds)
_V1_METHODS = (
    ("Classify", "ClassifyRequest", "ClassifyResponse", "top-k classes per image, in request order"),
    ("Detect", "DetectRequest", "DetectResponse",
     "boxes in original-image pixels per image, best first, in request order"),
    ("Segment", "SegmentRequest", "SegmentResponse",
     "a palette-PNG class mask at each original image's size, with class fractions, in request order"),
)

V1_CODES = ["INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED",
            "INTERNAL", "UNIMPLEMENTED"]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _field_schema(field: FieldDescriptor) -> Schema:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        item = _ref(field.message_type.name)
    elif field.type == FieldDescriptor.TYPE_ENUM:
        item = {"type": "string", "enum": [v.name for v in field.enum_type.values]}
    else:
        item = dict(_SCALARS[field.type])
    if field.is_repeated:
        return {"type": "array", "items": item}
    return item


def message_schema(desc: Descriptor) -> Schema:
    """JSON Schema of a message's proto3 JSON mapping."""
    props = {f.json_name: _field_schema(f) for f in desc.fields}
    schema: Schema = {"type": "object", "properties": props}
    if desc.name in _RESPONSE_MESSAGES:
        schema["additionalProperties"] = False
        schema["required"] = [f.json_name for f in desc.fields if not f.has_presence or f.is_repeated]
    elif desc.name in _REQUIRED_IN_REQUESTS:
        schema["required"] = _REQUIRED_IN_REQUESTS[desc.name]
    return schema


def _v1_schemas() -> dict[str, Schema]:
    return {name: message_schema(desc) for name, desc in pb.DESCRIPTOR.message_types_by_name.items()
            if name != "ListModelsRequest"}


def _v2_schemas() -> dict[str, Schema]:
    params = {"type": "object", "additionalProperties": {"type": ["string", "number", "integer", "boolean"]}}
    shape = {"type": "array", "items": {"type": "integer"}}
    tensor_meta = {"type": "object", "required": ["name", "datatype", "shape"],
                   "properties": {"name": {"type": "string"}, "datatype": {"type": "string"}, "shape": shape}}
    return {
        "V2Parameters": params,
        "V2Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
        "V2ServerMetadata": {"type": "object", "required": ["name", "version", "extensions"], "properties": {
            "name": {"type": "string"}, "version": {"type": "string"},
            "extensions": {"type": "array", "items": {"type": "string"}}}},
        "V2TensorMetadata": tensor_meta,
        "V2ModelMetadata": {"type": "object", "required": ["name", "versions", "platform", "inputs", "outputs"],
                            "properties": {
                                "name": {"type": "string"},
                                "versions": {"type": "array", "items": {"type": "string"}},
                                "platform": {"type": "string"},
                                "inputs": {"type": "array", "items": _ref("V2TensorMetadata")},
                                "outputs": {"type": "array", "items": _ref("V2TensorMetadata")}}},
        "V2RequestInput": {
            "type": "object", "required": ["name", "shape", "datatype"],
            "description": "The one input 'image': BYTES [N] of encoded images. Either 'data' (UTF-8 strings) or "
                           "parameters.binary_data_size with the bytes in the binary section of the body.",
            "properties": {"name": {"const": "image"}, "shape": shape, "datatype": {"const": "BYTES"},
                           "parameters": _ref("V2Parameters"), "data": {"type": "array"}}},
        "V2RequestOutput": {
            "type": "object", "required": ["name"],
            "properties": {"name": {"const": "probabilities"}, "parameters": {
                "type": "object", "properties": {
                    "classification": {"type": "integer", "minimum": 1,
                                       "description": "return the top-k as BYTES 'score:index:label' strings"},
                    "binary_data": {"type": "boolean"}}}}},
        "V2InferenceRequest": {
            "type": "object", "required": ["inputs"],
            "properties": {
                "id": {"type": "string"},
                "parameters": {"type": "object", "properties": {
                    "ten_crop": {"type": "boolean", "description": "10-crop test-time averaging"},
                    "timeout": {"type": "integer", "description": "server-side deadline in microseconds"},
                    "binary_data_output": {"type": "boolean"}}},
                "inputs": {"type": "array", "items": _ref("V2RequestInput"), "minItems": 1, "maxItems": 1},
                "outputs": {"type": "array", "items": _ref("V2RequestOutput")}}},
        "V2ResponseOutput": {
            "type": "object", "required": ["name", "shape", "datatype"],
            "properties": {"name": {"type": "string"}, "shape": shape, "datatype": {"enum": ["FP32", "BYTES"]},
                           "parameters": _ref("V2Parameters"), "data": {"type": "array"}}},
        "V2InferenceResponse": {
            "type": "object", "required": ["model_name", "outputs"],
            "properties": {"model_name": {"type": "string"}, "model_version": {"type": "string"},
                           "id": {"type": "string"},
                           "outputs": {"type": "array", "items": _ref("V2ResponseOutput")}}},
        "V2ModelConfig": {"type": "object", "description": "Triton ModelConfig (protobuf JSON, field names as in "
                                                            "model_config.proto) of the model as the gateway serves it"},
        "V2RepositoryIndex": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string"}, "version": {"type": "string"}, "state": {"type": "string"}}}},
    }


def _json(schema_name: str, description: str) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": _ref(schema_name)}}}


def _errors(*statuses: int, v2: bool = False) -> dict[str, Schema]:
    name = "V2Error" if v2 else "Error"
    text = {400: "invalid request", 404: "unknown model or route", 413: "body over the size limit",
            415: "wrong Content-Type", 429: "overloaded; see Retry-After", 500: "internal error",
            503: "backend unavailable", 504: "deadline exceeded"}
    return {str(s): _json(name, text[s]) for s in statuses}


def build_openapi(version: str) -> Schema:
    """The whole OpenAPI document."""
    model_param = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
    version_param = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}
    infer_errors = _errors(400, 404, 413, 429, 500, 503, 504, v2=True)
    paths: dict[str, Schema] = {
        f"/v1/{method.lower()}": {"post": {
            "operationId": method[0].lower() + method[1:],
            "summary": f"{method} encoded images (imgserve.v1.ImageService/{method})",
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request)}}},
            "responses": {"200": _json(response, what), **_errors(400, 404, 413, 415, 429, 500, 503, 504)}}}
        for method, request, response, what in _V1_METHODS
    }
    paths |= {
        "/v1/models": {"get": {
            "operationId": "listModels", "summary": "Served models and their preprocessing",
            "responses": {"200": _json("ListModelsResponse", "the models"), **_errors(500, 503)}}},
        "/v2": {"get": {"operationId": "v2ServerMetadata", "summary": "Open Inference Protocol server metadata",
                        "responses": {"200": _json("V2ServerMetadata", "server metadata")}}},
        "/v2/health/live": {"get": {"operationId": "v2Live", "summary": "Liveness",
                                    "responses": {"200": {"description": "live"}}}},
        "/v2/health/ready": {"get": {"operationId": "v2Ready", "summary": "Readiness",
                                     "responses": {"200": {"description": "ready"},
                                                   "400": {"description": "not ready"}}}},
        "/v2/repository/index": {"post": {"operationId": "v2RepositoryIndex", "summary": "Served models",
                                          "responses": {"200": _json("V2RepositoryIndex", "the models")}}},
        **{f"/v2/repository/models/{{model}}/{action}": {"post": {
            "operationId": f"v2Repository{action.capitalize()}", "parameters": [model_param],
            "summary": f"{action.capitalize()} a model (--model-control-mode explicit; docs/reliability.md)",
            "responses": {"200": {"description": f"{action}ed"}, "400": {"description": "not allowed in this mode"},
                          "404": {"description": "no such model in the repository"},
                          "500": {"description": "the new version failed to load; the old one keeps serving"}}}}
           for action in ("load", "unload")},
        "/metrics": {"get": {"operationId": "metrics", "summary": "Prometheus metrics",
                             "responses": {"200": {"description": "Prometheus text exposition",
                                                   "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/healthz": {"get": {"operationId": "healthz", "summary": "Liveness of the process",
                             "responses": {"200": {"description": "live"}}}},
        "/readyz": {"get": {"operationId": "readyz", "summary": "Readiness: the backend can serve",
                            "responses": {"200": {"description": "ready"}, "503": {"description": "not ready"}}}},
        "/openapi.json": {"get": {"operationId": "openapi", "summary": "This document",
                                  "responses": {"200": {"description": "OpenAPI 3.1 document"}}}},
    }
    for suffix, params, tag in (("", [model_param], ""), ("/versions/{version}", [model_param, version_param],
                                                          "Version")):
        base = "/v2/models/{model}" + suffix
        paths[base] = {"get": {"operationId": f"v2ModelMetadata{tag}", "parameters": params,
                               "summary": "Model metadata",
                               "responses": {"200": _json("V2ModelMetadata", "model metadata"),
                                             **_errors(404, v2=True)}}}
        paths[base + "/ready"] = {"get": {"operationId": f"v2ModelReady{tag}", "parameters": params,
                                          "summary": "Model readiness",
                                          "responses": {"200": {"description": "ready"},
                                                        "400": {"description": "not ready"},
                                                        **_errors(404, v2=True)}}}
        paths[base + "/config"] = {"get": {"operationId": f"v2ModelConfig{tag}", "parameters": params,
                                           "summary": "Model configuration (Triton ModelConfig)",
                                           "responses": {"200": _json("V2ModelConfig", "model config"),
                                                         **_errors(404, v2=True)}}}
        paths[base + "/infer"] = {"post": {
            "operationId": f"v2Infer{tag}", "parameters": params, "summary": "Inference",
            "description": "JSON body, or JSON header + binary tensors when the Inference-Header-Content-Length "
                           "header gives the JSON length (binary tensor data extension).",
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": _ref("V2InferenceRequest")},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
            "responses": {"200": {"description": "inference response", "content": {
                "application/json": {"schema": _ref("V2InferenceResponse")},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
                **infer_errors}}}
    schemas = {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["code", "message"],
            "properties": {"code": {"type": "string", "enum": V1_CODES}, "message": {"type": "string"}}}}},
        **_v1_schemas(),
        **_v2_schemas(),
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "imgserve gateway", "version": version,
                 "description": "imgserve.v1 (HTTP/JSON mirror of the gRPC API, proto3 JSON mapping) and the "
                                "Open Inference Protocol (KServe v2) REST binding."},
        "paths": paths,
        "components": {"schemas": schemas},
    }
