"""Objectives: pure loss functions `objective(params, batch, rng) -> (loss, metrics)`.

Every batch carries `weights`: what the loss averages over (tokens for language modelling). The
train step adds `loss_denominator`, the number of weighted items per shard of the global batch,
so that an objective returning `sum(per_item * weights) / loss_denominator` gives the mean over the
whole global batch once shards (micro-batches, devices) are averaged.
"""

from typing import Protocol

import jax


class Objective(Protocol):
    def __call__(self, params, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]: ...
