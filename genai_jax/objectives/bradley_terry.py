"""The reward model's objective: Bradley-Terry over ranked responses to one prompt.

P(i preferred to j) = sigmoid(r_i - r_j), with r the scalar head read at the last real token of
prompt + response. A batch row is one prompt with K responses (pairs are K = 2): every (better,
worse) pair its ranking implies is a term, weighted 1 / (number of pairs), so a prompt counts once
however many answers were ranked for it (InstructGPT's K-way rankings).

Batch: tokens, mask [B, K, T] (right or left padded); rank [B, K] (0 = best); valid [B, K];
weights [B] (1 per real prompt); optional margin [B].
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from genai_jax.metrics import Spread


def sequence_rewards(apply_fn: Callable, params, tokens, mask, deterministic: bool = True, rng=None):
    """r [N] at the last real token of each row of tokens [N, T]. Positions count real tokens and
    padding is a segment of its own, so left or right padding leaves r unchanged."""
    mask = mask.astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
    values = apply_fn(params, tokens, positions=positions, segment_ids=mask, deterministic=deterministic,
                      head="scalar", rngs={"dropout": rng} if rng is not None else {})
    last = mask.shape[-1] - 1 - jnp.argmax(mask[:, ::-1], axis=-1)
    return jnp.take_along_axis(values, last[:, None], axis=1)[:, 0].astype(jnp.float32)


def pair_weights(rank, valid, weights):
    """[B, K, K] weight of the term "i preferred to j": the prompt's weight over its pair count."""
    better = (rank[:, :, None] < rank[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    n_pairs = jnp.maximum(jnp.sum(better, axis=(1, 2)), 1)
    return better * (weights / n_pairs)[:, None, None]


def make_bradley_terry_objective(apply_fn: Callable, deterministic: bool = False, centering: float = 0.0):
    def objective(params, batch, rng):
        batch_size, k, length = batch["tokens"].shape
        rewards = sequence_rewards(apply_fn, params, batch["tokens"].reshape(-1, length),
                                   batch["mask"].reshape(-1, length), deterministic, rng).reshape(batch_size, k)
        weight = pair_weights(batch["rank"], batch["valid"], batch["weights"].astype(jnp.float32))
        denominator = batch["loss_denominator"]
        chosen, rejected = rewards[:, :, None], rewards[:, None, :]
        margin = batch.get("margin", jnp.zeros(batch_size))[:, None, None]
        loss = jnp.sum(weight * -jax.nn.log_sigmoid(chosen - rejected - margin)) / denominator
        if centering:
            loss += centering * jnp.sum(weight * (chosen + rejected) ** 2) / denominator

        def mean(x):
            return jnp.sum(weight * x) / denominator

        chosen_mean, rejected_mean = mean(chosen), mean(rejected)
        return loss, {
            "accuracy": mean((chosen > rejected).astype(jnp.float32)),
            "margin": mean(chosen - rejected),
            "chosen_reward": chosen_mean,
            "rejected_reward": rejected_mean,
            "chosen_reward_std": Spread(chosen_mean, mean(chosen**2)),
            "rejected_reward_std": Spread(rejected_mean, mean(rejected**2)),
        }

    return objective
