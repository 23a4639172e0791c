"""Means with 95% Student-t intervals: over a sweep's seeds (`sweeps.report`) and over an
evaluation's prompts (`evaluation.task_eval`). Free of JAX."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Stat:
    mean: float
    sd: float
    """Sample standard deviation (n - 1); nan for one value."""
    n: int
    half: float
    """Half-width of the 95% t interval; nan for one value."""

    @property
    def low(self) -> float:
        return self.mean - self.half

    @property
    def high(self) -> float:
        return self.mean + self.half


def summarize(values: list[float]) -> Stat | None:
    """Mean, sd, n and 95% t interval of `values` (None when there are none)."""
    if not values:
        return None
    mean = statistics.fmean(values)
    if len(values) == 1:
        return Stat(mean, math.nan, 1, math.nan)
    sd = statistics.stdev(values)
    quantile = float(stats.t.ppf(0.5 + CONFIDENCE / 2, len(values) - 1))
    return Stat(mean, sd, len(values), quantile * sd / math.sqrt(len(values)))
