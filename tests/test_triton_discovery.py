"""DNS discovery of Triton servers (a Kubernetes headless Service): resolution and the backend's server list."""
from __future__ import annotations

import asyncio

import pytest

from serving.backends.triton import TritonBackend
from serving.backends.triton_discovery import discover, join_host_port, resolve_addresses, split_host_port
from serving.settings import Settings


class FakeDNS:
    """A resolver whose answers the test changes, as pods join and leave a headless Service."""

    def __init__(self, records: dict[str, list[str]]) -> None:
        self.records = records
        self.calls = 0

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls += 1
        if host not in self.records:
            raise OSError(f"NXDOMAIN {host}")
        return list(self.records[host])


def test_host_port_round_trip() -> None:
    assert split_host_port("imgserve-triton:8001") == ("imgserve-triton", 8001)
    assert split_host_port("[fd00::5]:8001") == ("fd00::5", 8001)
    assert join_host_port("10.0.0.5", 8001) == "10.0.0.5:8001"
    assert join_host_port("fd00::5", 8001) == "[fd00::5]:8001"
    with pytest.raises(ValueError):
        split_host_port("imgserve-triton")


async def test_system_resolver_resolves_localhost() -> None:
    assert "127.0.0.1" in await resolve_addresses("localhost", 8001)


async def test_discover_expands_names_and_reports_failures() -> None:
    dns = FakeDNS({"triton": ["10.0.0.2", "10.0.0.1"], "other": ["10.0.1.1"]})
    found = await discover(["triton:8001", "missing:8001", "other:9001"], dns)
    assert found.resolved == {"triton:8001": ["10.0.0.2:8001", "10.0.0.1:8001"], "other:9001": ["10.0.1.1:9001"]}
    assert found.endpoints == ["10.0.0.2:8001", "10.0.0.1:8001", "10.0.1.1:9001"]
    assert set(found.failures) == {"missing:8001"} and "NXDOMAIN" in found.failures["missing:8001"]


async def test_backend_follows_pods_joining_and_leaving() -> None:
    dns = FakeDNS({"triton": ["10.0.0.1"]})
    backend = TritonBackend(Settings(backend="triton", triton_url="triton:8001", triton_resolve_interval_s=5,
                                     request_timeout_s=1), resolver=dns)
    try:
        await backend.rediscover()
        first = backend._servers[0]
        assert [s.url for s in backend.servers()] == ["10.0.0.1:8001"]

        dns.records["triton"] = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]   # scale-out
        await backend.rediscover()
        assert [s.url for s in backend.servers()] == ["10.0.0.1:8001", "10.0.0.2:8001", "10.0.0.3:8001"]
        assert backend._servers[0] is first, "a server that stays keeps its client and health"

        dns.records["triton"] = ["10.0.0.3"]                           # two pods gone
        await backend.rediscover()
        assert [s.url for s in backend.servers()] == ["10.0.0.3:8001"]
        assert len(backend._retired) == 2, "dropped servers' clients close only after in-flight calls had time"

        del dns.records["triton"]                                      # NXDOMAIN: keep what we had
        await backend.rediscover()
        assert [s.url for s in backend.servers()] == ["10.0.0.3:8001"]

        await asyncio.sleep(1.2)                                      # > request_timeout_s: retired clients closed
        assert backend._retired == []
    finally:
        await backend.close()


async def test_backend_without_discovery_uses_urls_as_given() -> None:
    dns = FakeDNS({})
    backend = TritonBackend(Settings(backend="triton", triton_url="127.0.0.1:1", triton_health_interval_s=0.1,
                                     request_timeout_s=1), resolver=dns)
    with pytest.raises(Exception, match="no Triton server is ready"):
        await backend.start()
    assert dns.calls == 0


async def test_start_explains_an_unresolvable_name() -> None:
    backend = TritonBackend(Settings(backend="triton", triton_url="triton:8001", triton_resolve_interval_s=1,
                                     request_timeout_s=1), resolver=FakeDNS({}))
    with pytest.raises(Exception, match=r"triton:8001: cannot resolve \(NXDOMAIN triton\)"):
        await backend.start()


def test_setting_rejects_negative_interval() -> None:
    with pytest.raises(ValueError, match="triton_resolve_interval_s"):
        Settings(backend="triton", triton_url="t:1", triton_resolve_interval_s=-1).validate()
