"""The gateway container image (Dockerfile).

By default (cheap, offline): hadolint is clean (and catches a broken Dockerfile), the Dockerfile has
the shape production needs, and the `serve` extra it installs resolves without torch.

With IMGSERVE_IMAGE_TEST=1 (`make image-test`, several minutes): builds the image for real with
buildah (scripts/image/build.sh), checks what is inside, then serves the default repository from it
(`buildah run`) and classifies a digit, and serves again from a read-only root filesystem.
"""
from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from packaging.requirements import Requirement

from serving.triton_local import free_port
from tests.procs import health_status
from tests.requirements import require_tool

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
BASE_DOCKERFILE = ROOT / "scripts" / "image" / "base.Dockerfile"
FORBIDDEN = {"torch", "torchvision", "triton", "onnx", "onnxscript", "mlxtend", "scikit-learn", "matplotlib"}
image_test = pytest.mark.skipif(not os.environ.get("IMGSERVE_IMAGE_TEST"),
                                reason="builds the image for real: IMGSERVE_IMAGE_TEST=1 (make image-test)")


# ------------------------------------------------------------------ static checks

def hadolint(*paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("hadolint"), *map(str, paths)], capture_output=True, text=True)


def test_hadolint_is_clean() -> None:
    result = hadolint(DOCKERFILE, BASE_DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_broken_dockerfile() -> None:
    result = hadolint(ROOT / "tests" / "fixtures" / "Dockerfile.broken")
    assert result.returncode != 0
    assert {"DL3007", "DL3008", "DL3015"} <= set(re.findall(r"DL\d{4}", result.stdout))


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]]   # (INSTRUCTION, arguments)


