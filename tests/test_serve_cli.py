"""`imgserve serve` refuses bad settings and unusable repositories clearly, and says how to call it."""
from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from tests.procs import ROOT, imgserve_executable, run_gateway


def serve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(imgserve_executable()), "serve", "--host", "127.0.0.1", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.parametrize("args, text", [
    (["--grpc-port", "abc"], "grpc_port"),
    (["--grpc-port", "70000"], "grpc_port out of range"),
    (["--backend", "tensorflow"], "backend must be"),
    (["--backend", "triton"], "--triton-url"),
    (["--max-queue-size", "0"], "max_queue_size"),
    (["--log-level", "LOUD"], "log_level"),
])
def test_invalid_settings_exit_2(args: list[str], text: str) -> None:
    result = serve(*args)
    assert result.returncode == 2, result.stderr
    assert "invalid settings" in result.stderr and text in result.stderr


def test_env_settings_are_validated_too(tmp_path: Path) -> None:
    result = subprocess.run([str(imgserve_executable()), "serve"], capture_output=True, text=True, timeout=60,
                            env={"IMGSERVE_HTTP_PORT": "-5", "PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    assert result.returncode == 2 and "http_port" in result.stderr


def test_missing_repository_says_how_to_build_one(tmp_path: Path) -> None:
    result = serve("--model-repository", str(tmp_path / "nowhere"))
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "imgserve build-repo" in result.stderr


def test_empty_repository_says_how_to_build_one(tmp_path: Path) -> None:
    result = serve("--model-repository", str(tmp_path))
    assert result.returncode == 2
    assert "holds no models" in result.stderr and "imgserve build-repo" in result.stderr


def test_broken_config_is_reported(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.pbtxt").write_text("name: \"m\" this is not protobuf text")
    result = serve("--model-repository", str(tmp_path))
    assert result.returncode == 2 and "config.pbtxt" in result.stderr


def test_port_in_use_is_a_clear_error(model_repo: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = serve("--model-repository", str(model_repo), "--grpc-port", "0",   # 0: the OS picks
                       "--http-port", str(port), "--backend-threads", "1")
    assert result.returncode == 1, result.stderr
    assert "cannot listen for HTTP" in result.stderr and "Traceback" not in result.stderr


def test_grpc_port_is_never_shared(model_repo: Path) -> None:
    """Even a listener that allows SO_REUSEPORT (like another gRPC server) makes the start fail."""
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = serve("--model-repository", str(model_repo), "--grpc-port", str(port),
                       "--http-port", "0", "--backend-threads", "1")
    assert result.returncode == 1, result.stderr
    assert "cannot listen for gRPC" in result.stderr and "Traceback" not in result.stderr


def test_start_banner_has_addresses_and_a_client_command(model_repo: Path) -> None:
    with run_gateway(model_repo, extra_args=["--backend-threads", "1"]) as gw:
        out = gw.stdout()
    port = gw.grpc_target.rsplit(":", 1)[1]
    assert f"gRPC:    127.0.0.1:{port}" in out
    assert gw.http_url in out
    # run from the repository root (run_gateway's cwd), so the shipped sample digit is the example
    assert f"imgserve classify examples/images/digit_7.png --server 127.0.0.1:{port} --model lenet5" in out
    assert "listening on 127.0.0.1" in out


def test_banner_commands_work_from_the_directory_it_names(tmp_path: Path) -> None:
    """The banner's command uses the venv path and a shipped sample image when they exist where it runs."""
    from serving.cli import PLACEHOLDER_IMAGE, client_executable, example_request

    exe = tmp_path / ".venv" / "bin" / "imgserve"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    assert client_executable(str(exe), cwd=tmp_path) == ".venv/bin/imgserve"
    assert client_executable(str(exe), cwd=tmp_path / ".venv") == "bin/imgserve"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert client_executable(str(exe), cwd=elsewhere) == str(exe)
    assert client_executable("/no/such/python", cwd=tmp_path) == "imgserve"
    assert example_request(["lenet5", "resnet20"], cwd=tmp_path) == ("lenet5", PLACEHOLDER_IMAGE)
    sample = tmp_path / "examples" / "images" / "shape_star.png"
    sample.parent.mkdir(parents=True)
    sample.write_bytes(b"")
    assert example_request(["lenet5", "resnet20"], cwd=tmp_path) == ("resnet20", "examples/images/shape_star.png")
    assert example_request(["mine"], cwd=tmp_path) == ("mine", PLACEHOLDER_IMAGE)
    assert example_request([], cwd=tmp_path) == ("MODEL", PLACEHOLDER_IMAGE)
