"""Issue #11 step by step: the same LeNet-5 c=32 load against each stage of the work, interleaved.

Each round runs every stage once (order rotated per round); the table gives the median and
[min-max] over rounds of req/s and of the gateway's CPU ms per request, with the load
average of each run. Stages are (label, environment, gateway flags, PYTHONPATH of the gateway):

    python benchmarks/overhead/steps.py --model-repository REPO --before /path/to/main/checkout \
        --rounds 3 -d 8 --json benchmarks/overhead/results.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def stages(before: str | None) -> list[tuple[str, dict[str, str], str, str | None]]:
    spin = {"IMGSERVE_BACKEND_SPIN": "true"}  # ORT's own default, and the gateway's until stage 4
    off = {"IMGSERVE_INLINE_PREPROCESS_PIXELS": "0", "IMGSERVE_INLINE_INFER_MS": "0", **spin}
    out = []
    if before:
        out.append(("0 main (idle wait, pool hops)", {}, "", before))
    out += [("1 no idle wait + cached metric children", off, "", None),
            ("2 + tiny decode and fast infer inline", spin, "", None),
            ("3 + --workers 2", spin, "--workers 2", None),
            ("4 one worker, ORT threads sleep", {}, "", None),
            ("5 + --workers 2", {}, "--workers 2", None)]
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model-repository", type=Path, required=True)
    p.add_argument("--model", default="lenet5")
    p.add_argument("--before", default=None, help="checkout of the code before issue #11 (e.g. main)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("-d", "--duration", type=float, default=8.0)
    p.add_argument("-c", "--concurrency", type=int, default=32)
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    runs: list[dict] = []
    plan = stages(args.before)
    for rnd in range(args.rounds):
        k = rnd % len(plan)
        for label, env, flags, pythonpath in plan[k:] + plan[:k]:
            cmd = [sys.executable, str(HERE / "measure.py"), "--model-repository", str(args.model_repository),
                   "--model", args.model, "-c", str(args.concurrency), "-d", str(args.duration),
                   "--connections", str(args.connections), "--gateway-args", flags, "--label", label]
            if pythonpath:
                cmd += ["--gateway-pythonpath", pythonpath]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, timeout=300)
            if proc.returncode != 0:
                print(proc.stderr[-2000:], file=sys.stderr)
                return 1
            result = json.loads(proc.stdout.strip().splitlines()[-1]) | {"round": rnd}
            runs.append(result)
            print(f"round {rnd + 1} {label:<42} {result['req_per_s']:8.1f} req/s  "
                  f"{result['gateway_cpu_ms_per_request']:.3f} cpu ms/req  load {result['load_average_1m']:.2f}",
                  flush=True)
    print(f"\n| stage | req/s median [min-max] | gateway CPU ms/request median [min-max] | p50 ms | load avg (1 min) |")
    print("|---|---|---|---|---|")
    for label, *_ in plan:
        rows = [r for r in runs if r["label"] == label]

        def fmt(key: str, digits: int) -> str:
            values = [r[key] for r in rows]
            return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"
        loads = ", ".join(f"{r['load_average_1m']:.1f}" for r in rows)
        print(f"| {label} | {fmt('req_per_s', 0)} | {fmt('gateway_cpu_ms_per_request', 2)} | "
              f"{statistics.median(r['p50_ms'] for r in rows):.1f} | {loads} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
