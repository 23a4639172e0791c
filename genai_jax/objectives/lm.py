"""The language-modelling objective: next-token cross-entropy weighted by `weights`.

With `weights` = 1 on real tokens it is pretraining's LM loss; with `weights` = the loss mask of
assistant tokens it is SFT's prompt-masked loss.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


@jax.custom_vjp
def nll_and_hits(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token negative log-likelihood of integer targets under logits [..., V], and whether each
    target has the largest logit (1.0, ties count; no gradient), both float32.

    The hits reuse the maximum that the log-sum-exp subtracts (an argmax would be one more pass
    over the [..., V] logits). The gradient rule is written out so that no float32 copy of the
    logits is stored: the forward pass upcasts inside its reductions, the backward pass reads the
    (bfloat16) logits once and writes their gradient once. Autodiff of the same math stored that
    copy, which took a third of the loss's time on a GPU (README, Benchmarks).
    """
    return _nll_and_hits_forward(logits, targets)[0]


def _nll_and_hits_forward(logits, targets):
    wide = logits.astype(jnp.float32)
    top = jnp.max(wide, axis=-1)
    log_z = top + jnp.log(jnp.sum(jnp.exp(wide - top[..., None]), axis=-1))
    target_logit = jnp.take_along_axis(wide, targets[..., None], axis=-1)[..., 0]
    hits = (target_logit >= top).astype(jnp.float32)
    return (log_z - target_logit, hits), (logits, targets, log_z)


def _nll_and_hits_backward(saved, cotangents):
    logits, targets, log_z = saved
    nll_cotangent = cotangents[0]
    probs = jnp.exp(logits.astype(jnp.float32) - log_z[..., None])
    is_target = targets[..., None] == jnp.arange(logits.shape[-1])
    grad = (probs - is_target) * nll_cotangent[..., None]
    return grad.astype(logits.dtype), None


nll_and_hits.defvjp(_nll_and_hits_forward, _nll_and_hits_backward)


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token negative log-likelihood, in float32, of integer targets under logits [..., V]."""
    return nll_and_hits(logits, targets)[0]


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
        nll, hits = nll_and_hits(logits, batch["targets"])
        loss = jnp.sum(nll * weights) / denominator
        return loss, {"accuracy": jnp.sum(hits * weights) / denominator}

    return objective
