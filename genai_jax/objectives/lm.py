"""The language-modelling objective: next-token cross-entropy weighted by `weights`.

With `weights` = 1 on real tokens it is pretraining's LM loss; with `weights` = the loss mask of
assistant tokens it is SFT's prompt-masked loss.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token negative log-likelihood, in float32, of integer targets under logits [..., V]."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_z - target_logit


def make_lm_objective(apply_fn: Callable, deterministic: bool = False):
    """`apply_fn(params, tokens, positions=, segment_ids=, deterministic=, rngs=)` -> logits.

    Batch: inputs [B, T], targets [B, T], weights [B, T]; optional positions and segment_ids.
    """

    def objective(params, batch, rng):
        logits = apply_fn(
            params,
            batch["inputs"],
            positions=batch.get("positions"),
            segment_ids=batch.get("segment_ids"),
            deterministic=deterministic,
            rngs={"dropout": rng},
        )
        weights = batch["weights"].astype(jnp.float32)
        denominator = batch["loss_denominator"]
        nll = token_nll(logits, batch["targets"])
        correct = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)
        loss = jnp.sum(nll * weights) / denominator
        return loss, {"accuracy": jnp.sum(correct * weights) / denominator}

    return objective
