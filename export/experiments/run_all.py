"""Run every documented experiment at its documented size, over several seeds (CPU minutes).

    python -m export.experiments.run_all [--out runs/experiments] [--seeds 3] [--threads 2]
    python -m export.experiments.run_all --out docs/experiments   # refresh the committed results

Exit status 0 only when every experiment's main claim held on average over the seeds.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from export.experiments import init_depth, residual_depth, ten_crop
from export.experiments.common import DEFAULT_OUT


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.experiments.run_all", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seeds", type=int, default=3, help="seeds per experiment")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    common = ["--out", str(args.out), "--threads", str(args.threads), "--device", args.device,
              "--seeds", str(args.seeds)]
    runs = [
        ("init_depth (MNIST, 30-layer MLP)", init_depth.main, []),
        ("residual_depth (MNIST, 20 vs 56 layers)", residual_depth.main, []),
        ("ten_crop (ResNet-20 on shapes)", ten_crop.main, []),
    ]
    failed = []
    for title, run, extra in runs:
        start = time.perf_counter()
        print(f"== {title}", flush=True)
        rc = run(extra + common)
        print(f"== {title}: {'claim holds' if rc == 0 else 'CLAIM DID NOT HOLD'} ({time.perf_counter() - start:.0f}s)",
              flush=True)
        if rc != 0:
            failed.append(title)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
