"""What flip test-time augmentation buys the scenes models, on held-out scenes, through the real gateway.

    python scripts/tta_gain.py --model-repository model_repository --heldout-seeds 0 1 2 3 4
    python scripts/tta_gain.py --model-repository runs/sweep/seed0/repo runs/sweep/seed1/repo ...

For every repository (one per training seed, when you have several) it starts ``imgserve serve`` on
free ports, generates held-out scenes for each held-out seed (generator seeds 2000+, never a training
set's), and scores the detector and the segmenter twice through the SDK: without TTA and with
``tta=True`` (horizontal flip; weighted box fusion for boxes, averaged probabilities for masks).
It prints each pair and the gain's mean ± std over every (repository, held-out seed), and writes
them to --json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clients.sdk import ImageClient, ImgserveError  # noqa: E402
from export.data.make_dataset import ScenesLayout, make_scenes  # noqa: E402
from export.evaluation.cli import evaluate_detector, evaluate_segmenter  # noqa: E402
from export.evaluation.gateway import GatewayDetector, GatewaySegmenter  # noqa: E402
from serving.triton_local import free_port  # noqa: E402

DETECTOR, SEGMENTER = "centernet_scenes", "unet_scenes"
HELDOUT_SEED_BASE = 2000


def start_gateway(repo: Path) -> tuple[subprocess.Popen, ImageClient]:
    grpc_port, http_port = free_port(), free_port()
    process = subprocess.Popen([sys.executable, "-m", "clients.cli", "serve", "--model-repository", str(repo),
                                "--grpc-port", str(grpc_port), "--http-port", str(http_port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = ImageClient(f"127.0.0.1:{grpc_port}", timeout=120.0)
    deadline = time.monotonic() + 120
    while True:
        try:
            client.model(DETECTOR)
            client.model(SEGMENTER)
            return process, client
        except ImgserveError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"imgserve serve on {repo} did not become ready") from None
            time.sleep(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-repository", type=Path, nargs="+", required=True)
    parser.add_argument("--heldout-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--images", type=int, default=100, help="held-out scenes per held-out seed")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="tta-gain-") as tmp:
        for seed in args.heldout_seeds:
            make_scenes(Path(tmp) / f"seed{seed}", train=1, val=0, test=args.images, seed=HELDOUT_SEED_BASE + seed,
                        progress=False)
        for repo in args.model_repository:
            process, client = start_gateway(repo)
            try:
                for seed in args.heldout_seeds:
                    test = ScenesLayout(Path(tmp) / f"seed{seed}", "test")
                    labels = (Path(tmp) / f"seed{seed}" / "labels.txt").read_text().split()
                    row: dict = {"repository": str(repo), "heldout_seed": seed}
                    for tta in (None, True):
                        key = "tta" if tta else "plain"
                        det = evaluate_detector(GatewayDetector(client, DETECTOR, tta=tta), test.annotations,
                                                test.images, labels[1:])
                        seg = evaluate_segmenter(GatewaySegmenter(client, SEGMENTER, tta=tta), test.images,
                                                 test.masks, labels)
                        row[key] = {"map": det.map, "map50": det.map50, "miou": seg.miou}
                    rows.append(row)
                    print(f"{repo} held-out seed {seed}: " + ", ".join(
                        f"{m} {row['plain'][m]:.4f} -> {row['tta'][m]:.4f}" for m in ("map", "map50", "miou")),
                        flush=True)
            finally:
                client.close()
                process.terminate()
                process.wait(timeout=30)
    print("\n| metric | no TTA | flip TTA | gain, mean ± std (min, max) | n |\n| --- | --- | --- | --- | --- |")
    for metric in ("map", "map50", "miou"):
        plain = [r["plain"][metric] for r in rows]
        tta = [r["tta"][metric] for r in rows]
        gain = [b - a for a, b in zip(plain, tta)]
        spread = statistics.stdev(gain) if len(gain) > 1 else 0.0
        print(f"| {metric} | {statistics.mean(plain):.4f} | {statistics.mean(tta):.4f} | "
              f"{statistics.mean(gain):+.4f} ± {spread:.4f} ({min(gain):+.4f}, {max(gain):+.4f}) | {len(gain)} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
