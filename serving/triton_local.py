"""Run a real Triton Inference Server over an imgserve model repository, without containers.

The ``nvidia-pytriton`` wheel ships a complete ``tritonserver`` (2.51) with the
python backend but without the C++ onnxruntime backend. ``TritonLocal``
assembles a runnable installation in a work directory:

* ``bin/``, ``backends/python`` and ``caches/`` copied from ``pytriton/tritonserver``;
* the python backend stub matching this interpreter (``python_backend_stubs/3.X``)
  copied into ``backends/python/``;
* ``backends/onnxruntime/model.py`` - imgserve's Python-based backend
  (serving/triton_onnx_backend/model.py), which makes unmodified
  ``platform: "onnxruntime_onnx"`` configs load.

The stub runs on this interpreter's libpython (``sys.base_prefix/lib``) and
imports numpy/onnxruntime from this environment's site-packages, put on its
``PYTHONPATH``: the stub needs numpy < 2 (with numpy 2 its outputs come back
empty), which is why imgserve pins numpy < 2.

``imgserve triton-local`` is the command-line face of the same class.
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import importlib.util
import os
import shutil
import signal
import site
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Callable, Sequence

BACKEND_SOURCE = Path(__file__).with_name("triton_onnx_backend") / "model.py"
SHM_DIR = Path("/dev/shm")  # nosec B108 - Triton's shared-memory mount, not a temp file we create
_PR_SET_PDEATHSIG = 1


class TritonLocalError(RuntimeError):
    """tritonserver could not be prepared, did not become ready, or failed."""


@dataclass(frozen=True)
class TritonDistribution:
    """Where the pieces of the wheel's Triton live on this machine."""

    server_dir: Path        # .../pytriton/tritonserver
    libs_dir: Path          # .../nvidia_pytriton.libs (bundled shared libraries)
    stub: Path              # python backend stub for this interpreter's version
    python_lib_dir: Path    # directory with libpython3.X.so
    site_packages: tuple[Path, ...]

    @classmethod
    def find(cls) -> "TritonDistribution":
        """Locate the installed nvidia-pytriton wheel; explain what is missing when it is not usable."""
        # Located, not imported: only the wheel's files are needed, none of pytriton's Python code.
        found = importlib.util.find_spec("pytriton")
        if found is None or found.origin is None:
            raise TritonLocalError("triton-local needs nvidia-pytriton: pip install 'imgserve[triton]'")
        root = Path(found.origin).resolve().parent
        server_dir = root / "tritonserver"
        libs_dir = root.parent / "nvidia_pytriton.libs"
        if not libs_dir.is_dir():  # source installs keep them inside the package
            libs_dir = server_dir / "external_libs"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = server_dir / "python_backend_stubs" / version / "triton_python_backend_stub"
        python_lib_dir = Path(sys.base_prefix) / "lib"
        for path, what in ((server_dir / "bin" / "tritonserver", "tritonserver binary"),
                           (server_dir / "backends" / "python" / "libtriton_python.so", "python backend"),
                           (stub, f"python backend stub for Python {version}"),
                           (libs_dir, "bundled libraries")):
            if not path.exists():
                raise TritonLocalError(f"nvidia-pytriton install lacks the {what}: {path}")
        libpython = python_lib_dir / f"libpython{version}.so.1.0"
        if not libpython.exists() and not (python_lib_dir / f"libpython{version}.so").exists():
            raise TritonLocalError(
                f"the python backend stub needs the shared libpython{version}.so in {python_lib_dir}; "
                "use a Python built with --enable-shared")
        packages = tuple(Path(p) for p in site.getsitepackages() if Path(p).is_dir())
        return cls(server_dir, libs_dir, stub, python_lib_dir, packages)


def check_stub_environment() -> None:
    """Fail early, with the reason, when the stub's environment cannot run the onnxruntime backend."""
    try:
        import numpy  # noqa: PLC0415
        import onnxruntime  # noqa: F401, PLC0415
    except ImportError as exc:
        raise TritonLocalError(f"the onnxruntime backend needs numpy and onnxruntime here: {exc}") from exc
    if int(numpy.__version__.split(".")[0]) >= 2:
        raise TritonLocalError(
            f"numpy {numpy.__version__} is installed; Triton's python backend stub (2.51) returns empty "
            "outputs with numpy 2 - install numpy<2")


