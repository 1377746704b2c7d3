"""A client pointed at the wrong kind of port fails with a one-line hint, never with the other side's bytes.

Needs no model: a bare gRPC server stands in for the gateway's gRPC port, a bare aiohttp
server for its HTTP port.
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from aiohttp import web

from clients.sdk import AsyncImageClient, ImageClient, Unavailable


@pytest.fixture(scope="module")
def grpc_port() -> Iterator[int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(None)


@pytest.fixture(scope="module")
def http_port() -> Iterator[int]:
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(web.Application())
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
    port = int(runner.addresses[0][1])
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield port
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    loop.run_until_complete(runner.cleanup())
    loop.close()


def assert_hint(exc: Unavailable, *fragments: str) -> None:
    message = str(exc)
    assert "\n" not in message and all(ch.isprintable() for ch in message), repr(message)
    for fragment in fragments:
        assert fragment in message, message


def test_http_client_on_a_grpc_port(grpc_port: int) -> None:
    with ImageClient(f"http://127.0.0.1:{grpc_port}", timeout=10) as client, pytest.raises(Unavailable) as info:
        client.models()
    assert_hint(info.value, "did not answer HTTP/1.1", "--server HOST:PORT without http://")


def test_async_http_client_on_a_grpc_port(grpc_port: int) -> None:
    async def call() -> None:
        async with AsyncImageClient(f"http://127.0.0.1:{grpc_port}", timeout=10) as client:
            await client.models()

    with pytest.raises(Unavailable) as info:
        asyncio.run(call())
    assert_hint(info.value, "did not answer HTTP/1.1", "--http-port")


def test_grpc_client_on_an_http_port(http_port: int) -> None:
    with ImageClient(f"127.0.0.1:{http_port}", timeout=10) as client, pytest.raises(Unavailable) as info:
        client.models()
    assert_hint(info.value, "speaks HTTP/1.1, not gRPC", "--server http://HOST:PORT")
