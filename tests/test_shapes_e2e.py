"""Issue #4's acceptance: generate shapes, train (CPU minutes) to >= 90%, export, serve, same accuracy via the SDK.

Every step is the real thing: ``imgserve make-dataset`` and ``imgserve train
--export-to`` run as subprocesses, the gateway is a real ``imgserve serve``
process on free ports, and the held-out PNG files travel through the SDK over
gRPC (and, for a sample, HTTP). The gateway's accuracy, with the centre crop
and with 10-crop averaging, must match what training measured on the same
files, since both do the same resize and crops (see tests/test_augment.py).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clients.sdk import ImageClient
from tests.procs import ROOT, imgserve_executable, run_gateway

pytestmark = pytest.mark.slow

NAME = "resnet20"
BATCH = 50
MIN_ACCURACY = 0.90
TOLERANCE = 0.005  # ONNX Runtime vs PyTorch float noise may flip a borderline image or five in 1000


def _run(args: list[str], timeout_s: float) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.perf_counter()
    proc = subprocess.run([str(imgserve_executable()), *args], capture_output=True, text=True, timeout=timeout_s,
                          cwd=ROOT)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, f"imgserve {args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc, seconds


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("shapes_e2e")
    data, run, repo = tmp / "data", tmp / "run", tmp / "repo"
    _, gen_s = _run(["make-dataset", "shapes", "--out", str(data), "--workers", "2", "--no-progress"], 300)
    proc, train_s = _run(["train", "--config", str(ROOT / "configs" / "resnet20_shapes.yaml"), "--data", str(data),
                          "--output", str(run), "--export-to", str(repo), "--name", NAME, "--no-progress"], 900)
    summary = json.loads((run / "metrics.json").read_text())["summary"]
    print(f"\nshapes e2e: generate {gen_s:.0f}s, train+eval+export {train_s:.0f}s "
          f"(training {summary['train_seconds']:.0f}s, export {summary['export_seconds']:.1f}s); "
          f"val centre {summary['center_crop_acc']:.4f}, 10-crop {summary['ten_crop_acc']:.4f}", file=sys.stderr)
    val = sorted((data / "val").glob("*/*.png"))
    return {"summary": summary, "repo": repo, "val": val, "stdout": proc.stdout}


def _served_accuracy(client: ImageClient, files: list[Path], *, ten_crop: bool) -> tuple[float, list[str]]:
    labels: list[str] = []
    for i in range(0, len(files), BATCH):
        chunk = files[i:i + BATCH]
        result = client.classify([f.read_bytes() for f in chunk], NAME, top_k=1, ten_crop=ten_crop)
        assert len(result) == len(chunk) and result.ten_crop is ten_crop
        labels += [p.label for p in result.top1]
    truth = [f.parent.name for f in files]
    return sum(a == b for a, b in zip(labels, truth)) / len(files), labels


def test_training_reaches_the_target(trained: dict) -> None:
    summary = trained["summary"]
    assert summary["model"] == "cifar_resnet20" and summary["num_classes"] == 10
    assert summary["val_samples"] == len(trained["val"]) == 1000
    assert summary["center_crop_acc"] >= MIN_ACCURACY
    assert summary["ten_crop_acc"] >= summary["center_crop_acc"]
    assert "centre crop" in trained["stdout"] and "10-crop" in trained["stdout"]


def test_served_accuracy_matches_training(trained: dict) -> None:
    summary, files = trained["summary"], trained["val"]
    with run_gateway(trained["repo"], extra_args=["--preprocess-threads", "1", "--backend-threads", "1"]) as gw:
        with ImageClient(gw.grpc_target, timeout=120) as client:
            info = client.model(NAME)
            assert (info.num_classes, info.resize, info.crop, info.channels) == (10, 36, 32, 3)
            assert info.ten_crop_default is False
            centre, grpc_labels = _served_accuracy(client, files, ten_crop=False)
            ten, _ = _served_accuracy(client, files, ten_crop=True)
        with ImageClient(gw.http_url, timeout=120) as http:
            _, http_labels = _served_accuracy(http, files[:100], ten_crop=False)
    print(f"\nserved through the gateway: centre {centre:.4f}, 10-crop {ten:.4f}", file=sys.stderr)
    assert centre >= MIN_ACCURACY
    assert abs(centre - summary["center_crop_acc"]) <= TOLERANCE
    assert abs(ten - summary["ten_crop_acc"]) <= TOLERANCE
    assert http_labels == grpc_labels[:100]