def prepare_work_dir(work_dir: Path, dist: TritonDistribution | None = None) -> Path:
    """Assemble a runnable Triton installation in ``work_dir`` (idempotent; recopies when sources change)."""
    dist = dist or TritonDistribution.find()
    work_dir = Path(work_dir).resolve()
    stamp = work_dir / ".imgserve-triton-stamp"
    digest = hashlib.sha256()
    for path in (dist.server_dir / "bin" / "tritonserver", dist.stub, BACKEND_SOURCE):
        st = path.stat()
        digest.update(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode())
    digest.update(BACKEND_SOURCE.read_bytes())
    wanted = digest.hexdigest()
    if stamp.is_file() and stamp.read_text() == wanted:
        return work_dir
    work_dir.mkdir(parents=True, exist_ok=True)
    for part in ("bin", "backends", "caches"):
        target = work_dir / part
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(dist.server_dir / part, target, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(dist.stub, work_dir / "backends" / "python" / "triton_python_backend_stub")
    ort_dir = work_dir / "backends" / "onnxruntime"
    ort_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(BACKEND_SOURCE, ort_dir / "model.py")
    stamp.write_text(wanted)
    return work_dir


def server_environment(dist: TritonDistribution, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for tritonserver and (inherited) the python backend stubs."""
    env = dict(os.environ if base is None else base)
    libs = [str(dist.libs_dir), str(dist.python_lib_dir)]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "/usr/bin:/bin")])
    # The stub runs the base interpreter's libpython; this environment's packages (numpy<2,
    # onnxruntime) must come before the base interpreter's own site-packages.
    paths = [str(p) for p in dist.site_packages]
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.pop("PYTHONHOME", None)
    return env


PORT_ATTEMPTS = 3
PORT_TAKEN = "already in use"   # tritonserver: "failed to start GRPC service: ... Socket '...' already in use"


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """A preexec_fn that makes the kernel SIGTERM tritonserver when its parent dies (no orphans).

    prctl is resolved here, in the parent: the child between fork and exec must not
    dlopen anything (another thread may have held the loader lock at fork time).
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)

    return preexec


class TritonLocal:
    """A tritonserver subprocess over a model repository; a context manager that starts and stops it.

    Ports left at 0 are picked free. ``stop()`` sends SIGTERM (SIGKILL would leave the
    python backend's /dev/shm regions behind) and removes any shm region this
    instance created. With ``die_with_parent`` the server gets SIGTERM if the
    *thread* that called ``start()`` exits, so call it from a long-lived thread.
    """

    def __init__(
        self,
        model_repository: Path | str,
        *,
        grpc_port: int = 0,
        http_port: int = 0,
        metrics_port: int = 0,
        host: str = "127.0.0.1",
        work_dir: Path | str | None = None,
        startup_timeout_s: float = 120.0,
        exit_timeout_s: int = 30,
        log_verbose: int = 0,
        log_to_console: bool = False,
        die_with_parent: bool = True,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        self.host = host
        self.grpc_port, self.http_port, self.metrics_port = grpc_port, http_port, metrics_port
        self._work_dir_arg = Path(work_dir) if work_dir is not None else None
        self.work_dir: Path | None = None
        self.startup_timeout_s = startup_timeout_s
        self.exit_timeout_s = exit_timeout_s
        self.log_verbose = log_verbose
        self.log_to_console = log_to_console
        self.die_with_parent = die_with_parent
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None
        self.startup_s: float | None = None
        self.shm_prefix = f"imgserve_triton_{os.getpid()}_{uuid.uuid4().hex[:8]}_"
        self._temp_work_dir = False
        self._abort = False
        self._last_log = ""   # kept after a temporary work dir (and the log in it) is removed

    # ------------------------------------------------------------ addresses

    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host  # nosec B104 - a comparison, not a bind

    @property
    def grpc_url(self) -> str:
        """host:port for tritonclient.grpc."""
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self._client_host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.metrics_port}/metrics"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ------------------------------------------------------------ lifecycle

    def command(self) -> list[str]:
        """The tritonserver command line (work dir must be prepared)."""
        assert self.work_dir is not None
        return [
            str(self.work_dir / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={self.work_dir / 'backends'}",
            f"--cache-directory={self.work_dir / 'caches'}",
            "--allow-gpu-metrics=false",
            "--pinned-memory-pool-byte-size=0",
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            f"--http-address={self.host}", f"--http-port={self.http_port}",
            f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--log-verbose={self.log_verbose}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            *self.extra_args,
        ]

    def start(self) -> "TritonLocal":
        """Start tritonserver and block until it reports ready (all models loaded)."""
        if self.proc is not None:
            raise TritonLocalError("this TritonLocal was already started")
        if not self.model_repository.is_dir():
            raise TritonLocalError(f"model repository {self.model_repository} does not exist")
        check_stub_environment()
        dist = TritonDistribution.find()
        if self._work_dir_arg is None:
            self.work_dir = Path(tempfile.mkdtemp(prefix="imgserve-triton-"))
            self._temp_work_dir = True
        else:
            self.work_dir = self._work_dir_arg.resolve()
        began = time.monotonic()
        requested = (self.grpc_port, self.http_port, self.metrics_port)   # 0: pick a free one
        try:
            prepare_work_dir(self.work_dir, dist)
            for attempt in range(1, PORT_ATTEMPTS + 1):
                self._launch(dist)
                try:
                    self.wait_ready(self.startup_timeout_s)
                    break
                except TritonLocalError as exc:
                    # A port picked free a moment ago was taken before Triton bound it: pick again.
                    if attempt == PORT_ATTEMPTS or not self._picked_port_was_taken(requested, str(exc)):
                        raise
                    self._forget_failed_launch(requested)
        except BaseException:
            self.stop()   # also removes a temporary work dir and any shm region
            raise
        self.startup_s = time.monotonic() - began
        return self

    def _picked_port_was_taken(self, requested: tuple[int, int, int], error: str) -> bool:
        """Whether a start failed because a port *we* picked is in use by someone else.

        Triton usually says so in its log, but it can also abort before the line is written;
        then a port of ours that still cannot be bound (Triton has exited) tells the same.
        """
        picked = [port for port, asked in zip((self.grpc_port, self.http_port, self.metrics_port), requested)
                  if asked == 0]
        if not picked or self.proc is None or self.proc.poll() is None:
            return False
        if PORT_TAKEN in error:
            return True
        bind = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host  # nosec B104 - maps "all" to loopback
        for port in picked:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "taken"
                try:
                    probe.bind((bind, port))
                except OSError:
                    return True
        return False

    def _forget_failed_launch(self, requested: tuple[int, int, int]) -> None:
        """Clean up after a launch that exited while starting, and unpick the auto-picked ports."""
        if self.proc is not None:
            self._reap_group(self.proc.pid)
        self.remove_shm_regions()
        self.proc = None
        self.grpc_port, self.http_port, self.metrics_port = requested

    def _launch(self, dist: TritonDistribution) -> None:
        assert self.work_dir is not None
        bind = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host  # nosec B104 - maps "all" to loopback
        self.grpc_port = self.grpc_port or free_port(bind)
        self.http_port = self.http_port or free_port(bind)
        self.metrics_port = self.metrics_port or free_port(bind)
        self.log_path = self.work_dir / f"tritonserver-{self.http_port}.log"
        out = None if self.log_to_console else open(self.log_path, "wb")  # noqa: SIM115 - the child owns it
        try:
            self.proc = subprocess.Popen(
                self.command(), env=server_environment(dist), cwd=self.work_dir,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT if out else None,
                start_new_session=True,  # own process group: stubs stop with it, terminal ^C does not hit it
                preexec_fn=_pdeathsig_preexec() if self.die_with_parent else None,
            )
        finally:
            if out is not None:
                out.close()

    def wait_ready(self, timeout_s: float) -> None:
        """Poll /v2/health/ready until it answers 200; raise with Triton's log if it exits or times out."""
        deadline = time.monotonic() + timeout_s
        url = f"{self.http_url}/v2/health/ready"
        while True:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise TritonLocalError(f"tritonserver exited with code {code} while starting\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2.0) as resp:  # nosec B310 - url is http://<our host>:<port>
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if self._abort:
                raise TritonLocalError("interrupted while waiting for tritonserver")
            if time.monotonic() > deadline:
                raise TritonLocalError(f"tritonserver not ready after {timeout_s:.0f}s\n{self.log_tail()}")
            time.sleep(0.1)

    def abort(self) -> None:
        """Make a start() blocked in wait_ready give up (signal-handler safe)."""
        self._abort = True

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGTERM and wait (Triton drains in-flight requests); SIGKILL the group only as a last resort.

        Returns tritonserver's exit code (None if it never started). Idempotent.
        """
        proc = self.proc
        code: int | None = None
        if proc is not None:
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=timeout_s if timeout_s is not None else self.exit_timeout_s + 15)
                except subprocess.TimeoutExpired:
                    self._kill_group(proc.pid)
                    proc.wait(timeout=10)
            code = proc.returncode
            self._reap_group(proc.pid)
        self.remove_shm_regions()
        if self._temp_work_dir and self.work_dir is not None and self.work_dir.exists():
            if self.log_path is not None and self.log_path.is_file():
                self._last_log = self.log_path.read_text(errors="replace")
            shutil.rmtree(self.work_dir, ignore_errors=True)
        return code

    @staticmethod
    def _kill_group(pgid: int) -> None:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    @staticmethod
    def _reap_group(pgid: int, grace_s: float = 10.0) -> None:
        """Wait for stubs left in tritonserver's process group to exit; kill them after a grace period."""
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(0.1)
        TritonLocal._kill_group(pgid)

    def remove_shm_regions(self) -> list[Path]:
        """Delete /dev/shm regions whose names carry this instance's prefix (left only after a crash)."""
        removed = []
        if SHM_DIR.is_dir():
            for region in SHM_DIR.glob(self.shm_prefix + "*"):
                try:
                    region.unlink()
                    removed.append(region)
                except FileNotFoundError:
                    pass
        return removed

    def log_text(self) -> str:
        if self.log_path is not None and self.log_path.is_file():
            return self.log_path.read_text(errors="replace")
        return self._last_log

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_text()
        if not text:
            return "(no log captured; run with log_to_console to see Triton's output)" if self.log_to_console else ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> "TritonLocal":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


# ---------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="imgserve triton-local",
        description="Run the tritonserver from the nvidia-pytriton wheel over a model repository "
                    "(onnxruntime_onnx models run through imgserve's Python-based onnxruntime backend). "
                    "Arguments after '--' go to tritonserver unchanged.")
    p.add_argument("--model-repository", type=Path, required=True, help="Triton model repository directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001; 0 picks a free one)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP port (default 8000; 0 picks a free one)")
    p.add_argument("--metrics-port", type=int, default=8002, help="metrics port (default 8002; 0 picks a free one)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="where the Triton installation is assembled (reused between runs; default: a temp dir)")
    p.add_argument("--startup-timeout", type=float, default=120.0, help="seconds to wait for readiness")
    p.add_argument("--log-verbose", type=int, default=0, help="Triton's --log-verbose level")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    for name in ("grpc_port", "http_port", "metrics_port"):
        if not 0 <= getattr(args, name) < 65536:
            print(f"imgserve triton-local: --{name.replace('_', '-')} out of range", file=sys.stderr)
            return 2
    server = TritonLocal(
        args.model_repository, grpc_port=args.grpc_port, http_port=args.http_port,
        metrics_port=args.metrics_port, host=args.host, work_dir=args.work_dir,
        startup_timeout_s=args.startup_timeout, log_verbose=args.log_verbose,
        log_to_console=True, extra_args=extra)

    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        server.abort()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            server.start()
        except TritonLocalError as exc:
            print(f"imgserve triton-local: {exc}", file=sys.stderr)
            return 1
        print(f"triton-local ready in {server.startup_s:.1f}s: grpc {server.grpc_url}  http {server.http_url}  "
              f"metrics {server.metrics_url}", file=sys.stderr, flush=True)
        while not stopping and server.running:
            time.sleep(0.2)
        if not stopping:
            code = server.proc.returncode if server.proc else 1
            print(f"imgserve triton-local: tritonserver exited unexpectedly (code {code})", file=sys.stderr)
            server.stop()
            return 1
        code = server.stop()
        return 0 if code in (0, None) else 1
    finally:
        server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    sys.exit(main())
