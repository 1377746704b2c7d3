"""Wire protocols in front of the DataPlane: imgserve.v1 and Open Inference Protocol (v2) over gRPC and HTTP.

* grpc_v1 -- imgserve.v1.ImageService, plus the message conversions the HTTP mirror reuses;
* grpc_v2 -- inference.GRPCInferenceService (KServe v2) on tritonclient's stubs;
* http -- the aiohttp application: /v1 JSON mirror, /v2 REST, /metrics, /openapi.json, health;
* oip -- the v2 semantics both v2 bindings share (tensors, BYTES codec, classification, metadata);
* openapi -- the OpenAPI document; grpc_util, observe -- deadlines, error mapping, request metrics.

Transports only translate; every decision about images and models lives in the DataPlane.
"""
