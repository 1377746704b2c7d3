"""GPU sizing benchmark (issue #11): how fast is one GPU, and how many cores does it take to feed it?

Three measurements, each printed as a table and saved as JSON:

1. ``ceiling``: resnet50 in torch on CUDA at batch 1/8/32/64, FP32 and FP16 (autocast),
   channels-last, cuDNN autotuned. Images/s of the model alone (input already on the GPU),
   and with the host-to-device copy of the uint8 batch from pinned memory included.
2. ``decode``: the gateway's own decode-resize-crop (``serving.preprocess.preprocess`` with
   resnet50's geometry: shorter side 256, centre crop 224, RGB) on 224 px JPEGs, in a thread
   pool of 1/2/4/8/16 threads (what ``--preprocess-threads`` does in one gateway process) and
   in 1/2/4/8/16 processes (what ``--workers N`` does).
3. ``sizing``: cores needed to feed the GPU = GPU images/s (best FP16 batch) / decode images/s
   per core (the best per-core rate of the process runs), and what the thread pool reaches.

``--ort-cuda`` adds the embedded backend's own path where onnxruntime-gpu is installed:
resnet50 exported to ONNX (FP32 and --fp16) run through serving's I/O-binding runner.
``--cpu-smoke`` runs everything tiny on the CPU (CI and laptops): it proves the script,
not the numbers.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import os
import platform
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# ---------------------------------------------------------------- 1. GPU ceiling

def ceiling(device: str, batches: list[int], seconds: float, arch: str) -> list[dict[str, Any]]:
    import torch
    import torchvision

    torch.backends.cudnn.benchmark = True
    model = getattr(torchvision.models, arch)(weights=None).eval().to(device).to(memory_format=torch.channels_last)
    rows = []
    for precision in ("fp32", "fp16"):
        for batch in batches:
            x_u8 = torch.randint(0, 256, (batch, 224, 224, 3), dtype=torch.uint8)
            host = x_u8.pin_memory() if device.startswith("cuda") else x_u8
            mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1) * 255
            std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1) * 255

            def step(copy: bool) -> None:
                src = host.to(device, non_blocking=True) if copy else dev_u8
                x = src.permute(0, 3, 1, 2).float().sub_(mean).div_(std).contiguous(memory_format=torch.channels_last)
                with torch.inference_mode(), torch.autocast(device_type=device.split(":")[0], dtype=torch.float16
                                                            if device.startswith("cuda") else torch.bfloat16,
                                                            enabled=precision == "fp16"):
                    model(x)

            dev_u8 = host.to(device)
            result: dict[str, Any] = {"arch": arch, "device": device, "precision": precision, "batch": batch}
            for copy in (False, True):
                for _ in range(3):                      # warm-up: cuDNN picks its algorithms
                    step(copy)
                sync(device)
                n, start = 0, time.perf_counter()
                while time.perf_counter() - start < seconds:
                    step(copy)
                    n += 1
                    if n % 8 == 0:
                        sync(device)
                sync(device)
                elapsed = time.perf_counter() - start
                key = "with_h2d" if copy else "model_only"
                result[f"{key}_images_per_s"] = round(n * batch / elapsed, 1)
                result[f"{key}_ms_per_batch"] = round(elapsed / n * 1000, 3)
            rows.append(result)
            print(f"ceiling {arch} {precision} batch {batch:>3}: {result['model_only_images_per_s']:>10.1f} img/s "
                  f"model only, {result['with_h2d_images_per_s']:>10.1f} img/s with the uint8 H2D copy", flush=True)
    return rows


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


# ---------------------------------------------------------------- 2. decode throughput

def jpegs(count: int, side: int, seed: int = 0) -> list[bytes]:
    """Photo-like JPEGs (smooth noise, quality 90) of side x side pixels."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        small = Image.fromarray(rng.integers(0, 256, (side // 8, side // 8, 3), dtype=np.uint8))
        buf = io.BytesIO()
        small.resize((side, side), Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _geometry():
    from serving.repository import Preprocess

    return Preprocess(resize=256, crop=224, channels=3)


def _decode_loop(images: list[bytes], seconds: float) -> int:
    """One worker: decode + crop images round-robin for ``seconds``; returns how many."""
    from serving.preprocess import preprocess

    pre = _geometry()
    n, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        preprocess(images[n % len(images)], pre, ten_crop=False)
        n += 1
    return n


def decode_threads(images: list[bytes], threads: int, seconds: float) -> float:
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        _decode_loop(images, 0.2)
        start = time.perf_counter()
        total = sum(pool.map(lambda _: _decode_loop(images, seconds), range(threads)))
        return total / (time.perf_counter() - start)


def decode_processes(images: list[bytes], processes: int, seconds: float) -> float:
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(processes) as pool:
        pool.starmap(_decode_loop, [(images, 0.2)] * processes)      # import + warm every worker
        start = time.perf_counter()
        total = sum(pool.starmap(_decode_loop, [(images, seconds)] * processes))
        return total / (time.perf_counter() - start)


def decode(levels: list[int], side: int, count: int, seconds: float) -> list[dict[str, Any]]:
    images = jpegs(count, side)
    rows = []
    for mode, fn in (("threads", decode_threads), ("processes", decode_processes)):
        for level in levels:
            rate = fn(images, level, seconds)
            rows.append({"mode": mode, "workers": level, "image_px": side, "images_per_s": round(rate, 1),
                         "images_per_s_per_worker": round(rate / level, 1),
                         "mean_jpeg_bytes": round(sum(map(len, images)) / len(images))})
            print(f"decode {side}px JPEG, {level:>2} {mode:<9}: {rate:9.1f} img/s ({rate / level:7.1f} per worker)",
                  flush=True)
    return rows


# ---------------------------------------------------------------- 3. ORT CUDA (optional)

def ort_cuda(batches: list[int], seconds: float, work: Path) -> list[dict[str, Any]]:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        print("ort-cuda: onnxruntime has no CUDAExecutionProvider here (pip install onnxruntime-gpu); skipped")
        return []
    import torch
    import torchvision

    from export.fp16 import convert_to_fp16
    from export.models import get_entry
    from export.onnx_export import build_serving_graph, export_onnx
    from serving.backends.ort_device import Device, IoBoundRunner

    fp32 = work / "resnet50.onnx"
    graph = build_serving_graph(torchvision.models.resnet50(weights=None).eval(), get_entry("resnet50"), 224)
    export_onnx(graph, fp32, crop=224, channels=3)
    fp16 = work / "resnet50.fp16.onnx"
    convert_to_fp16(fp32, fp16)
    rows = []
    for precision, path in (("fp32", fp32), ("fp16", fp16)):
        session = ort.InferenceSession(str(path), providers=[("CUDAExecutionProvider", {"device_id": 0}),
                                                             "CPUExecutionProvider"])
        runner = IoBoundRunner(session, session.get_inputs()[0].name, [session.get_outputs()[0].name],
                               Device("cuda", 0))
        for batch in batches:
            x = np.random.default_rng(0).integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)
            for _ in range(3):
                runner.run(x)
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                runner.run(x)
                n += 1
            rate = n * batch / (time.perf_counter() - start)
            rows.append({"precision": precision, "batch": batch, "images_per_s": round(rate, 1),
                         "pinned_staging": runner.pinned})
            print(f"ort-cuda resnet50 {precision} batch {batch:>3}: {rate:10.1f} img/s (pinned {runner.pinned})")
    del torch
    return rows


