"""The reliability figures of docs/reliability.md, from one run: ``python -m benchmarks.reliability.figures``.

CI size by default (tests/test_reliability_figures.py runs the same functions smaller);
``--soak`` (``make soak``) runs the full sizes. Prints one JSON document.

* head_of_line: two requests of many large PNGs decode while one-image requests measure p99.
* exactly_once: N requests at concurrency C through a real gateway process; every request answered once.
* sigterm: SIGTERM to a real ``imgserve serve`` under gRPC + HTTP keep-alive load: outcome counts.
* triton_faults: the Triton backend over a fake Triton that is SIGKILLed (stopped) or SIGSTOPped (hung)
  under load: requests past their deadline, time to fail, recovery time.
* version_swap: new versions under load, embedded backend (poll) and Triton backend (fake Triton
  publishing a version with a reload window): failed requests.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import resource
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp
import grpc
import grpc.aio

from benchmarks.reliability.images import large_png, percentile
from benchmarks.reliability.tinymodel import add_version
from clients.proto.imgserve.v1 import imgserve_pb2 as pb
from clients.proto.imgserve.v1 import imgserve_pb2_grpc as pb_grpc


def _spec(name: str = "tiny", **changes: object):  # type: ignore[no-untyped-def]
    from tests.fakes import tiny_spec
    return tiny_spec(name, **changes)


def _grey(value: int) -> bytes:
    from tests.fakes import grey_png
    return grey_png(value)


def rss_mb(pid: int | None = None) -> float:
    """Resident memory of ``pid`` (default: this process) in MB, from /proc."""
    path = f"/proc/{pid or os.getpid()}/status"
    for line in Path(path).read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---------------------------------------------------------------- head-of-line (in a real process)

async def head_of_line(side: int, per_request: int, threads: int = 0) -> dict[str, object]:
    """Two requests of ``per_request`` side x side PNGs; one-image requests meanwhile; RSS before/after."""
    from tests.procs import run_gateway
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        add_version(repo, _spec(preprocess=_pre(36, 32, 3)))
        args = ["--max-request-pixels", "0", "--backend-threads", "1"]
        if threads:
            args += ["--preprocess-threads", str(threads)]
        big = large_png(side, 3)
        with run_gateway(repo, extra_args=args) as gw:
            pid = gw.proc.pid
            async with grpc.aio.insecure_channel(gw.grpc_target, options=_big_messages()) as channel:
                stub = pb_grpc.ImageServiceStub(channel)
                small = pb.ClassifyRequest(model="tiny", images=[_grey(3)], top_k=1)
                for _ in range(5):
                    await stub.Classify(small, timeout=30)
                baseline = rss_mb(pid)
                started = time.perf_counter()
                large = [asyncio.ensure_future(stub.Classify(pb.ClassifyRequest(model="tiny", images=[big] * per_request),
                                                             timeout=3600)) for _ in range(2)]
                latencies: list[float] = []
                peak = baseline
                while not all(t.done() for t in large):
                    t0 = time.perf_counter()
                    await stub.Classify(small, timeout=30)
                    latencies.append(time.perf_counter() - t0)
                    peak = max(peak, rss_mb(pid))
                    await asyncio.sleep(0.02)
                await asyncio.gather(*large)
                large_s = time.perf_counter() - started
                await asyncio.sleep(1.0)
                after = rss_mb(pid)
    return {"image": f"{side}x{side} RGB PNG ({len(big)} bytes)", "large_requests": 2, "images_each": per_request,
            "large_requests_s": round(large_s, 2), "small_requests": len(latencies),
            "small_p50_ms": round(percentile(latencies, 50) * 1000, 1),
            "small_p99_ms": round(percentile(latencies, 99) * 1000, 1),
            "small_max_ms": round(max(latencies) * 1000, 1) if latencies else None,
            "rss_mb_baseline": round(baseline), "rss_mb_peak": round(peak), "rss_mb_after": round(after)}


def _pre(resize: int, crop: int, channels: int):  # type: ignore[no-untyped-def]
    from serving.repository import Preprocess
    return Preprocess(resize=resize, crop=crop, channels=channels)


def _big_messages() -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


# ---------------------------------------------------------------- exactly once

async def exactly_once(total: int, concurrency: int) -> dict[str, object]:
    """``total`` requests at ``concurrency`` over gRPC to a real gateway; each answer matched to its request."""
    from tests.procs import run_gateway
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        add_version(repo, _spec())
        images = [_grey(v) for v in range(256)]
        answered: Counter[int] = Counter()
        codes: Counter[str] = Counter()
        with run_gateway(repo, extra_args=["--backend-threads", "1"]) as gw:
            async with grpc.aio.insecure_channel(gw.grpc_target) as channel:
                stub = pb_grpc.ImageServiceStub(channel)
                queue: asyncio.Queue[int] = asyncio.Queue()
                for i in range(total):
                    queue.put_nowait(i)

                async def worker() -> None:
                    while not queue.empty():
                        i = queue.get_nowait()
                        try:
                            await stub.Classify(pb.ClassifyRequest(model="tiny", images=[images[i % 256]]),
                                            timeout=60)
                            answered[i] += 1
                            codes["OK"] += 1
                        except grpc.aio.AioRpcError as exc:
                            answered[i] += 1
                            codes[exc.code().name] += 1

                start = time.perf_counter()
                await asyncio.gather(*(worker() for _ in range(concurrency)))
                elapsed = time.perf_counter() - start
    return {"requests": total, "concurrency": concurrency, "codes": dict(codes),
            "answered_exactly_once": sum(1 for i in range(total) if answered[i] == 1),
            "seconds": round(elapsed, 1), "rps": round(total / elapsed)}


# ---------------------------------------------------------------- SIGTERM under load

async def sigterm_under_load(grpc_clients: int, http_clients: int, load_s: float, drain_delay_s: float,
                             side: int = 600, sig: int = signal.SIGTERM) -> dict[str, object]:
    """Load a real gateway, send ``sig``, keep loading until it is gone; classify every outcome."""
    from tests.procs import run_gateway
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        add_version(repo, _spec(preprocess=_pre(36, 32, 3)))
        image = large_png(side, 3)
        grpc_codes: Counter[str] = Counter()
        http_codes: Counter[str] = Counter()
        signalled: dict[str, float] = {}
        late_ok_refused: Counter[str] = Counter()
        details: Counter[str] = Counter()
        with run_gateway(repo, extra_args=["--backend-threads", "1", "--shutdown-grace-s", "30"],
                         env={"IMGSERVE_DRAIN_DELAY_S": str(drain_delay_s)}) as gw:
            stop = asyncio.Event()

            async def grpc_client() -> None:
                async with grpc.aio.insecure_channel(gw.grpc_target) as channel:
                    stub = pb_grpc.ImageServiceStub(channel)
                    request = pb.ClassifyRequest(model="tiny", images=[image], top_k=1)
                    while not stop.is_set():
                        sent = time.monotonic()
                        try:
                            await stub.Classify(request, timeout=30)
                            grpc_codes["OK"] += 1
                        except grpc.aio.AioRpcError as exc:
                            code = exc.code().name
                            if code not in ("UNAVAILABLE",):
                                details[f"{code}: {exc.details()} at +{time.monotonic() - signalled.get('sig', 0):.2f}s, sent +{sent - signalled.get('sig', 0):.2f}s"] += 1
                            if code == "UNAVAILABLE" and "sig" in signalled and sent >= signalled["sig"]:
                                late_ok_refused["refused"] += 1
                            grpc_codes[code] += 1
                            if not gw.alive():
                                return
                            # as the SDK does: honour the server's retry-after trailer
                            trailer = dict(exc.trailing_metadata() or ()).get("retry-after")
                            await asyncio.sleep(float(trailer) if trailer else 0.05)

            async def http_client() -> None:
                body = {"model": "tiny", "images": [base64.b64encode(image).decode()], "topK": 1}
                async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
                    while not stop.is_set():
                        try:
                            async with session.post(f"{gw.http_url}/v1/classify", json=body) as resp:
                                await resp.read()
                                key = str(resp.status)
                                if resp.status == 503:
                                    key += "+Retry-After" if "Retry-After" in resp.headers else " without Retry-After"
                                http_codes[key] += 1
                                if "Retry-After" in resp.headers:   # as the SDK does
                                    await asyncio.sleep(float(resp.headers["Retry-After"]))
                        except aiohttp.ClientConnectorError:
                            http_codes["connection refused (listener closed)"] += 1
                            return
                        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                            http_codes[f"RESET/disconnect ({type(exc).__name__})"] += 1
                            await asyncio.sleep(0.05)

            clients = ([asyncio.create_task(grpc_client()) for _ in range(grpc_clients)]
                       + [asyncio.create_task(http_client()) for _ in range(http_clients)])
            await asyncio.sleep(load_s)
            signalled["sig"] = time.monotonic()
            gw.proc.send_signal(sig)
            exit_code = await asyncio.to_thread(gw.proc.wait, 60)
            stop.set()
            await asyncio.wait(clients, timeout=30)
            exit_s = time.monotonic() - signalled["sig"]
            log = gw.stderr()
    return {"signal": signal.Signals(sig).name, "grpc_clients": grpc_clients, "http_keepalive_clients": http_clients,
            "drain_delay_s": drain_delay_s, "grpc": dict(grpc_codes), "http": dict(http_codes),
            "cancelled": grpc_codes.get("CANCELLED", 0),
            "resets": sum(v for k, v in http_codes.items() if k.startswith("RESET")),
            "exit_code": exit_code, "exit_after_s": round(exit_s, 2),
            "grace_ran_out": "still running after" in log, "non_unavailable_errors": dict(details.most_common(5))}


# ---------------------------------------------------------------- Triton faults (fake Triton)

async def triton_faults(load_s: float, fault_s: float, clients: int = 8) -> dict[str, object]:
    """The Triton backend under load while a (fake) Triton is SIGKILLed then restarted, and SIGSTOPped then SIGCONTed."""
    from serving.backends.triton import TritonBackend
    from tests.fake_triton import FakeTriton
    from tests.fakes import running_gateway
    from tests.procs import triton_settings
    from tests.test_triton_faults import FakeServer

    results: dict[str, object] = {}
    for fault in ("SIGKILL", "SIGSTOP"):
        fake = FakeTriton(_spec())
        server = FakeServer(fake)
        await server.start()
        with tempfile.TemporaryDirectory() as tmp:
            backend = TritonBackend(triton_settings(server.url, Path(tmp)))   # default probe settings
            async with running_gateway(backend, request_timeout_s=30.0) as gw, \
                    grpc.aio.insecure_channel(f"127.0.0.1:{gw.grpc_port}") as channel:
                stub = pb_grpc.ImageServiceStub(channel)
                stop = asyncio.Event()
                samples: list[tuple[float, float, str]] = []   # (sent, latency, code)
                deadline_s = 5.0

                async def client() -> None:
                    request = pb.ClassifyRequest(model="tiny", images=[_grey(4)], top_k=1)
                    while not stop.is_set():
                        sent = time.monotonic()
                        try:
                            await stub.Classify(request, timeout=deadline_s)
                            code = "OK"
                        except grpc.aio.AioRpcError as exc:
                            code = exc.code().name
                        samples.append((sent, time.monotonic() - sent, code))
                        await asyncio.sleep(0.01)

                tasks = [asyncio.create_task(client()) for _ in range(clients)]
                await asyncio.sleep(load_s)
                fault_at = time.monotonic()
                if fault == "SIGKILL":
                    await server.stop()
                else:
                    fake.hang()
                await asyncio.sleep(fault_s)
                back_at = time.monotonic()
                if fault == "SIGKILL":
                    await server.start()
                else:
                    fake.resume()
                while True:   # recovery: the first OK sent after Triton is back
                    ok = [s for s in samples if s[0] >= back_at and s[2] == "OK"]
                    if ok or time.monotonic() - back_at > 30:
                        break
                    await asyncio.sleep(0.02)
                await asyncio.sleep(load_s)
                stop.set()
                await asyncio.gather(*tasks)
        await server.stop()
        during = [s for s in samples if fault_at + 1.5 <= s[0] < back_at]   # after detection, while down
        first_ok = min((s[0] + s[1] for s in samples if s[0] >= back_at and s[2] == "OK"), default=None)
        results[fault] = {
            "requests": len(samples), "codes": dict(Counter(s[2] for s in samples)),
            "past_deadline": sum(1 for s in samples if s[1] > deadline_s + 0.05),
            "unavailable_p99_ms_while_down": round(percentile([s[1] for s in during if s[2] == "UNAVAILABLE"], 99)
                                                    * 1000, 1),
            "slowest_failure_ms": round(max((s[1] for s in samples if s[2] != "OK"), default=0.0) * 1000, 1),
            "recovery_s": None if first_ok is None else round(first_ok - back_at, 2)}
    return results


# ---------------------------------------------------------------- version swap under load

async def version_swap(swaps: int, clients: int = 8) -> dict[str, object]:
    """New versions under load: embedded backend (poll), Triton backend (fake Triton with a reload window)."""
    from serving.backends.onnxruntime import OnnxRuntimeBackend
    from serving.backends.triton import TritonBackend
    from serving.settings import Settings
    from tests.fake_triton import FakeTriton
    from tests.fakes import running_gateway
    from tests.procs import triton_settings
    from tests.test_triton_faults import FakeServer

    out: dict[str, object] = {}
    for kind in ("onnxruntime", "triton"):
        with tempfile.TemporaryDirectory() as tmp:
            repo = Path(tmp)
            fake = server = None
            if kind == "onnxruntime":
                add_version(repo, _spec())
                backend = OnnxRuntimeBackend(Settings(model_repository=repo, backend_threads=1))
                overrides = {"model_control_mode": "poll", "repository_poll_interval_s": 0.2}
            else:
                fake = FakeTriton(_spec(), _spec("other"))
                server = FakeServer(fake)
                await server.start()
                backend = TritonBackend(triton_settings(server.url, repo, triton_health_interval_s=0.5))
                overrides = {}
            async with running_gateway(backend, **overrides) as gw, \
                    grpc.aio.insecure_channel(f"127.0.0.1:{gw.grpc_port}") as channel:
                stub = pb_grpc.ImageServiceStub(channel)
                stop = asyncio.Event()
                codes: Counter[str] = Counter()
                versions: Counter[str] = Counter()

                async def client(model: str) -> None:
                    request = pb.ClassifyRequest(model=model, images=[_grey(4)], top_k=1)
                    while not stop.is_set():
                        try:
                            response = await stub.Classify(request, timeout=10)
                            codes["OK"] += 1
                            versions[f"{model} v{response.model_version}"] += 1
                        except grpc.aio.AioRpcError as exc:
                            codes[exc.code().name] += 1

                models = ["tiny"] * clients + (["other"] * 2 if kind == "triton" else [])
                tasks = [asyncio.create_task(client(m)) for m in models]
                await asyncio.sleep(0.5)
                for v in range(2, swaps + 2):
                    if kind == "onnxruntime":
                        add_version(repo, _spec())
                    else:
                        assert fake is not None
                        fake.reloading = {"tiny"}          # Triton unloads v(n-1) and loads v(n): ~1 s gap
                        await asyncio.sleep(1.0)
                        fake.publish(_spec(version=v))
                        fake.reloading = set()
                    await asyncio.sleep(1.0)
                stop.set()
                await asyncio.gather(*tasks)
            if server is not None:
                await server.stop()
        out[kind] = {"swaps": swaps, "codes": dict(codes), "failed": sum(v for k, v in codes.items() if k != "OK"),
                     "answers_by_version": dict(sorted(versions.items()))}
    return out


# ---------------------------------------------------------------- main

async def run_all(soak: bool) -> dict[str, object]:
    results: dict[str, object] = {"soak": soak, "cores": len(os.sched_getaffinity(0))}
    stages = {
        "head_of_line": lambda: head_of_line(7000 if soak else 2500, 64 if soak else 12),
        "exactly_once": lambda: exactly_once(10_000 if soak else 2_000, 64),
        "sigterm": lambda: sigterm_under_load(32, 8, 3.0 if soak else 2.0, 1.0),
        "sigint": lambda: sigterm_under_load(32, 8, 2.0, 1.0, sig=signal.SIGINT),
        "triton_faults": lambda: triton_faults(2.0, 5.0 if soak else 3.0),
        "version_swap": lambda: version_swap(5 if soak else 2),
    }
    for name, stage in stages.items():
        results[name] = await stage()
        print(json.dumps({name: results[name]}), file=sys.stderr, flush=True)   # partial results as they come
    results["max_rss_mb_of_this_driver"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--soak", action="store_true", help="full sizes (minutes)")
    parser.add_argument("--only", choices=["head_of_line", "exactly_once", "sigterm", "triton_faults", "version_swap"])
    args = parser.parse_args(argv)
    if args.only:
        fn = {"head_of_line": lambda: head_of_line(7000 if args.soak else 2500, 64 if args.soak else 12),
              "exactly_once": lambda: exactly_once(10_000 if args.soak else 2_000, 64),
              "sigterm": lambda: sigterm_under_load(32, 8, 2.0, 1.0),
              "triton_faults": lambda: triton_faults(2.0, 3.0),
              "version_swap": lambda: version_swap(5 if args.soak else 2)}[args.only]
        result = asyncio.run(fn())
    else:
        result = asyncio.run(run_all(args.soak))
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
