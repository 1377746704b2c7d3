"""Wire protocols in front of the DataPlane: imgserve.v1 and Open Inference Protocol (v2) over gRPC and HTTP.

grpc_v1 / grpc_v2 hold the gRPC servicers, http the aiohttp application (v1 JSON
mirror, v2 REST, /metrics, /openapi.json, health), oip the v2 logic both v2
bindings share. Transports only translate; every decision lives in the DataPlane.
"""