def parse_dockerfile(text: str) -> tuple[list[tuple[str, str]], list[Stage]]:
    """(instructions before the first FROM, stages) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("#") and not current:
            continue
        current += raw.rstrip("\\").strip() + " "
        if not raw.rstrip().endswith("\\"):
            if current.strip():
                lines.append(current.strip())
            current = ""
    preamble: list[tuple[str, str]] = []
    stages: list[Stage] = []
    for line in lines:
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            parts = args.split()
            stages.append(Stage(parts[0], parts[2] if len(parts) > 2 else "", []))
        elif stages:
            stages[-1].instructions.append((instruction, args))
        else:
            preamble.append((instruction, args))
    return preamble, stages


def test_dockerfile_is_multi_stage_non_root_and_pinned() -> None:
    preamble, stages = parse_dockerfile(DOCKERFILE.read_text())
    assert ("ARG", "BASE_IMAGE") in preamble, "BASE_IMAGE has no unpinned default: the build passes name@sha256"
    names = [s.name for s in stages]
    assert names[-1] == "runtime", "the default target is the gateway"
    assert "export" in names, "a target with the training tools for repository-building Jobs"
    for i, stage in enumerate(stages):
        assert stage.base == "${BASE_IMAGE}" or stage.base in names[:i], stage.base
    by_name = {s.name: s for s in stages}
    runtime = dict(by_name["runtime"].instructions)
    assert re.fullmatch(r"[1-9]\d{3,}:[1-9]\d{3,}", runtime["USER"]), "numeric, non-root"
    assert runtime["STOPSIGNAL"] == "SIGTERM"
    assert "/healthz" in runtime["HEALTHCHECK"]
    assert json.loads(runtime["ENTRYPOINT"]) == ["/opt/imgserve/bin/imgserve"] and json.loads(runtime["CMD"]) == ["serve"]
    runs = [args for ins, args in by_name["runtime"].instructions if ins == "RUN"]
    assert runs == ["mkdir /models"], "nothing is installed in the runtime stage"
    copies = [args for ins, args in by_name["runtime"].instructions if ins == "COPY"]
    assert copies == ["--from=build /opt/imgserve /opt/imgserve"]
    (install,) = [args for ins, args in by_name["build"].instructions if ins == "RUN"]
    assert '[serve]"' in install and "--no-index" in install and "uninstall --yes pip setuptools" in install


def test_build_context_is_only_the_wheels() -> None:
    lines = [ln for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines == ["*", "!build/wheels/", "!build/wheels-export/"]


def closure(extra: str) -> set[str]:
    """Distributions `imgserve[extra]` needs, resolved transitively through the installed metadata."""
    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    seen: set[tuple[str, str]] = set()        # (distribution, extra or "")
    todo = [("imgserve", extra), ("imgserve", "")]
    while todo:
        name, extra = todo.pop()
        if (norm(name), extra) in seen:
            continue
        seen.add((norm(name), extra))
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for spec in requires:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": extra}):
                todo.append((req.name, ""))
                todo.extend((req.name, e) for e in req.extras)
    return {name for name, _ in seen}


def test_serve_extra_resolves_without_torch() -> None:
    serve = closure("serve")
    assert {"onnxruntime", "grpcio", "tritonclient", "prometheus-client"} <= serve
    assert not serve & FORBIDDEN, serve & FORBIDDEN
    assert "torch" in closure("export"), "the same resolution does find torch where it is required"


# ------------------------------------------------------------------ the real image (opt-in)

BUILDAH = ["buildah", "--storage-driver", os.environ.get("BUILDAH_STORAGE_DRIVER", "vfs")]


@pytest.fixture(scope="module")
def image() -> dict:
    require_tool("buildah")
    require_tool("debootstrap")
    began = time.monotonic()
    facts_file = ROOT / "build" / "image" / "facts.json"
    # Locally, IMGSERVE_IMAGE_TEST_REUSE=1 tests the image the last build made; CI always builds.
    if not (os.environ.get("IMGSERVE_IMAGE_TEST_REUSE") and not os.environ.get("CI") and facts_file.is_file()):
        subprocess.run(["scripts/image/build.sh"], cwd=ROOT, check=True, env={**os.environ, "PY": sys.executable},
                       stdout=subprocess.DEVNULL)
    facts = json.loads(facts_file.read_text())
    facts["measured_build_seconds"] = round(time.monotonic() - began)
    print(f"\nimage {facts['image']}: {facts['size']}, built in {facts['measured_build_seconds']} s "
          f"from {facts['base']}")
    return facts


@pytest.fixture(scope="module")
def container(image: dict) -> Iterator[str]:
    name = f"imgserve-test-{os.getpid()}"
    subprocess.run([*BUILDAH, "from", "--name", name, image["image"]], check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run([*BUILDAH, "rm", name], capture_output=True)


def run_in(container: str, script: str) -> str:
    return subprocess.run([*BUILDAH, "run", "--isolation", "chroot", container, "--", "sh", "-c", script],
                          check=True, capture_output=True, text=True).stdout


@image_test
def test_base_is_pinned_by_digest(image: dict) -> None:
    assert re.fullmatch(r"localhost/imgserve-base@sha256:[0-9a-f]{64}", image["base"])


@image_test
def test_image_config_keeps_user_stop_signal_and_healthcheck(image: dict) -> None:
    config = json.loads(subprocess.run([*BUILDAH, "inspect", "--type", "image", image["image"]], check=True,
                                       capture_output=True, text=True).stdout)["Docker"]["config"]
    assert config["User"] == "10001:10001" and config["StopSignal"] == "SIGTERM"
    assert "/healthz" in " ".join(config["Healthcheck"]["Test"])
    assert config["Entrypoint"] == ["/opt/imgserve/bin/imgserve"] and config["Cmd"] == ["serve"]


@image_test
def test_image_has_no_torch_no_compilers_and_runs_as_non_root(container: str) -> None:
    assert run_in(container, "id -u").strip() == "10001"
    dists = json.loads(run_in(container, "/opt/imgserve/bin/python -c 'import json, importlib.metadata as m; "
                                         "print(json.dumps(sorted(d.metadata[\"Name\"].lower() for d in m.distributions())))'"))
    print("\ndistributions in the image:", ", ".join(dists))
    assert "onnxruntime" in dists and "imgserve" in dists
    assert not set(dists) & FORBIDDEN and "pip" not in dists
    assert run_in(container, "/opt/imgserve/bin/python -c 'import importlib.util as u; print(u.find_spec(\"torch\"))'"
                  ).strip() == "None"
    assert run_in(container, "for t in gcc cc c++ make ld as pip pip3; do command -v $t; done; true").strip() == ""


@image_test
def test_pip_report_of_the_image_wheels_has_no_torch() -> None:
    wheel = next((ROOT / "build" / "wheels").glob("imgserve-*.whl"))
    report = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                             "--report", "-", "--no-index", "--find-links", str(ROOT / "build" / "wheels"),
                             f"{wheel}[serve]"], check=True, capture_output=True, text=True).stdout
    names = {item["metadata"]["name"].lower() for item in json.loads(report)["install"]}
    assert "onnxruntime" in names and not names & FORBIDDEN


def png_digit(mnist_heldout: tuple[np.ndarray, np.ndarray]) -> tuple[bytes, str]:
    from PIL import Image

    images, labels = mnist_heldout
    buf = io.BytesIO()
    Image.fromarray(images[0]).save(buf, format="PNG")
    return buf.getvalue(), str(labels[0])


@pytest.fixture()
def ports() -> tuple[int, int]:
    grpc_port, http_port = free_port(), free_port()
    while http_port == grpc_port:
        http_port = free_port()
    return grpc_port, http_port


def wait_and_classify(proc: subprocess.Popen, grpc_port: int, digit: bytes, log: Path) -> str:
    from clients.sdk import ImageClient

    deadline = time.monotonic() + 120
    while health_status(f"127.0.0.1:{grpc_port}") != health_pb2.HealthCheckResponse.SERVING:
        assert proc.poll() is None, f"gateway in the image exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"not SERVING after 120 s:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)
    with ImageClient(f"127.0.0.1:{grpc_port}") as client:
        return client.classify(digit, model="lenet5", top_k=1)[0][0].label


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), parents before children."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def gateway_pid(proc: subprocess.Popen) -> int:
    """The gateway process under ``proc``: the deepest one whose argv runs imgserve serve (buildah's own
    intermediate processes carry the same command in their argv)."""
    for pid in reversed([proc.pid, *descendants(proc.pid)]):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"/imgserve") for a in argv) and b"serve" in argv:
            return pid
    raise LookupError(f"no gateway process under {proc.pid}")


def stop(proc: subprocess.Popen) -> int:
    """SIGTERM to the gateway itself, as the kubelet does to a container's PID 1.

    (`buildah run` with chroot isolation does not forward SIGTERM: it SIGKILLs its child.)
    """
    os.kill(gateway_pid(proc), signal.SIGTERM)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


def serve_and_classify(argv: list[str], grpc_port: int, digit: bytes, log: Path) -> tuple[str, int, str]:
    """Start the gateway with ``argv``, classify ``digit`` once it is SERVING, SIGTERM it:
    (label, exit code, its log)."""
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            label = wait_and_classify(proc, grpc_port, digit, log)
        finally:
            code = stop(proc)
    return label, code, log.read_text()


@image_test
def test_image_serves_the_default_repository(container: str, default_repository: Path,
                                             mnist_heldout: tuple[np.ndarray, np.ndarray], ports: tuple[int, int],
                                             tmp_path: Path) -> None:
    digit, truth = png_digit(mnist_heldout)
    grpc_port, http_port = ports
    label, code, log = serve_and_classify(
        [*BUILDAH, "run", "--isolation", "chroot", "-v", f"{default_repository}:/models:ro",
         "-e", f"IMGSERVE_GRPC_PORT={grpc_port}", "-e", f"IMGSERVE_HTTP_PORT={http_port}",
         "-e", "IMGSERVE_HOST=127.0.0.1", container, "--", "/opt/imgserve/bin/imgserve", "serve"],
        grpc_port, digit, tmp_path / "gateway.log")
    assert label == truth
    assert code == 0, log[-3000:]
    assert "draining" in log, "SIGTERM reached the gateway and it drained"


@image_test
def test_image_serves_from_a_read_only_root_filesystem(container: str, image: dict, default_repository: Path,
                                                       mnist_heldout: tuple[np.ndarray, np.ndarray],
                                                       ports: tuple[int, int], tmp_path: Path) -> None:
    """What `readOnlyRootFilesystem: true` + an emptyDir /tmp gives the pod, with the image's own user,
    environment, entrypoint and command: a private mount namespace, the image's root bind-mounted
    read-only, tmpfs /tmp, and the repository at /models."""
    require_tool("unshare")
    config = json.loads(subprocess.run([*BUILDAH, "inspect", "--type", "image", image["image"]], check=True,
                                       capture_output=True, text=True).stdout)["Docker"]["config"]
    root = subprocess.run([*BUILDAH, "mount", container], check=True, capture_output=True, text=True).stdout.strip()
    digit, truth = png_digit(mnist_heldout)
    grpc_port, http_port = ports
    env = [*config["Env"], f"IMGSERVE_GRPC_PORT={grpc_port}", f"IMGSERVE_HTTP_PORT={http_port}",
           "IMGSERVE_HOST=127.0.0.1"]
    command = [*config["Entrypoint"], *config["Cmd"]]
    target = Path(tempfile.mkdtemp(prefix="imgserve-ro-"))
    script = (f"set -e; mount --bind {root} {target}; mount -o remount,bind,ro {target}; "
              f"mount -t proc proc {target}/proc; mount --rbind /dev {target}/dev; "
              f"mount -t tmpfs -o size=64m tmpfs {target}/tmp; mount --bind -o ro {default_repository} {target}/models; "
              f"cd {target}/tmp; exec chroot --userspec={config['User']} {target} env -i "
              + " ".join(f"'{e}'" for e in env) + " " + " ".join(command))
    try:
        label, code, log = serve_and_classify(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                                              grpc_port, digit, tmp_path / "gateway-ro.log")
        assert label == truth
        assert code == 0, log[-3000:]
        assert "Read-only file system" not in log
    finally:
        subprocess.run([*BUILDAH, "umount", container], capture_output=True)
        target.rmdir()
