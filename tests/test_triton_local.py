"""triton-local: a real tritonserver (from the nvidia-pytriton wheel) over the unmodified repository.

Everything here talks to a real Triton process on free ports; nothing is mocked.
"""
from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.grpc.aio as triton_aio
from google.protobuf import text_format

from serving.repository import parse_config
from serving.triton_local import SHM_DIR, TritonLocal, TritonLocalError
from serving.triton_local import main as triton_local_main
from tests.procs import imgserve_executable

pytestmark = pytest.mark.triton   # the suite-wide timeout (900 s) also covers building model_repo

ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 180.0   # generous: the suite shares 2 busy cores


def group_alive(pgid: int) -> bool:
    """Whether any process is left in a process group."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def shm_regions(prefix: str) -> list[str]:
    return sorted(p.name for p in SHM_DIR.glob(prefix + "*"))


_SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)')


def metric_values(metrics_url: str, name: str) -> dict[str, float]:
    """{model: value} of one Triton metric, read from its Prometheus endpoint (samples summed per model)."""
    with urllib.request.urlopen(metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or match["name"] != name:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"] or ""))
        model = labels.get("model", "")
        values[model] = values.get(model, 0.0) + float(match["value"])
    return values


def ort_run(onnx_path: Path, batch: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {"image": batch})[0]


def triton_infer(url: str, model: str, batch: np.ndarray) -> np.ndarray:
    with triton_grpc.InferenceServerClient(url) as client:
        tensor = triton_grpc.InferInput("image", list(batch.shape), "UINT8")
        tensor.set_data_from_numpy(batch)
        result = client.infer(model, [tensor], outputs=[triton_grpc.InferRequestedOutput("probabilities")])
        return result.as_numpy("probabilities")


@pytest.fixture(scope="module")
def triton(model_repo: Path) -> TritonLocal:
    server = TritonLocal(model_repo, startup_timeout_s=STARTUP_TIMEOUT_S)
    with server:
        yield server
    assert not group_alive(server.proc.pid), "tritonserver or a python stub outlived stop()"
    assert shm_regions(server.shm_prefix) == []


def test_unmodified_repository_loads(triton: TritonLocal, model_repo: Path) -> None:
    for name in ("lenet5", "rgbnet"):
        on_disk = parse_config((model_repo / name / "config.pbtxt").read_text())
        assert on_disk.platform == "onnxruntime_onnx" and on_disk.backend == "", "repository must stay unmodified"
    with triton_grpc.InferenceServerClient(triton.grpc_url) as client:
        assert client.is_server_ready()
        index = {m.name: m.state for m in client.get_model_repository_index().models}
        assert index == {"lenet5": "READY", "rgbnet": "READY"}
        cfg = client.get_model_config("rgbnet").config
        assert cfg.platform == "onnxruntime_onnx"
        assert cfg.backend == "onnxruntime"            # served by our Python-based backend of that name
        assert cfg.parameters["imgserve.crop"].string_value == "64"
        meta = client.get_model_metadata("lenet5")
        assert [(i.name, i.datatype, list(i.shape)) for i in meta.inputs] == [("image", "UINT8", [-1, 28, 28, 1])]


def test_infer_equals_onnxruntime(triton: TritonLocal, model_repo: Path,
                                  mnist_heldout: tuple[np.ndarray, np.ndarray]) -> None:
    images, _labels = mnist_heldout
    digits = images[:17, :, :, None].copy()
    rgb = np.random.default_rng(1).integers(0, 256, size=(5, 64, 64, 3), dtype=np.uint8)
    for model, batch in (("lenet5", digits), ("rgbnet", rgb), ("rgbnet", rgb[:1])):
        got = triton_infer(triton.grpc_url, model, batch)
        want = ort_run(model_repo / model / "1" / "model.onnx", batch)
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-4)


def test_dynamic_batching_merges_concurrent_requests(triton: TritonLocal, model_repo: Path) -> None:
    """Triton batches concurrent requests; our backend runs each batch in one call and splits it back right."""
    rng = np.random.default_rng(2)
    sizes = [1, 2, 3] * 16
    batches = [rng.integers(0, 256, size=(n, 64, 64, 3), dtype=np.uint8) for n in sizes]
    before_exec = metric_values(triton.metrics_url, "nv_inference_exec_count").get("rgbnet", 0.0)
    before_ok = metric_values(triton.metrics_url, "nv_inference_request_success").get("rgbnet", 0.0)

    async def fire() -> list[np.ndarray]:
        async with triton_aio.InferenceServerClient(triton.grpc_url) as client:
            async def one(batch: np.ndarray) -> np.ndarray:
                tensor = triton_aio.InferInput("image", list(batch.shape), "UINT8")
                tensor.set_data_from_numpy(batch)
                result = await client.infer("rgbnet", [tensor])
                return result.as_numpy("probabilities")
            return await asyncio.gather(*(one(b) for b in batches))

    results = asyncio.run(fire())
    want = ort_run(model_repo / "rgbnet" / "1" / "model.onnx", np.concatenate(batches))
    np.testing.assert_allclose(np.concatenate(results), want, atol=1e-5, rtol=0)  # each answer is its own

    executions = metric_values(triton.metrics_url, "nv_inference_exec_count")["rgbnet"] - before_exec
    successes = metric_values(triton.metrics_url, "nv_inference_request_success")["rgbnet"] - before_ok
    assert successes == len(batches)
    assert executions < successes, f"no dynamic batching: {executions} executions for {successes} requests"


def test_sigterm_stops_everything(model_repo: Path) -> None:
    server = TritonLocal(model_repo, startup_timeout_s=STARTUP_TIMEOUT_S)
    server.start()
    try:
        pgid = server.proc.pid
        members = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True).stdout.split()
        assert len(members) >= 3, f"expected tritonserver + one stub per model, got {members}"
        assert len(shm_regions(server.shm_prefix)) >= 2     # one region per python-backend model instance
        print(f"triton-local startup: {server.startup_s:.2f}s")
        began = time.monotonic()
    finally:
        code = server.stop()
    print(f"triton-local stop: {time.monotonic() - began:.2f}s")
    assert code == 0, server.log_tail()
    assert not group_alive(pgid)
    assert shm_regions(server.shm_prefix) == []
    assert server.work_dir is not None and not server.work_dir.exists(), "temporary work dir must be removed"
    assert "Signal (15) received" in server.log_text()


def test_reused_work_dir_is_prepared_once(model_repo: Path, tmp_path: Path) -> None:
    work = tmp_path / "triton-work"
    with TritonLocal(model_repo, work_dir=work, startup_timeout_s=STARTUP_TIMEOUT_S) as server:
        assert (work / "backends" / "onnxruntime" / "model.py").is_file()
        assert (work / "backends" / "python" / "triton_python_backend_stub").is_file()
        stamp_time = (work / ".imgserve-triton-stamp").stat().st_mtime_ns
        out = triton_infer(server.grpc_url, "lenet5", np.zeros((1, 28, 28, 1), np.uint8))
        assert out.shape == (1, 10)
    with TritonLocal(model_repo, work_dir=work, startup_timeout_s=STARTUP_TIMEOUT_S):
        assert (work / ".imgserve-triton-stamp").stat().st_mtime_ns == stamp_time
    assert work.is_dir(), "a caller's work dir is kept"


@pytest.mark.parametrize("breakage,expected", [
    ("garbage_onnx", "cannot load"),
    ("wrong_input_name", "are not in model.onnx"),
])
def test_broken_model_fails_with_tritons_log(breakage: str, expected: str, model_repo: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(model_repo / "lenet5", repo / "lenet5")
    if breakage == "garbage_onnx":
        (repo / "lenet5" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    else:
        cfg = parse_config((repo / "lenet5" / "config.pbtxt").read_text())
        cfg.input[0].name = "pixels"
        del cfg.model_warmup[:]
        (repo / "lenet5" / "config.pbtxt").write_text(text_format.MessageToString(cfg))
    server = TritonLocal(repo, startup_timeout_s=STARTUP_TIMEOUT_S)
    with pytest.raises(TritonLocalError) as info:
        server.start()
    message = str(info.value)
    assert "exited with code 1" in message and "lenet5" in message and expected in message, message
    assert not group_alive(server.proc.pid)
    assert shm_regions(server.shm_prefix) == []


def test_missing_repository_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(TritonLocalError, match="does not exist"):
        TritonLocal(tmp_path / "nope").start()
    assert triton_local_main(["--model-repository", str(tmp_path / "nope"), "--http-port", "0",
                              "--grpc-port", "0", "--metrics-port", "0"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert triton_local_main(["--model-repository", str(tmp_path), "--grpc-port", "70000"]) == 2


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


READY_LINE = re.compile(r"triton-local ready in \S+: grpc (\S+)\s+http (\S+)")


@pytest.mark.slow
def test_cli_runs_until_sigterm(model_repo: Path) -> None:
    """Ports 0: the command picks them (retrying if one is taken meanwhile) and says which in its ready line."""
    proc = subprocess.Popen(
        [str(imgserve_executable()), "triton-local", "--model-repository", str(model_repo), "--grpc-port", "0",
         "--http-port", "0", "--metrics-port", "0", "--startup-timeout", str(STARTUP_TIMEOUT_S)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: list[bytes] = []
    try:
        ready = None
        while ready is None:   # bounded by the command's own --startup-timeout (it exits, the pipe closes)
            line = proc.stdout.readline()
            assert line, "triton-local exited before it was ready:\n" + b"".join(lines).decode(errors="replace")
            lines.append(line)
            ready = READY_LINE.search(line.decode(errors="replace"))
        grpc_url, http_url = ready.group(1), ready.group(2)
        with urllib.request.urlopen(f"{http_url}/v2/health/ready", timeout=30) as resp:
            assert resp.status == 200
        server_pids = _children(proc.pid)
        assert len(server_pids) == 1
        out = triton_infer(grpc_url, "lenet5", np.zeros((2, 28, 28, 1), np.uint8))
        assert out.shape == (2, 10)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = b"".join(lines).decode(errors="replace") + output.decode(errors="replace")
    assert proc.returncode == 0, text
    assert "triton-local ready" in text
    assert not group_alive(server_pids[0])



@pytest.mark.slow
def test_tritonserver_dies_with_its_parent(model_repo: Path) -> None:
    """If the process that started Triton is SIGKILLed, the kernel SIGTERMs Triton: nothing is orphaned."""
    script = (
        "import sys, time\n"
        "from serving.triton_local import TritonLocal\n"
        f"t = TritonLocal({str(model_repo)!r}, startup_timeout_s={STARTUP_TIMEOUT_S}).start()\n"
        "print(t.proc.pid, t.shm_prefix, t.work_dir, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    work_dir = None
    try:
        line = parent.stdout.readline().split()
        assert len(line) == 3, f"parent did not start Triton (exit code {parent.poll()})"
        pgid, prefix, work_dir = int(line[0]), line[1], Path(line[2])
        assert group_alive(pgid) and shm_regions(prefix)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 90
        while group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not group_alive(pgid), "tritonserver outlived its parent"
        assert shm_regions(prefix) == [], "Triton's graceful exit removes its shm regions"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if work_dir is not None:
            shutil.rmtree(work_dir, ignore_errors=True)


def test_a_picked_port_taken_meanwhile_is_picked_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The race every free-port picker has: another process binds the port before Triton does.
    Forced here by handing out a port that is already listening as the first pick."""
    import socket

    from serving import triton_local

    real_free_port = triton_local.free_port
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        picks = iter([taken])
        monkeypatch.setattr(triton_local, "free_port", lambda host="127.0.0.1": next(picks, 0) or real_free_port(host))
        with TritonLocal(tmp_path, startup_timeout_s=STARTUP_TIMEOUT_S) as server:   # an empty repository
            assert server.grpc_port != taken
            with triton_grpc.InferenceServerClient(server.grpc_url) as client:
                assert client.is_server_ready()
        # a port the caller asked for is not silently replaced: the start fails
        explicit = TritonLocal(tmp_path, grpc_port=taken, startup_timeout_s=STARTUP_TIMEOUT_S)
        with pytest.raises(TritonLocalError):
            explicit.start()
        assert explicit.grpc_port == taken
