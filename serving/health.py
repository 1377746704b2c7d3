"""grpc.health.v1 for a gateway that drains: Watch streams end once they have reported NOT_SERVING.

Why: grpcio's HealthServicer keeps every Watch stream open forever, and a
graceful gRPC stop waits for open streams. A load balancer (or a gRPC client
with client-side health checking, which uses Watch) would then hold every
SIGTERM open for the whole grace period although no request is left. Ending
the stream after NOT_SERVING was sent tells the watcher what it needs (the
backend is going away) and lets the drain finish as soon as requests are done.
"""
from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class DrainingHealthServicer(health.aio.HealthServicer):
    """grpcio's asyncio HealthServicer, except Watch returns after reporting NOT_SERVING during a drain."""

    async def Watch(self, request: health_pb2.HealthCheckRequest,  # noqa: N802 - the gRPC method name
                    context: grpc.aio.ServicerContext) -> None:
        condition = self._server_watchers[request.service]
        last_status = None
        try:
            async with condition:
                while True:
                    status = self._server_status.get(request.service, SERVICE_UNKNOWN)
                    if status != last_status:
                        await context.write(health_pb2.HealthCheckResponse(status=status))
                        last_status = status
                    if self._gracefully_shutting_down and status == NOT_SERVING:
                        return  # the watcher knows; do not hold the server's graceful stop open
                    await condition.wait()
        finally:
            if request.service in self._server_watchers:
                del self._server_watchers[request.service]
