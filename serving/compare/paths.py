"""The four measured paths, each able to run one closed-loop step at a given concurrency.

Every server path uses the same unmodified client (``tritonclient.grpc.aio``, one
channel shared by the step's workers, one image per request), so differences between
paths are the servers', not the clients'. The raw-engine path has no client at all: at
concurrency ``c`` it runs ``session.run`` on pre-decoded batches of ``c`` images back to
back, the most the engine can do with that much work in flight.
"""
from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clients.bench import ClosedLoopWindow, LatencySummary
from serving.compare.payloads import crops, predecoded_batch
from serving.repository import ModelSpec

ORT, GATEWAY, TRITON, GATEWAY_TRITON, GATEWAY_TEN_CROP = "ort", "gateway", "triton", "gateway-triton", "gateway-10crop"
ALL_PATHS = (ORT, GATEWAY, TRITON, GATEWAY_TRITON)
OPTIONAL_PATHS = (GATEWAY_TEN_CROP,)
DESCRIPTIONS = {
    ORT: "raw ONNX Runtime, pre-decoded uint8 batches of c",
    GATEWAY: "gateway, embedded ONNX Runtime (encoded image per request, v2 gRPC)",
    TRITON: "Triton direct (client decodes + crops, uint8 tensor per request)",
    GATEWAY_TRITON: "gateway in front of that Triton (encoded image per request)",
    GATEWAY_TEN_CROP: "gateway, embedded, 10-crop on (ten backend items per image)",
}


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass
class StepStats:
    """One path at one (model, image size, concurrency) in one round."""

    path: str
    model: str
    image_size: int
    concurrency: int
    round: int
    images: int
    errors: dict[str, int]
    elapsed_s: float
    images_per_s: float
    latency: LatencySummary | None
    client_cpu_s: float
    drained: bool = False          # nothing finished inside the window (see ClosedLoopWindow)
    load_average_1m: float | None = field(default=None)


class _Window(ClosedLoopWindow):
    """A step's measured window (after ``warmup_s``); see ClosedLoopWindow for what it counts."""

    def __init__(self, warmup_s: float, duration_s: float) -> None:
        start = time.perf_counter() + warmup_s
        super().__init__(start, start + duration_s)

    def stats(self, path: str, model: str, size: int, concurrency: int, rnd: int, cpu_s: float) -> StepStats:
        elapsed = self.elapsed_s
        return StepStats(path=path, model=model, image_size=size, concurrency=concurrency, round=rnd,
                         images=self.images, errors=self.errors, elapsed_s=elapsed,
                         images_per_s=self.images / elapsed, latency=LatencySummary.from_seconds(self.latencies),
                         client_cpu_s=cpu_s, drained=self.drained,
                         load_average_1m=os.getloadavg()[0] if hasattr(os, "getloadavg") else None)


