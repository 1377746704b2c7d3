"""The comparison's outputs: a fixed-width table, the JSON report and a plot."""
from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from clients.bench import environment
from serving.compare import paths as P
from serving.compare.runner import RATIOS, CompareConfig, CellSummary, summarise

SCHEMA_VERSION = 1


def _fmt(spread: dict[str, float], digits: int = 1) -> str:
    if math.isnan(spread["median"]):
        return "-"
    return f"{spread['median']:.{digits}f} [{spread['min']:.{digits}f}-{spread['max']:.{digits}f}]"


def format_table(cells: list[CellSummary]) -> str:
    """One row per cell: median [min-max over rounds] of img/s, p50, p99, and its ratios."""
    head = (f"{'model':<12} {'px':>4} {'c':>3} {'path':<15} {'img/s median [min-max]':>28} "
            f"{'p50 ms':>22} {'p99 ms':>22} {'err':>4}  ratios (median [min-max] of per-round ratios)")
    lines = [head, "-" * len(head)]
    order = {p: i for i, p in enumerate(P.ALL_PATHS + P.OPTIONAL_PATHS)}
    for c in sorted(cells, key=lambda c: (c.model, c.image_size, c.concurrency, order[c.path])):
        ratios = "  ".join(f"{name} {_fmt(s, 2)}" for name, s in c.ratios.items())
        rate = _fmt(c.images_per_s) + ("*" if c.drained else "")
        lines.append(f"{c.model:<12} {c.image_size:>4} {c.concurrency:>3} {c.path:<15} {rate:>28} "
                     f"{_fmt(c.p50_ms, 2):>22} {_fmt(c.p99_ms, 2):>22} {c.errors:>4}  {ratios}")
    if any(c.drained for c in cells):
        lines.append("* a request outlasted the measured window in some round: that rate counts the requests "
                     "started in it over the time until they finished (biased low); use a longer --duration")
    lines.append("paths: " + "; ".join(f"{p} = {P.DESCRIPTIONS[p]}" for p in order if any(c.path == p for c in cells)))
    return "\n".join(lines)


def to_dict(config: CompareConfig, steps: list[P.StepStats], command: str = "") -> dict[str, Any]:
    settings = asdict(config)
    settings["model_repository"] = str(config.model_repository)
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "imgserve bench --compare",
        "command": command,
        "settings": settings,
        "environment": environment(),
        "paths": {p: P.DESCRIPTIONS[p] for p in config.paths},
        "ratios": {name: f"{num} img/s / {den} img/s, per round" for num, den, name in RATIOS},
        "steps": [asdict(s) for s in steps],
        "summary": [asdict(c) for c in summarise(steps)],
    }


def plot(cells: list[CellSummary], path: str | Path, title: str = "") -> Path:
    """Per (model, size): img/s and p50 against concurrency for every path, min-max as error bars."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    groups = sorted({(c.model, c.image_size) for c in cells})
    fig, axes = plt.subplots(2, len(groups), figsize=(5.5 * len(groups), 7.5), squeeze=False)
    for col, (model, size) in enumerate(groups):
        ax_t, ax_l = axes[0][col], axes[1][col]
        for name in P.ALL_PATHS + P.OPTIONAL_PATHS:
            rows = sorted((c for c in cells if (c.model, c.image_size, c.path) == (model, size, name)),
                          key=lambda c: c.concurrency)
            if not rows:
                continue
            conc = [c.concurrency for c in rows]
            for ax, attr in ((ax_t, "images_per_s"), (ax_l, "p50_ms")):
                med = [getattr(c, attr)["median"] for c in rows]
                err = [[m - getattr(c, attr)["min"] for m, c in zip(med, rows)],
                       [getattr(c, attr)["max"] - m for m, c in zip(med, rows)]]
                ax.errorbar(conc, med, yerr=err, marker="o", capsize=3, label=name)
        ax_t.set_title(f"{model}, {size}px: throughput")
        ax_t.set_ylabel("images/s (median, min-max over rounds)")
        ax_l.set_title(f"{model}, {size}px: p50 latency")
        ax_l.set_ylabel("ms")
        for ax in (ax_t, ax_l):
            ax.set_xlabel("concurrency")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    if title:
        import textwrap

        fig.suptitle("\n".join(textwrap.wrap(title, 90)), fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
