"""``imgserve classify`` and ``imgserve models`` as real subprocesses against a real gateway."""
from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.procs import imgserve_executable, refused_port, run_gateway

CLI_TIMEOUT_S = 60


def imgserve(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(imgserve_executable()), *args], input=stdin, capture_output=True,
                          timeout=CLI_TIMEOUT_S)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode())


def top1_rows(table: str) -> list[tuple[str, int]]:
    """(label, index) of every 'rank 1' row in the classify table output."""
    return [(m.group(1), int(m.group(2))) for m in re.finditer(r"^\s+1\s+(\S+)\s+(\d+)\s+[0-9.]+$", table, re.M)]


@pytest.fixture()
def refused() -> Iterator[int]:
    """A port held for the test where connections are refused."""
    with refused_port() as port:
        yield port


@pytest.fixture(scope="module")
def gateway(model_repo: Path) -> Iterator[object]:
    with run_gateway(model_repo) as gw:
        yield gw


@pytest.fixture(scope="module")
def digit_files(mnist_heldout: tuple[np.ndarray, np.ndarray], lenet_offline_predictions: object,
                tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, int]]:
    """PNGs of three held-out digits of different classes that the exported model gets right, with labels."""
    images, labels = mnist_heldout
    correct = lenet_offline_predictions.classes == labels  # type: ignore[attr-defined]
    folder = tmp_path_factory.mktemp("cli_digits")
    chosen: list[tuple[Path, int]] = []
    for digit in (3, 7, 9):
        i = int(np.flatnonzero((labels == digit) & correct)[0])
        path = folder / f"heldout_{i}.png"
        Image.fromarray(images[i]).save(path)
        chosen.append((path, digit))
    return chosen


@pytest.mark.parametrize("command", ["classify", "models", "bench"])
def test_help(command: str) -> None:
    result = imgserve(command, "--help")
    assert result.returncode == 0, result.stderr
    assert f"imgserve {command}" in result.stdout and "--server" in result.stdout


def test_classify_prints_the_right_digits(gateway: object, digit_files: list[tuple[Path, int]]) -> None:
    result = imgserve("classify", *(str(p) for p, _ in digit_files), "--server", gateway.grpc_target,  # type: ignore[attr-defined]
                      "--model", "lenet5", "--top-k", "3")
    assert result.returncode == 0, result.stderr
    assert top1_rows(result.stdout) == [(str(d), d) for _, d in digit_files]
    for path, _ in digit_files:
        assert str(path) in result.stdout
    assert result.stdout.count("rank") == 3 and "10-crop off" in result.stdout


def test_classify_json_is_the_same_over_both_protocols(gateway: object, digit_files: list[tuple[Path, int]]) -> None:
    docs = []
    for server in (gateway.grpc_target, gateway.http_url):  # type: ignore[attr-defined]
        result = imgserve("classify", *(str(p) for p, _ in digit_files), "--server", server,
                          "--model", "lenet5", "--top-k", "4", "--json")
        assert result.returncode == 0, result.stderr
        docs.append(json.loads(result.stdout))
    assert docs[0] == docs[1]
    assert [d["image"] for d in docs[0]] == [str(p) for p, _ in digit_files]
    for doc, (_, digit) in zip(docs[0], digit_files):
        scores = [p["score"] for p in doc["predictions"]]
        assert doc["model"] == "lenet5" and doc["ten_crop"] is False and len(scores) == 4
        assert doc["predictions"][0]["index"] == digit and scores == sorted(scores, reverse=True)


def test_classify_reads_stdin_and_honours_ten_crop(gateway: object, digit_files: list[tuple[Path, int]]) -> None:
    path, digit = digit_files[0]
    result = imgserve("classify", "-", "--server", gateway.http_url, "--model", "lenet5",  # type: ignore[attr-defined]
                      "--ten-crop", "--json", stdin=path.read_bytes())
    assert result.returncode == 0, result.stderr
    (doc,) = json.loads(result.stdout)
    assert doc["image"] == "-" and doc["ten_crop"] is True and len(doc["predictions"]) == 5


def test_models_lists_the_repository(gateway: object) -> None:
    """Each model with its task, input size, 10-crop default and description (the config's)."""
    table = imgserve("models", "--server", gateway.grpc_target)  # type: ignore[attr-defined]
    assert table.returncode == 0, table.stderr
    header, *lines = table.stdout.splitlines()
    assert header.split()[:5] == ["name", "version", "task", "classes", "input"] and header.endswith("description")
    rows = {line.split()[0]: line for line in lines}
    assert set(rows) == {"lenet5", "rgbnet"}
    assert "classification" in rows["lenet5"] and "28->28x28 grey" in rows["lenet5"]
    assert "72->64x64 RGB" in rows["rgbnet"]
    assert rows["lenet5"].endswith("LeNet-5 trained on the bundled MNIST sample")
    assert rows["rgbnet"].endswith("resnet18 with random weights (seed 0), a cheap 3-channel test model")
    out = imgserve("models", "--server", gateway.http_url, "--json").stdout  # type: ignore[attr-defined]
    assert out.count("\n") == 1 and ": " not in out  # one compact line
    doc = json.loads(out)
    assert {m["name"]: m["channels"] for m in doc} == {"lenet5": 1, "rgbnet": 3}
    assert {m["name"]: m["description"] for m in doc}["lenet5"] == "LeNet-5 trained on the bundled MNIST sample"
    assert all(m["ten_crop_default"] is False and m["task"] == "classification" for m in doc)