def error_code(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    code = status() if callable(status) else None
    return str(code or type(exc).__name__)


class MeasuredPath(abc.ABC):
    """One way of getting an answer for an image; ``step`` measures it at a concurrency."""

    name: str

    @abc.abstractmethod
    async def open(self, spec: ModelSpec, images: Sequence[bytes]) -> None:
        """Get ready to send ``images`` to ``spec``'s model (and prove one request works)."""

    @abc.abstractmethod
    async def step(self, concurrency: int, warmup_s: float, duration_s: float) -> _Window: ...

    async def close(self) -> None:
        return None


class OrtPath(MeasuredPath):
    """Raw ONNX Runtime on pre-decoded batches: the engine's ceiling for this much work in flight."""

    name = ORT

    def __init__(self, model_dir: Path, threads: int = 0) -> None:
        self.model_dir = Path(model_dir)
        self.threads = threads or cores()
        self._session = None
        self._spec: ModelSpec | None = None
        self._images: Sequence[bytes] = ()

    async def open(self, spec: ModelSpec, images: Sequence[bytes]) -> None:
        import onnxruntime as ort

        from serving.repository import read_model

        onnx_path = read_model(self.model_dir).onnx_path
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads       # what the gateway's embedded backend uses
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
        self._spec, self._images = spec, images
        self._run(predecoded_batch(list(images), spec, 1))

    def _run(self, batch: np.ndarray) -> None:
        assert self._session is not None and self._spec is not None
        self._session.run([self._spec.output_name], {self._spec.input_name: batch})

    async def step(self, concurrency: int, warmup_s: float, duration_s: float) -> _Window:
        assert self._spec is not None
        batch = predecoded_batch(list(self._images), self._spec, concurrency)
        window = _Window(warmup_s, duration_s)

        def loop() -> None:
            clock = time.perf_counter
            while (started := clock()) < window.end:
                try:
                    self._run(batch)
                    window.record(started, clock(), concurrency, None)
                except Exception as exc:  # an engine failure is a result, not a crash of the run
                    window.record(started, clock(), concurrency, type(exc).__name__)

        await asyncio.to_thread(loop)
        return window


class _GrpcClientPath(MeasuredPath):
    """Closed loop over ``tritonclient.grpc.aio``: ``concurrency`` workers send back to back.

    ``connections`` clients, each with its own TCP connection (a local subchannel pool;
    by default gRPC channels to one address share one), the workers taking turns: a
    server with several processes on one port (``serve --workers N``) only spreads load
    over connections.
    """

    def __init__(self, url: str, connections: int = 1) -> None:
        self.url = url
        self.connections = max(1, connections)
        self._clients: list[Any] = []

    @property
    def _client(self) -> Any:
        return self._clients[0] if self._clients else None

    def _client_for(self, k: int) -> Any:
        return self._clients[k % len(self._clients)]

    async def open(self, spec: ModelSpec, images: Sequence[bytes]) -> None:
        from tritonclient.grpc.aio import InferenceServerClient

        limit = 64 * 1024 * 1024
        args = [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit),
                ("grpc.use_local_subchannel_pool", 1)]
        self._clients = [InferenceServerClient(self.url, channel_args=args) for _ in range(self.connections)]
        self._prepare(spec, images)
        for k in range(self.connections):
            await self._send(k)  # fail before measuring when the path cannot answer at all

    @abc.abstractmethod
    def _prepare(self, spec: ModelSpec, images: Sequence[bytes]) -> None: ...

    @abc.abstractmethod
    def _send(self, k: int) -> Awaitable[object]: ...

    async def step(self, concurrency: int, warmup_s: float, duration_s: float) -> _Window:
        window = _Window(warmup_s, duration_s)
        clock = time.perf_counter

        async def worker(k: int) -> None:
            while (started := clock()) < window.end:
                try:
                    await self._send(k)
                    window.record(started, clock(), 1, None)
                except Exception as exc:
                    window.record(started, clock(), 1, error_code(exc))
                k += concurrency

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        return window

    async def close(self) -> None:
        for client in self._clients:
            await client.close()
        self._clients = []


class GatewayPath(_GrpcClientPath):
    """Encoded images to a gateway's v2 endpoint (``image`` BYTES [1], ``ten_crop`` parameter)."""

    def __init__(self, url: str, name: str = GATEWAY, ten_crop: bool = False, connections: int = 1) -> None:
        super().__init__(url, connections)
        self.name = name
        self.ten_crop = ten_crop
        self._inputs: list[object] = []
        self._model = ""

    def _prepare(self, spec: ModelSpec, images: Sequence[bytes]) -> None:
        from tritonclient.grpc import InferInput, InferRequestedOutput

        self._model = spec.name
        self._inputs = []
        for data in images:  # built once: encoding a request is the client's cost, not the server's
            tensor = InferInput("image", [1], "BYTES")
            tensor.set_data_from_numpy(np.array([data], dtype=np.object_))
            self._inputs.append(tensor)
        self._outputs = [InferRequestedOutput("probabilities")]

    def _send(self, k: int) -> Awaitable[object]:
        return self._client_for(k).infer(self._model, [self._inputs[k % len(self._inputs)]], outputs=self._outputs,
                                  parameters={"ten_crop": self.ten_crop})


class TritonDirectPath(_GrpcClientPath):
    """uint8 crops straight to Triton; the client decodes and crops each request like the gateway does
    (in a thread pool of one thread per core, as the gateway's preprocessing pool)."""

    name = TRITON

    def __init__(self, url: str, connections: int = 1) -> None:
        super().__init__(url, connections)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=cores(), thread_name_prefix="client-pre")

    def _prepare(self, spec: ModelSpec, images: Sequence[bytes]) -> None:
        from tritonclient.grpc import InferRequestedOutput

        self._spec = spec
        self._images = list(images)
        self._outputs = [InferRequestedOutput(spec.output_name)]

    async def _send(self, k: int) -> object:
        from tritonclient.grpc import InferInput

        loop = asyncio.get_running_loop()
        batch = await loop.run_in_executor(self._pool, crops, self._images[k % len(self._images)], self._spec)
        tensor = InferInput(self._spec.input_name, list(batch.shape), "UINT8")
        tensor.set_data_from_numpy(batch)
        return await self._client_for(k).infer(self._spec.name, [tensor], outputs=self._outputs)

    async def close(self) -> None:
        await super().close()
        self._pool.shutdown(wait=False)


PathFactory = Callable[[], MeasuredPath]
