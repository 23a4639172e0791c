"""What an objective's metrics summarise, so that they combine exactly however the batch is split
(over devices, micro-batches, evaluation batches, PPO's updates): most are means over the batch,
those named `*_max` are maxima, and a `Spread` carries a mean and a mean square until it is logged
as a standard deviation (a standard deviation itself cannot be averaged over parts)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import struct


def is_maximum(name: str) -> bool:
    """Metrics named `*_max` are maxima: combined by max, not mean."""
    return name.endswith("_max")


@struct.dataclass
class Spread:
    """The first two moments of a quantity over the batch; logged as its standard deviation."""

    mean: Any
    mean_square: Any


def summary(records: list[dict]) -> dict[str, float]:
    """Host records of equal-weight batches or steps (one or more) as one record of floats: the
    mean of each metric, the maximum of maxima, the standard deviation of a `Spread`'s moments."""
    combined = {}
    for name in records[0]:
        values = [record[name] for record in records]
        if is_maximum(name):
            combined[name] = float(np.max(values))
        else:
            value = jax.tree.map(lambda *parts: float(np.mean(parts)), *values)
            if isinstance(value, Spread):
                value = float(np.sqrt(max(value.mean_square - value.mean**2, 0.0)))
            combined[name] = value
    return combined
