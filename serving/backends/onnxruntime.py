"""The embedded backend: one ONNX Runtime session per model of a local repository.

It is the default because it needs nothing but the repository on disk. Sessions
run in a dedicated thread pool (ORT releases the GIL), so the event loop never
blocks on a long inference; the batcher in front decides how much runs at once.
A model whose calls are measured faster than ``inline_infer_ms`` (LeNet: tens of
microseconds) runs on the event loop instead: the thread hop would cost more than
the call itself.

Models can be (re)loaded while serving (serving/reload.py drives it: poll, explicit
load/unload, SIGHUP). A new version is loaded and warmed in a thread while the old one
serves, then swapped in with one dict assignment; the old session stays reachable by
version (``infer_spec``) for ``RETIRE_AFTER_S`` so requests admitted for it finish on it.
A version that fails to load or warm up is refused and the old one keeps serving.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from serving.backends.base import Backend, check_outputs
from serving.backends.ort_device import CPU, CUDA, Device, IoBoundRunner, Placement, parse_device, select_providers
from serving.errors import BackendError, BackendUnavailable, InvalidInput, ModelNotFound
from serving.repository import CONFIG_FILE, LocalModel, ModelSpec, RepositoryError, read_model, scan_repository
from serving.settings import Settings
from serving.tasks import check_servable

log = logging.getLogger(__name__)

__all__ = ["CPU", "CUDA", "OnnxRuntimeBackend"]
RETIRE_AFTER_S = 120.0   # how long a replaced version stays reachable for requests admitted before the swap


@dataclass
class _Loaded:
    spec: ModelSpec
    session: ort.InferenceSession
    path: Path
    fingerprint: tuple[object, ...] = ()
    seconds_per_call: float | None = None   # EWMA of measured calls: decides inline vs thread
    device: Device = Device("cpu")
    runner: IoBoundRunner | None = None     # CUDA: I/O binding with pinned staging


def fingerprint(local: LocalModel) -> tuple[object, ...]:
    """What makes a model directory "changed": its served version and its files' sizes and mtimes."""
    files = [local.onnx_path, local.onnx_path.parents[1] / CONFIG_FILE]
    stats = [(f.stat().st_size, f.stat().st_mtime_ns) if f.exists() else None for f in files]
    return (local.spec.version, *stats)


@dataclass(frozen=True)
class ReloadOutcome:
    """What one (re)load did to one model, for logs, the API and tests."""

    model: str
    action: str          # "loaded", "unchanged", "unloaded", "refused"
    version: int | None
    message: str = ""


