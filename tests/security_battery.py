"""The TLS-and-auth battery behind docs/reliability.md: every refused case, its status, how long it took.

One in-process gateway per configuration (tests/fakes.py over a ScriptedBackend; the
figures are about the doors, not the model), certificates from tests/certs.py. Each case
records the status a client saw. tests/test_security_battery.py asserts every row is the
expected one; run it as a script to print the table that docs/reliability.md holds:

    PYTHONPATH=. .venv/bin/python -m tests.security_battery
"""
from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.sdk import ImageClient, ImgserveError
from tests.certs import Pki, make_pki
from tests.fakes import ScriptedBackend, grey_png, running_gateway

TOKEN = "battery-token-0123456789"
NEXT_TOKEN = "battery-token-rotated-987654"
IMAGE = grey_png(4)


@dataclass(frozen=True)
class Row:
    case: str
    door: str
    expected: str
    got: str
    ms: float

    @property
    def ok(self) -> bool:
        return self.got == self.expected


def _sdk(target: str, **options: object) -> str:
    try:
        with ImageClient(target, timeout=10, retries=0, **options) as client:  # type: ignore[arg-type]
            client.classify(IMAGE, "tiny", top_k=1)
        return "OK"
    except ImgserveError as exc:
        return exc.code


def _http(url: str, token: str | None = None, context: object = None) -> str:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))  # type: ignore[arg-type]
    try:
        with urllib.request.build_opener(*handlers).open(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return str(r.status)
    except urllib.error.HTTPError as exc:
        return str(exc.code)
    except (urllib.error.URLError, OSError) as exc:
        return f"refused ({type(getattr(exc, 'reason', exc)).__name__})"


async def _grpc_raw(target: str, method: str, payload: bytes, token: str | None = None) -> str:
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    async with grpc.aio.insecure_channel(target) as channel:
        try:
            await channel.unary_unary(method)(payload, timeout=5, metadata=metadata)
            return "OK"
        except grpc.aio.AioRpcError as exc:
            return exc.code().name


async def _health(target: str) -> str:
    async with grpc.aio.insecure_channel(target) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name


def _slow(port: int, request: bytes, dribble: bool, limit_s: float) -> str:
    """Whether the gateway closes a connection that sends ``request`` (a byte every 0.1 s if dribble)
    within ``limit_s`` (+0.5 s of slack for a loaded machine); the first answer's status if any."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        if not dribble:
            sock.sendall(request)
        i = 0
        first = b""
        while time.monotonic() - start < 30:
            if dribble and i < len(request):
                sock.sendall(request[i:i + 1])
                i += 1
            sock.settimeout(0.1)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                break
            if not chunk:
                break
            first = first or chunk
    status = first.split(b" ")[1].decode() + ", " if first else ""
    took = time.monotonic() - start
    return f"{status}closed" + (f" within {limit_s:g} s" if took <= limit_s + 0.5 else f" after {took:.1f} s")


async def battery(workdir: Path) -> list[Row]:
    pki: Pki = make_pki(workdir)
    rows: list[Row] = []

    async def case(name: str, door: str, expected: str, probe: Callable[[], Awaitable[str]]) -> None:
        start = time.perf_counter()
        got = await probe()
        rows.append(Row(name, door, expected, got, (time.perf_counter() - start) * 1000))

    def sync(fn: Callable[..., str], *args: object, **kw: object) -> Callable[[], Awaitable[str]]:
        return lambda: asyncio.to_thread(fn, *args, **kw)

    tokens = workdir / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    async with running_gateway(ScriptedBackend(), auth_token_file=str(tokens)) as gw:
        g, h = f"127.0.0.1:{gw.grpc_port}", f"http://127.0.0.1:{gw.http_port}"
        for door, target in (("gRPC", g), ("HTTP", h)):
            await case("no token", door, "UNAUTHENTICATED", sync(_sdk, target))
            await case("wrong token", door, "UNAUTHENTICATED", sync(_sdk, target, token="not-the-token-000000"))
            await case("right token", door, "OK", sync(_sdk, target, token=TOKEN))
        await case("no token, HTTP status", "HTTP", "401", sync(_http, h + "/v1/models"))
        await case("v2 repository index, no token", "HTTP", "401", sync(_http, h + "/v2/models/tiny"))
        await case("v2 RepositoryIndex, no token", "gRPC", "UNAUTHENTICATED",
                   lambda: _grpc_raw(g, "/inference.GRPCInferenceService/RepositoryIndex", b""))
        await case("malformed protobuf, no token (never parsed)", "gRPC", "UNAUTHENTICATED",
                   lambda: _grpc_raw(g, "/imgserve.v1.ImageService/Classify", b"\xff\xff\xff"))
        for path in ("/healthz", "/readyz", "/v2/health/ready", "/metrics"):
            await case(f"{path}, no token", "HTTP", "200", sync(_http, h + path))
        await case("grpc.health.v1 Check, no token", "gRPC", "SERVING", lambda: _health(g))
        # rotation: the file now holds a new token; the old one stops working within a second
        fresh = workdir / "tokens.new"
        fresh.write_text(f"{NEXT_TOKEN}\n")
        os.replace(fresh, tokens)
        await asyncio.sleep(1.1)
        await case("rotated-out token", "gRPC", "UNAUTHENTICATED", sync(_sdk, g, token=TOKEN))
        await case("rotated-in token", "HTTP", "OK", sync(_sdk, h, token=NEXT_TOKEN))

    async with running_gateway(ScriptedBackend()) as gw:
        g = f"127.0.0.1:{gw.grpc_port}"
        for method in ("/imgserve.v1.ImageService/Classify", "/inference.GRPCInferenceService/ModelInfer"):
            await case(f"malformed protobuf to {method.rsplit('/', 1)[1]}", "gRPC", "INVALID_ARGUMENT",
                       lambda m=method: _grpc_raw(g, m, b"\x0a\xff\xff\xff\xff\x0f"))  # type: ignore[misc]

    async with running_gateway(ScriptedBackend(), tls_cert=str(pki.server_cert), tls_key=str(pki.server_key),
                               tls_client_ca=str(pki.ca)) as gw:
        g, h = f"127.0.0.1:{gw.grpc_port}", f"https://127.0.0.1:{gw.http_port}"
        good = {"ca_file": str(pki.ca), "client_cert": str(pki.client_cert), "client_key": str(pki.client_key)}
        await case("mTLS, good client certificate", "gRPC", "OK", sync(_sdk, g, **good))
        await case("mTLS, no client certificate", "gRPC", "UNAVAILABLE", sync(_sdk, g, ca_file=str(pki.ca)))
        await case("mTLS, expired client certificate", "gRPC", "UNAVAILABLE",
                   sync(_sdk, g, ca_file=str(pki.ca), client_cert=str(pki.expired_client_cert),
                        client_key=str(pki.expired_client_key)))
        await case("mTLS, client certificate of another CA", "gRPC", "UNAVAILABLE",
                   sync(_sdk, g, ca_file=str(pki.ca), client_cert=str(pki.stranger_cert),
                        client_key=str(pki.stranger_key)))
        await case("plaintext client on the TLS port", "gRPC", "UNAVAILABLE", sync(_sdk, g))
        await case("TLS, client trusts another CA", "HTTP", "UNAVAILABLE", sync(_sdk, h, ca_file=str(pki.other_ca)))
        await case("TLS, right CA", "HTTP", "OK", sync(_sdk, h, ca_file=str(pki.ca)))

    async with running_gateway(ScriptedBackend(), tls_cert=str(pki.expired_server_cert),
                               tls_key=str(pki.expired_server_key)) as gw:
        for door, target in (("gRPC", f"127.0.0.1:{gw.grpc_port}"), ("HTTP", f"https://127.0.0.1:{gw.http_port}")):
            await case("expired server certificate", door, "UNAVAILABLE", sync(_sdk, target, ca_file=str(pki.ca)))

    async with running_gateway(ScriptedBackend(), http_header_timeout_s=1.0, http_body_timeout_s=1.0,
                               http_keepalive_timeout_s=2.0) as gw:
        port = gw.http_port
        head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 400
        body = (b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000\r\n\r\n{")
        idle = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        await case("slowloris head (a byte per 0.1 s), header timeout 1 s", "HTTP", "closed within 1 s",
                   sync(_slow, port, head, True, 1.0))
        await case("slow body, body timeout 1 s", "HTTP", "408, closed within 1 s",
                   sync(_slow, port, body, False, 1.0))
        await case("idle keep-alive, keep-alive timeout 2 s", "HTTP", "200, closed within 2 s",
                   sync(_slow, port, idle, False, 2.0))
    return rows


def table(rows: list[Row]) -> str:
    lines = ["| case | door | expected | got | ms |", "|---|---|---|---|---:|"]
    lines += [f"| {r.case} | {r.door} | {r.expected} | {r.got}{'' if r.ok else ' **(!)**'} | {r.ms:.0f} |"
              for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(battery(Path(tmp)))
    print(table(result))
    print(f"\n{sum(r.ok for r in result)} of {len(result)} as expected")
