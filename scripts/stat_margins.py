"""Run the statistical (training) tests under several seeds and tabulate how much room each assertion had.

    python scripts/stat_margins.py --seeds 0 1 2 3 4 [--out runs/margins] [-- extra pytest args]

Each seed runs the tests that train (see TESTS) with IMGSERVE_TEST_SEED set; every
assertion that calls the ``record_margin`` fixture appends its value and bound to a
JSON-lines file. The table printed at the end (markdown) gives, per claim, the bound,
the value in each seed and the smallest room: the number to quote when saying a test
holds "on any CPU".
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_experiments.py", "tests/test_train.py", "tests/test_mnist_lenet.py::test_lenet_reaches_target_accuracy_on_heldout_digits"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "margins")
    parser.add_argument("--tests", nargs="+", default=TESTS)
    parser.add_argument("pytest_args", nargs="*")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    failed = []
    for seed in args.seeds:
        path = args.out / f"seed{seed}.jsonl"
        path.unlink(missing_ok=True)
        env = {**os.environ, "IMGSERVE_TEST_SEED": str(seed), "IMGSERVE_MARGINS_FILE": str(path)}
        rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args.tests,
                              *args.pytest_args], cwd=ROOT, env=env)
        print(f"seed {seed}: pytest exit {rc}", flush=True)
        if rc:
            failed.append(seed)
    rows: dict[str, list[dict]] = defaultdict(list)
    for seed in args.seeds:
        path = args.out / f"seed{seed}.jsonl"
        if path.is_file():
            for line in path.read_text().splitlines():
                rec = json.loads(line)
                rows[rec["claim"]].append(rec)
    print("\n| claim | bound | values over seeds | smallest room |\n| --- | --- | --- | --- |")
    for claim, recs in sorted(rows.items()):
        values = ", ".join(f"{r['value']:.4f}" for r in recs)
        print(f"| {claim} | {recs[0]['bound']:.4f} | {values} | {min(r['room'] for r in recs):.4f} |")
    print(f"\nseeds with a failing test: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