class OnnxRuntimeBackend(Backend):
    """Serves every model of ``settings.model_repository`` with onnxruntime."""

    name = "onnxruntime"

    def __init__(self, settings: Settings, *, repository: Path | None = None) -> None:
        self.settings = settings
        self.repository = Path(repository if repository is not None else settings.model_repository)
        self._models: dict[str, _Loaded] = {}
        self._previous: dict[tuple[str, int], tuple[_Loaded, float]] = {}   # replaced versions, until when
        self._reload_lock = asyncio.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._ready = False

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Load every model (in a thread: parsing and optimising graphs takes a while)."""
        if self._ready:
            return
        loaded = await asyncio.to_thread(self._load_all)
        workers = max(1, sum(m.spec.instance_count for m in loaded.values()))
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ort")
        self._models = loaded
        self._ready = True
        log.info("onnxruntime backend: loaded %s from %s", ", ".join(sorted(loaded)) or "no models",
                 self.repository)

    async def close(self) -> None:
        self._ready = False
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True)
        self._models = {}
        self._previous = {}

    def _load_all(self) -> dict[str, _Loaded]:
        try:
            found = scan_repository(self.repository)
        except RepositoryError as exc:
            raise BackendUnavailable(f"cannot read model repository: {exc}") from exc
        return {name: self._load(local) for name, local in found.items()}

    def _session_options(self) -> ort.SessionOptions:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.settings.backend_threads or self.settings.cores
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # ORT's pool threads spin between parallel sections by default, which suits a process doing nothing
        # else. The gateway decodes and answers RPCs on the same cores, so it lets them sleep instead:
        # resnet18 at c=1 went from 0.58x to 0.64x raw ORT with spinning off (docs/performance.md).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.settings.backend_spin else "0")
        return opts

    def _placement(self, spec: ModelSpec) -> Placement:
        """CPU or CUDA for this model (``--device``, or KIND_GPU in its config); warns on a CPU fallback."""
        placement = select_providers(parse_device(self.settings.device), spec.gpu, ort.get_available_providers(),
                                     spec.name)
        if placement.warning:
            log.warning("%s", placement.warning)
        return placement

    def _load(self, local: LocalModel) -> _Loaded:
        spec = local.spec
        try:
            check_servable(spec)
        except RepositoryError as exc:
            raise BackendUnavailable(f"cannot serve {local.onnx_path}: {exc}") from None
        placement = self._placement(spec)
        try:
            session = ort.InferenceSession(str(local.onnx_path), sess_options=self._session_options(),
                                           providers=placement.providers)
        except Exception as exc:  # ORT raises its own pybind exception types
            raise BackendUnavailable(f"model {spec.name!r}: cannot load {local.onnx_path}: {exc}") from exc
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name for o in session.get_outputs()}
        missing = [name for name in spec.output_names if name not in outputs]
        if spec.input_name not in inputs or missing:
            raise BackendUnavailable(
                f"model {spec.name!r}: graph has inputs {sorted(inputs)} and outputs {sorted(outputs)}, "
                f"config.pbtxt names {spec.input_name!r} -> {', '.join(spec.output_names)}")
        if inputs[spec.input_name].type != "tensor(uint8)":
            raise BackendUnavailable(f"model {spec.name!r}: input {spec.input_name!r} is "
                                     f"{inputs[spec.input_name].type}, expected tensor(uint8)")
        loaded = _Loaded(spec=spec, session=session, path=local.onnx_path, fingerprint=fingerprint(local),
                         device=placement.device)
        if placement.device.kind == "cuda":
            loaded.runner = IoBoundRunner(session, spec.input_name, spec.output_names, placement.device)
        # Warm up like Triton's model_warmup: the first run allocates and is slow. It also
        # proves the outputs have the declared shapes before the model takes traffic.
        try:
            self._run(loaded, np.zeros((1, *spec.input_shape), dtype=np.uint8))
        except BackendError as exc:
            raise BackendUnavailable(f"model {spec.name!r} fails its warm-up run: {exc.message}") from None
        loaded.seconds_per_call = None  # the warm-up allocates: its time says nothing about later calls
        return loaded

    # ------------------------------------------------------------ reloading (serving/reload.py)

    def repository_models(self) -> dict[str, str]:
        """Every model directory of the repository by name, with why it cannot be read ('' when it can)."""
        found: dict[str, str] = {}
        if not self.repository.is_dir():
            return found
        for child in sorted(self.repository.iterdir()):
            if child.is_dir() and (child / CONFIG_FILE).is_file():
                try:
                    read_model(child)
                    found[child.name] = ""
                except RepositoryError as exc:
                    found[child.name] = str(exc)
        return found

    def loaded_versions(self) -> dict[str, int]:
        return {name: m.spec.version for name, m in self._models.items()}

    async def load_model(self, name: str) -> ReloadOutcome:
        """Load (or reload, when changed) one model from the repository; a failure keeps the old one."""
        async with self._reload_lock:
            return await self._load_one(name)

    async def unload_model(self, name: str) -> ReloadOutcome:
        async with self._reload_lock:
            return self._unload(name)

    async def poll(self, *, only_loaded: bool = False, unload_missing: bool = True) -> list[ReloadOutcome]:
        """Bring the served models in line with the repository: new and changed ones (re)loaded,
        removed ones unloaded (``unload_missing``); ``only_loaded`` looks only at models already served."""
        async with self._reload_lock:
            present = await asyncio.to_thread(self.repository_models)
            names = set(self._models) if only_loaded else set(present) | set(self._models)
            outcomes = []
            for name in sorted(names):
                if name not in present:
                    if unload_missing and name in self._models:
                        outcomes.append(self._unload(name))
                    continue
                outcomes.append(await self._load_one(name))
            return outcomes

    async def _load_one(self, name: str) -> ReloadOutcome:
        current = self._models.get(name)
        model_dir = self.repository / name
        try:
            local = await asyncio.to_thread(read_model, model_dir)
            if current is not None and current.fingerprint == fingerprint(local):
                return ReloadOutcome(name, "unchanged", current.spec.version)
            loaded = await asyncio.to_thread(self._load, local)   # parse, optimise and warm up, off the loop
        except (RepositoryError, BackendUnavailable, OSError) as exc:
            message = exc.message if isinstance(exc, BackendUnavailable) else str(exc)
            if current is not None:
                log.error("model %s: refusing the new version in %s (%s); version %d keeps serving",
                          name, model_dir, message, current.spec.version)
            else:
                log.error("model %s: cannot load %s (%s)", name, model_dir, message)
            return ReloadOutcome(name, "refused", current.spec.version if current else None, message)
        self._grow_executor(loaded.spec.instance_count)
        if current is not None:
            self._retire(current)
        self._models = {**self._models, name: loaded}        # the swap: one assignment
        log.info("model %s: version %d loaded and warmed up%s", name, loaded.spec.version,
                 f" (replacing version {current.spec.version})" if current else "")
        return ReloadOutcome(name, "loaded", loaded.spec.version)

    def _unload(self, name: str) -> ReloadOutcome:
        current = self._models.get(name)
        if current is None:
            return ReloadOutcome(name, "unchanged", None, "not loaded")
        self._retire(current)
        self._models = {k: v for k, v in self._models.items() if k != name}
        log.info("model %s: version %d unloaded", name, current.spec.version)
        return ReloadOutcome(name, "unloaded", current.spec.version)

    def _retire(self, old: _Loaded) -> None:
        now = time.monotonic()
        self._previous = {key: value for key, value in self._previous.items() if value[1] > now}
        self._previous[(old.spec.name, old.spec.version)] = (old, now + RETIRE_AFTER_S)

    def _grow_executor(self, instances: int) -> None:
        executor = self._executor
        if executor is not None:
            wanted = sum(m.spec.instance_count for m in self._models.values()) + instances
            if wanted > executor._max_workers:  # ThreadPoolExecutor grows lazily up to this
                executor._max_workers = wanted

    async def infer_spec(self, spec: ModelSpec, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run on the version ``spec`` names: the current one, or a replaced one still retiring."""
        current = self._models.get(spec.name)
        if current is None or current.spec.version != spec.version:
            retired = self._previous.get((spec.name, spec.version))
            if retired is not None:
                return await self._infer_loaded(retired[0], batch)
        return await self.infer(spec.name, batch)

    # ------------------------------------------------------------ serving

    async def models(self) -> dict[str, ModelSpec]:
        return {name: m.spec for name, m in self._models.items()}

    async def ready(self) -> bool:
        return self._ready

    async def infer(self, model: str, batch: np.ndarray) -> dict[str, np.ndarray]:
        loaded = self._models.get(model)
        if loaded is None:
            if not self._ready:
                raise BackendUnavailable("onnxruntime backend is not started")
            raise ModelNotFound(f"model {model!r} is not served; available: {', '.join(sorted(self._models))}")
        return await self._infer_loaded(loaded, batch)

    async def _infer_loaded(self, loaded: _Loaded, batch: np.ndarray) -> dict[str, np.ndarray]:
        spec = loaded.spec
        model = spec.name
        if not isinstance(batch, np.ndarray) or batch.dtype != np.uint8:
            raise InvalidInput(f"model {model!r} takes uint8 input, got {getattr(batch, 'dtype', type(batch))}")
        if batch.ndim != 4 or batch.shape[0] < 1 or batch.shape[1:] != spec.input_shape:
            raise InvalidInput(f"model {model!r} takes a batch of shape [N, {', '.join(map(str, spec.input_shape))}]"
                               f", got {list(batch.shape)}")
        executor = self._executor
        if executor is None:
            raise BackendUnavailable("onnxruntime backend is closed")
        batch = np.ascontiguousarray(batch)
        if self._runs_inline(loaded):
            return self._run(loaded, batch)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor, self._run, loaded, batch)

    def _runs_inline(self, loaded: _Loaded) -> bool:
        limit = self.settings.inline_infer_ms / 1000.0
        return limit > 0 and loaded.seconds_per_call is not None and loaded.seconds_per_call < limit

    @staticmethod
    def _run(loaded: _Loaded, batch: np.ndarray) -> dict[str, np.ndarray]:
        spec = loaded.spec
        names = list(spec.output_names)
        start = time.perf_counter()
        try:
            if loaded.runner is not None:
                values = loaded.runner.run(batch)
            else:
                values = loaded.session.run(names, {spec.input_name: batch})
        except Exception as exc:
            raise BackendError(f"onnxruntime failed on model {spec.name!r}: {exc}") from exc
        took = time.perf_counter() - start
        # per call, not per item: a big batch of a tiny model must not move it off the loop,
        # and one slow call (a cold cache) only nudges the average
        loaded.seconds_per_call = took if loaded.seconds_per_call is None else (
            0.9 * loaded.seconds_per_call + 0.1 * took)
        return check_outputs(spec, dict(zip(names, values)), batch.shape[0])