# ---------------------------------------------------------------- sizing and main

def sizing(ceiling_rows: list[dict[str, Any]], decode_rows: list[dict[str, Any]]) -> dict[str, Any]:
    best = max(ceiling_rows, key=lambda r: r["with_h2d_images_per_s"])
    per_core = max(r["images_per_s_per_worker"] for r in decode_rows if r["mode"] == "processes")
    threads = {r["workers"]: r["images_per_s"] for r in decode_rows if r["mode"] == "threads"}
    return {
        "gpu_images_per_s": best["with_h2d_images_per_s"],
        "gpu_config": f"{best['arch']} {best['precision']} batch {best['batch']} (with H2D copy)",
        "decode_images_per_s_per_core": per_core,
        "cores_to_feed_one_gpu": round(best["with_h2d_images_per_s"] / per_core, 1),
        "one_process_thread_pool_images_per_s": threads,
        "rule": "cores = GPU images/s / decode images/s per core; one gateway process cannot reach that "
                "(GIL): run --workers N with N x preprocess threads ~ cores",
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU: checks the script, not the GPU")
    p.add_argument("--ort-cuda", action="store_true", help="also the embedded ORT CUDA path (needs onnxruntime-gpu)")
    p.add_argument("--seconds", type=float, default=None)
    args = p.parse_args()
    smoke = args.cpu_smoke
    device = "cpu" if smoke else "cuda:0"
    seconds = args.seconds or (0.3 if smoke else 4.0)
    if not smoke:
        import torch

        if not torch.cuda.is_available():
            print("gpu_bench: torch sees no CUDA device; use --cpu-smoke to check the script on a CPU", file=sys.stderr)
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"environment": environment(device), "cpu_smoke": smoke}
    t0 = time.perf_counter()
    report["ceiling"] = ceiling(device, [1, 2] if smoke else [1, 8, 32, 64], seconds,
                                "resnet18" if smoke else "resnet50")
    levels = [1, 2] if smoke else [1, 2, 4, 8, 16]
    report["decode"] = decode(levels, 224, 8 if smoke else 64, seconds)
    if args.ort_cuda:
        report["ort_cuda"] = ort_cuda([1, 8, 32, 64], seconds, args.out)
    report["sizing"] = sizing(report["ceiling"], report["decode"])
    report["seconds"] = round(time.perf_counter() - t0, 1)
    (args.out / "gpu_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "summary.md").write_text(summary_md(report))
    print(summary_md(report))
    return 0


def environment(device: str) -> dict[str, Any]:
    env: dict[str, Any] = {"hostname": socket.gethostname(), "platform": platform.platform(),
                           "cpu_count": os.cpu_count(), "python": sys.version.split()[0],
                           "load_average_1m": os.getloadavg()[0],
                           "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    import torch

    env["torch"] = torch.__version__
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    return env


def summary_md(r: dict[str, Any]) -> str:
    lines = [f"# GPU sizing ({'CPU SMOKE RUN: not GPU numbers' if r['cpu_smoke'] else r['environment'].get('gpu')})",
             "", "| arch | precision | batch | model only img/s | with uint8 H2D img/s |", "|---|---|---:|---:|---:|"]
    lines += [f"| {c['arch']} | {c['precision']} | {c['batch']} | {c['model_only_images_per_s']} | "
              f"{c['with_h2d_images_per_s']} |" for c in r["ceiling"]]
    lines += ["", "| decode 224 px JPEG | workers | img/s | per worker |", "|---|---:|---:|---:|"]
    lines += [f"| {d['mode']} | {d['workers']} | {d['images_per_s']} | {d['images_per_s_per_worker']} |"
              for d in r["decode"]]
    s = r["sizing"]
    lines += ["", f"**Cores to feed one GPU: {s['cores_to_feed_one_gpu']}** ({s['gpu_images_per_s']} img/s, "
              f"{s['gpu_config']}, / {s['decode_images_per_s_per_core']} img/s decoded per core)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
