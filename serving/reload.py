"""Model updates without downtime for the embedded backend: ``--model-control-mode none|poll|explicit``.

Why: before this, a new version in the repository was served only after a restart, and the
v2 repository API answered 404 / UNIMPLEMENTED. The modes follow Triton's:

* ``none``: the models found at start are served until the process ends.
* ``poll``: the repository is rescanned every ``--repository-poll-interval-s`` (and at once on
  SIGHUP); new and changed models are loaded, removed ones unloaded.
* ``explicit``: every model is loaded at start (Triton's ``--load-model=*``); afterwards only
  the repository API changes what is served: ``POST /v2/repository/models/{m}/load`` and
  ``/unload`` over HTTP, RepositoryModelLoad / RepositoryModelUnload over gRPC. SIGHUP reloads
  the models already loaded.

Each (re)load goes through the backend's ``load_model`` (serving/backends/onnxruntime.py): load
and warm up off the event loop, then one atomic swap; requests admitted for the old version
finish on it; a version that does not load or warm up is refused with a log line and the old
one keeps serving. These endpoints are ordinary routes of the gRPC service and the HTTP app,
so whatever authentication those have covers them too.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from serving.errors import ModelNotFound, ServingError

log = logging.getLogger(__name__)


class NotAllowed(ServingError):
    """A repository call the current mode or backend does not allow (FAILED_PRECONDITION / 400)."""

    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 400


class LoadFailed(ServingError):
    """The model exists but its (new) version could not be loaded; what was served is unchanged."""

    grpc_code = grpc.StatusCode.INTERNAL
    http_status = 500


class Reloadable(Protocol):
    """What a backend offers for model control (the embedded backend implements it)."""

    def repository_models(self) -> dict[str, str]: ...
    def loaded_versions(self) -> dict[str, int]: ...
    async def load_model(self, name: str) -> Any: ...
    async def unload_model(self, name: str) -> Any: ...
    async def poll(self, *, only_loaded: bool = False, unload_missing: bool = True) -> list[Any]: ...


@dataclass(frozen=True)
class IndexEntry:
    """One row of the v2 repository index."""

    name: str
    version: str
    state: str      # READY | UNAVAILABLE
    reason: str = ""


def reloadable(backend: object) -> bool:
    return all(callable(getattr(backend, m, None)) for m in ("load_model", "unload_model", "poll",
                                                             "repository_models", "loaded_versions"))


class ModelControl:
    """Runs the configured mode over a Reloadable backend; the transports call load/unload/index."""

    def __init__(self, backend: Reloadable, mode: str, poll_interval_s: float) -> None:
        self.backend = backend
        self.mode = mode
        self.poll_interval_s = poll_interval_s
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.polls = 0

    async def start(self) -> None:
        if self.mode in ("poll", "explicit") and self._task is None:
            self._task = asyncio.create_task(self._loop(), name="imgserve-model-control")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def poll_soon(self) -> bool:
        """SIGHUP: poll now (poll mode: the whole repository; explicit: the loaded models). False in none."""
        if self._task is None:
            return False
        self._wake.set()
        return True

    async def _loop(self) -> None:
        while True:
            if self.mode == "poll":
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_interval_s)
            else:
                await self._wake.wait()
            self._wake.clear()
            try:
                await self.poll_once()
            except Exception:  # a poll must never end the loop: the next one tries again
                log.exception("model repository poll failed")

    async def poll_once(self) -> list[Any]:
        outcomes = await self.backend.poll(only_loaded=self.mode == "explicit",
                                           unload_missing=self.mode == "poll")
        self.polls += 1
        return outcomes

    # ---- the repository API

    def _explicit_only(self, what: str) -> None:
        if self.mode != "explicit":
            raise NotAllowed(f"explicit model {what} is not allowed: the gateway runs with "
                             f"--model-control-mode {self.mode} (start it with --model-control-mode explicit)")

    async def load(self, name: str) -> None:
        self._explicit_only("load")
        present = await asyncio.to_thread(self.backend.repository_models)
        if name not in present:
            raise ModelNotFound(f"model {name!r} is not in the model repository; found: "
                                f"{', '.join(sorted(present)) or 'none'}")
        outcome = await self.backend.load_model(name)
        if getattr(outcome, "action", "") == "refused":
            kept = getattr(outcome, "version", None)
            raise LoadFailed(f"failed to load model {name!r}: {outcome.message}"
                             + (f"; version {kept} keeps serving" if kept is not None else ""))

    async def unload(self, name: str) -> None:
        self._explicit_only("unload")
        if name not in self.backend.loaded_versions():
            present = await asyncio.to_thread(self.backend.repository_models)
            if name not in present:
                raise ModelNotFound(f"model {name!r} is neither loaded nor in the model repository")
            return   # already unloaded: like Triton, not an error
        await self.backend.unload_model(name)

    async def index(self) -> list[IndexEntry]:
        """Loaded models READY, repository models not loaded UNAVAILABLE (with the reason)."""
        loaded = self.backend.loaded_versions()
        present = await asyncio.to_thread(self.backend.repository_models)
        entries = [IndexEntry(name, str(version), "READY") for name, version in loaded.items()]
        for name, problem in present.items():
            if name not in loaded:
                entries.append(IndexEntry(name, "", "UNAVAILABLE", problem or "unloaded"))
        return sorted(entries, key=lambda e: e.name)


def control_for(backend: object, mode: str, poll_interval_s: float) -> ModelControl | None:
    """The model control for ``backend``, or None when it cannot reload (Triton manages its own models)."""
    if not reloadable(backend):
        if mode != "none":
            log.warning("--model-control-mode %s applies to the embedded backend only; %s manages its own "
                        "models (use Triton's --model-control-mode)", mode, getattr(backend, "name", "?"))
        return None
    return ModelControl(backend, mode, poll_interval_s)  # type: ignore[arg-type]
