"""Repeating an experiment over seeds, and saying how big its effect is against the spread.

One training run is one draw: another seed, or another CPU whose kernels round
differently, trains to other weights. A claim such as "10-crop beats the centre
crop" is therefore reported as a per-seed margin (positive when the claim holds),
its mean and standard deviation, how many seeds it held in, and a verdict: *clear*
when it held in every seed and the mean margin is more than twice its standard
error, *within the noise* otherwise.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Spread:
    """Mean, sample standard deviation and range of one quantity over seeds."""

    mean: float
    std: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            raise ValueError("need at least one value")
        values = [float(v) for v in values]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return cls(statistics.fmean(values), std, min(values), max(values), len(values))

    def format(self, digits: int = 3, scale: float = 1.0) -> str:
        """``mean ± std`` (scaled, e.g. by 100 for percentages)."""
        return f"{self.mean * scale:.{digits}f} ± {self.std * scale:.{digits}f}"


@dataclass(frozen=True)
class Effect:
    """A claim measured as one margin per seed; a positive margin means the claim held in that seed."""

    claim: str
    margins: tuple[float, ...]
    spread: Spread
    holds_in: int

    @property
    def n(self) -> int:
        return len(self.margins)

    @property
    def standard_error(self) -> float:
        return self.spread.std / math.sqrt(self.n) if self.n > 1 else float("inf")

    @property
    def clear(self) -> bool:
        """Held in every seed, with a mean margin over twice its standard error."""
        return self.holds_in == self.n and self.spread.mean > 2 * self.standard_error

    @property
    def verdict(self) -> str:
        return "clear" if self.clear else "within the noise"

    def describe(self, digits: int = 3, scale: float = 1.0) -> str:
        return (f"{self.claim}: margin {self.spread.format(digits, scale)} over {self.n} seeds, "
                f"held in {self.holds_in}/{self.n} ({self.verdict})")

    def to_dict(self) -> dict:
        return {"claim": self.claim, "margins": list(self.margins), "mean": self.spread.mean, "std": self.spread.std,
                "min": self.spread.min, "max": self.spread.max, "holds_in": self.holds_in, "n": self.n,
                "clear": self.clear, "verdict": self.verdict}


def effect(claim: str, margins: Sequence[float]) -> Effect:
    """Summarise per-seed margins of ``claim`` (positive: held)."""
    values = tuple(float(m) for m in margins)
    return Effect(claim, values, Spread.of(values), sum(1 for m in values if m > 0))


def seed_range(first: int, count: int) -> list[int]:
    """``count`` consecutive seeds from ``first``: the seeds an experiment repeats over."""
    if count < 1:
        raise ValueError(f"--seeds must be >= 1, got {count}")
    return list(range(first, first + count))