def test_classify_answers_every_file(gateway: object, digit_files: list[tuple[Path, int]], tmp_path: Path) -> None:
    """Good files get results, each bad one a line naming it; exit 1 because one failed."""
    (good1, d1), (good2, d2), _ = digit_files
    bad = garbage_file(tmp_path)
    for server in (gateway.grpc_target, gateway.http_url):  # type: ignore[attr-defined]
        result = imgserve("classify", str(good1), str(bad), str(good2), "--server", server, "--model", "lenet5",
                          "--top-k", "1")
        assert result.returncode == 1, result.stderr
        assert top1_rows(result.stdout) == [(str(d1), d1), (str(d2), d2)]
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith(f"imgserve classify: {bad}: INVALID_ARGUMENT: ") and "image 1" not in line
    result = imgserve("classify", str(good1), str(bad), str(tmp_path / "absent.png"), str(good2), "--json",
                      "--server", gateway.grpc_target, "--model", "lenet5", "--batch-size", "2")  # type: ignore[attr-defined]
    assert result.returncode == 2  # an unreadable local file outranks a refused one
    records = json.loads(result.stdout)
    assert [r["image"] for r in records] == [str(good1), str(bad), str(tmp_path / "absent.png"), str(good2)]
    assert [r["predictions"][0]["index"] for r in (records[0], records[3])] == [d1, d2]
    assert records[1]["error"]["code"] == "INVALID_ARGUMENT" and "cannot read" in records[2]["error"]["message"]
    assert len(result.stderr.strip().splitlines()) == 2


@pytest.mark.parametrize("wrong", ["http to the grpc port", "grpc to the http port"])
def test_a_wrong_port_gets_a_one_line_hint(gateway: object, wrong: str) -> None:
    grpc_port = gateway.grpc_target.rsplit(":", 1)[1]  # type: ignore[attr-defined]
    server = f"http://127.0.0.1:{grpc_port}" if wrong.startswith("http") else gateway.http_url.removeprefix("http://")  # type: ignore[attr-defined]
    result = imgserve("models", "--server", server, "--timeout", "10")
    assert result.returncode == 1 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("imgserve models: UNAVAILABLE") and "--server" in line and "\\x00" not in line
    assert ("HTTP/2" in line) if wrong.startswith("http") else ("speaks HTTP/1.1" in line)
    assert all(ch.isprintable() for ch in line)


def test_version_and_bare_command() -> None:
    from clients.version import installed_version

    version = imgserve("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"imgserve {installed_version()}"
    bare = imgserve()
    assert bare.returncode == 2 and bare.stdout == "" and "usage: imgserve" in bare.stderr
    assert imgserve("--help").returncode == 0


def garbage_file(tmp_path: Path) -> Path:
    path = tmp_path / "not_an_image.png"
    path.write_bytes(b"this is text, not a PNG")
    return path


@pytest.mark.parametrize("case, code, fragment", [
    ("unknown model", 1, "NOT_FOUND"),
    ("garbage image", 1, "INVALID_ARGUMENT"),
    ("connection refused", 1, "UNAVAILABLE"),
    ("connection refused http", 1, "UNAVAILABLE"),
    ("missing file", 2, "cannot read image file"),
    ("contradictory protocol", 2, "protocol='grpc'"),
    ("no model flag", 2, "--model"),
])
def test_classify_errors_are_one_clear_line(gateway: object, digit_files: list[tuple[Path, int]], tmp_path: Path,
                                            refused: int, case: str, code: int, fragment: str) -> None:
    digit = str(digit_files[0][0])
    server = ["--server", gateway.grpc_target]  # type: ignore[attr-defined]
    dead = refused
    args = {
        "unknown model": [digit, *server, "--model", "no_such_model"],
        "garbage image": [str(garbage_file(tmp_path)), *server, "--model", "lenet5"],
        "connection refused": [digit, "--server", f"127.0.0.1:{dead}", "--model", "lenet5"],
        "connection refused http": [digit, "--server", f"http://127.0.0.1:{dead}", "--model", "lenet5"],
        "missing file": [str(tmp_path / "absent.png"), *server, "--model", "lenet5"],
        "contradictory protocol": [digit, "--server", gateway.http_url, "--protocol", "grpc",  # type: ignore[attr-defined]
                                   "--model", "lenet5"],
        "no model flag": [digit, *server],
    }[case]
    result = imgserve("classify", *args)
    assert result.returncode == code, (result.stdout, result.stderr)
    assert fragment in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""
    if code == 1:
        assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("imgserve classify: ")


def test_models_error_exit_code(refused: int) -> None:
    result = imgserve("models", "--server", f"127.0.0.1:{refused}", "--timeout", "5")
    assert result.returncode == 1 and "UNAVAILABLE" in result.stderr and "Traceback" not in result.stderr
