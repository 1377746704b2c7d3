"""The results table of docs/experiments/README.md, rendered from the JSON files the experiments wrote.

    python -m export.experiments.report [docs/experiments]

Numbers in the docs come from here, not from a hand copy: each row gives a claim's
per-seed margin as mean ± std, how many seeds it held in, and the verdict (see
export/experiments/seeds.py).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from export.experiments.common import DEFAULT_OUT

FILES = ("init_depth_mlp_mnist.json", "residual_depth_mnist.json", "residual_depth_shapes.json", "ten_crop.json")


def _spread(d: dict, scale: float = 1.0, digits: int = 3) -> str:
    return f"{d['mean'] * scale:.{digits}f} ± {d['std'] * scale:.{digits}f}"


def render(folder: Path) -> str:
    lines = ["| experiment | claim | margin per seed (mean ± std) | held in | verdict |", "| --- | --- | --- | --- | --- |"]
    for name in FILES:
        path = folder / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        for effect in data.get("effects", {}).values():
            lines.append(f"| {path.stem} | {effect['claim']} | {_spread(effect, digits=4)} | "
                         f"{effect['holds_in']}/{effect['n']} | {effect['verdict']} |")
    lines += ["", "| experiment | quantity | mean ± std over seeds |", "| --- | --- | --- |"]
    for name in FILES:
        path = folder / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        for subject, values in data.get("spread", {}).items():
            if "mean" in values:  # a flat quantity
                lines.append(f"| {path.stem} | {subject} | {_spread(values, digits=4)} |")
                continue
            for quantity, spread in values.items():
                lines.append(f"| {path.stem} | {subject} {quantity} | {_spread(spread, digits=4)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    folder = Path(args[0]) if args else DEFAULT_OUT
    print(render(folder), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
