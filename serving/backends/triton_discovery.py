"""Which Triton servers a Triton URL stands for: one, or every address a DNS name lists.

Why: in Kubernetes, Triton runs behind a headless Service, whose DNS name answers with one
A record per ready pod. Handing that name to gRPC would connect to one pod only; resolving it
ourselves lets the Triton backend keep one client per pod and round-robin batches over all of
them. Pods come and go (HPA, rollouts), so the backend resolves again every
``settings.triton_resolve_interval_s``.
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

# (host, port) -> the IP addresses the host name stands for now
Resolver = Callable[[str, int], Awaitable[list[str]]]


def split_host_port(url: str) -> tuple[str, int]:
    """("triton", 8001) from "triton:8001"; IPv6 literals as "[::1]:8001"."""
    host, sep, port = url.strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"Triton URL {url!r} is not host:port")
    return host.strip("[]"), int(port)


def join_host_port(address: str, port: int) -> str:
    """"10.0.0.5:8001", or "[fd00::5]:8001" for IPv6, the form tritonclient takes."""
    return f"[{address}]:{port}" if ipaddress.ip_address(address).version == 6 else f"{address}:{port}"


async def resolve_addresses(host: str, port: int) -> list[str]:
    """Every IP address of ``host`` (system resolver, so /etc/hosts and search domains apply), sorted."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


@dataclass(frozen=True)
class Discovery:
    """For each configured URL that resolved, its endpoints ("ip:port"); for each that did not, why."""

    resolved: dict[str, list[str]]
    failures: dict[str, str]

    @property
    def endpoints(self) -> list[str]:
        """Every endpoint found, in URL order, without repeats."""
        return list(dict.fromkeys(e for endpoints in self.resolved.values() for e in endpoints))


async def discover(urls: Sequence[str], resolver: Resolver = resolve_addresses) -> Discovery:
    """Expand each host:port into one endpoint per address; a URL that fails to resolve is reported, not fatal.

    A headless Service with no ready pod does not resolve at all (NXDOMAIN), which is a normal
    state during a rollout, so the caller decides what a failure means.
    """
    resolved: dict[str, list[str]] = {}
    failures: dict[str, str] = {}
    for url in urls:
        host, port = split_host_port(url)
        try:
            addresses = await resolver(host, port)
        except (OSError, UnicodeError) as exc:
            failures[url] = str(exc) or type(exc).__name__
            continue
        if addresses:
            resolved[url] = [join_host_port(address, port) for address in addresses]
        else:
            failures[url] = "no addresses"
    return Discovery(resolved=resolved, failures=failures)
