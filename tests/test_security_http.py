"""Slow HTTP clients cannot hold connections: header, body and keep-alive timeouts, over raw sockets.

A slowloris client sends its request head a byte at a time; a slow-body client promises a
body it never finishes; an idle keep-alive client just sits there. Each must be cut off at
its limit (the settings are shrunk to fractions of a second), while a normal client on the
same gateway is served. serving/transports/http_server.py reaches into aiohttp's
RequestHandler; these tests are what notices if an aiohttp upgrade breaks that.
"""
from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest

from tests.fakes import ScriptedBackend, running_gateway

pytestmark = pytest.mark.timeout(60)

LIMITS = {"http_header_timeout_s": 0.5, "http_body_timeout_s": 0.5, "http_keepalive_timeout_s": 0.8}


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.settimeout(5)
    return sock


def _closed_after(sock: socket.socket, dribble: bytes = b"", every_s: float = 0.1, limit_s: float = 5.0) -> float:
    """Send ``dribble`` a byte per ``every_s`` until the server closes; seconds it took (inf: never)."""
    start = time.monotonic()
    i = 0
    while time.monotonic() - start < limit_s:
        try:
            if i < len(dribble):
                sock.sendall(dribble[i:i + 1])
                i += 1
            sock.settimeout(every_s)
            try:
                if sock.recv(65536) == b"":
                    return time.monotonic() - start
            except TimeoutError:
                continue
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - start
    return float("inf")


def _read_response(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    sock.settimeout(5)
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(head.split(b" ")[1]), body


def slowloris(port: int) -> float:
    with _connect(port) as sock:
        return _closed_after(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100)


def silent(port: int) -> float:
    with _connect(port) as sock:
        return _closed_after(sock)


def slow_body(port: int) -> tuple[int, bytes, float]:
    with _connect(port) as sock:
        sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"model\": ")
        status, body = _read_response(sock)
        return status, body, _closed_after(sock)


def idle_keepalive(port: int) -> tuple[int, float]:
    with _connect(port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _ = _read_response(sock)
        return status, _closed_after(sock)


def keepalive_reuse(port: int) -> list[int]:
    """Three requests on one connection, each sent promptly: all served."""
    statuses = []
    with _connect(port) as sock:
        for _ in range(3):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            statuses.append(_read_response(sock)[0])
            time.sleep(0.3)  # idle, but under the keep-alive limit
    return statuses


async def test_slow_headers_are_cut_off_at_the_header_timeout() -> None:
    # keep-alive far longer than the test: only the header timeout can cut these connections
    async with running_gateway(ScriptedBackend(), **{**LIMITS, "http_keepalive_timeout_s": 30.0}) as gw:
        took = await asyncio.gather(*(asyncio.to_thread(slowloris, gw.http_port) for _ in range(20)),
                                    asyncio.to_thread(silent, gw.http_port))
        assert all(0.4 <= t <= 2.5 for t in took), took
        assert await asyncio.to_thread(keepalive_reuse, gw.http_port) == [200, 200, 200]


async def test_slow_body_gets_408_and_the_connection_closes() -> None:
    async with running_gateway(ScriptedBackend(), **LIMITS) as gw:
        status, body, closed_after = await asyncio.to_thread(slow_body, gw.http_port)
        assert status == 408
        error = json.loads(body)["error"]
        assert error["code"] == "DEADLINE_EXCEEDED" and "--http-body-timeout-s" in error["message"]
        assert closed_after < 0.5  # closed once the 408 is out, no lingering for the rest of the body


async def test_idle_keepalive_connection_is_closed() -> None:
    async with running_gateway(ScriptedBackend(), **LIMITS) as gw:
        status, closed_after = await asyncio.to_thread(idle_keepalive, gw.http_port)
        assert status == 200 and closed_after <= 2.5, closed_after
