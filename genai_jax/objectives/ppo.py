"""RLHF's objective: the clipped PPO surrogate for the policy plus a clipped value loss, and the
pure pieces of the rollout that feed it (KL estimates, the KL controller, GAE, whitening).

Params are one pytree {"policy": LM params, "value": scalar-head params}. A batch row is one
prompt + sampled response; arrays are aligned on the action: position t holds the token fed in
(`inputs`), the token sampled after it (`targets`), and for that action the rollout's
log-probability (`old_logprobs`), value (`old_values`), `advantages` and `returns`. `weights` is
1 on the actions of the response (the loss averages over them), 0 on the prompt and padding.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from genai_jax.objectives.lm import token_nll


def kl_estimate(logprobs: jax.Array, ref_logprobs: jax.Array, estimator: str = "k1") -> jax.Array:
    """Per-token estimate of KL(policy || reference) from the sampled token's log-probabilities:
    k1 = log p - log q (unbiased, can be negative), k3 = (q/p - 1) - log(q/p) (unbiased, >= 0)."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return jnp.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r} (k1 or k3)")


def adaptive_kl_update(beta: float, observed_kl: float, target_kl: float, horizon: int, batch_size: int) -> float:
    """The adaptive KL controller of Ziegler et al. (2019): beta grows when the observed KL is
    above target and shrinks below it, by at most 20% of the error per `horizon` samples."""
    error = min(max(observed_kl / target_kl - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * batch_size / horizon)


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    return jnp.sum(x * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1e-8)


def masked_variance(x: jax.Array, mask: jax.Array) -> jax.Array:
    return masked_mean((x - masked_mean(x, mask)) ** 2, mask)


def masked_whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True) -> jax.Array:
    """x scaled to unit variance (and zero mean if `shift_mean`) over the masked entries; the
    unmasked entries come back as 0."""
    mean = masked_mean(x, mask)
    whitened = (x - mean) * jax.lax.rsqrt(masked_variance(x, mask) + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened * mask


def explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array) -> jax.Array:
    """1 - Var(returns - values) / Var(returns) over the masked entries: 1 for a perfect value
    model, 0 for one that predicts the mean, negative for worse."""
    return 1.0 - masked_variance(returns - values, mask) / jnp.maximum(masked_variance(returns, mask), 1e-8)


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float, lam: float):
    """(advantages, returns) [B, T] by generalised advantage estimation, scanned backwards in time.

    Masked positions are outside the episode: the value after the last action is 0 (the episode
    ends), and nothing flows back across them.
    """
    mask = mask.astype(rewards.dtype)

    def step(carry, inputs):
        next_value, next_advantage = carry
        reward, value, valid = inputs
        delta = reward + gamma * next_value - value
        advantage = (delta + gamma * lam * next_advantage) * valid
        return (value * valid, advantage), advantage

    time_major = (rewards.T[::-1], values.T[::-1], mask.T[::-1])
    zeros = jnp.zeros(rewards.shape[0], rewards.dtype)
    _, advantages = jax.lax.scan(step, (zeros, zeros), time_major)
    advantages = advantages[::-1].T
    return advantages, (advantages + values) * mask


def action_logprobs(logits: jax.Array, targets: jax.Array, temperature: float) -> jax.Array:
    """log-probabilities [B, T] of `targets` under softmax(logits / temperature): the distribution
    the rollout sampled from."""
    return -token_nll(logits.astype(jnp.float32) / temperature, targets)


def entropy(logits: jax.Array, temperature: float) -> jax.Array:
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    return -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)


def policy_and_values(apply_fn: Callable, params, batch: dict, temperature: float):
    """(logits [B, T, V] of the policy, values [B, T] of the value model) on the batch's inputs."""
    common = dict(positions=batch["positions"], segment_ids=batch["segment_ids"], deterministic=True)
    logits = apply_fn(params["policy"], batch["inputs"], head="lm", **common)
    values = apply_fn(params["value"], batch["inputs"], head="scalar", **common).astype(jnp.float32)
    return logits, values


def clipped_surrogate(ratio: jax.Array, advantages: jax.Array, clip_ratio: float) -> jax.Array:
    """Per token, PPO's clipped policy loss -min(rho A, clip(rho, 1 +- clip_ratio) A) (Schulman et al. 2017)."""
    clipped_ratio = jnp.clip(ratio, 1.0 - clip_ratio, 1.0 + clip_ratio)
    return -jnp.minimum(ratio * advantages, clipped_ratio * advantages)


def ratio_metrics(log_ratio: jax.Array, weights: jax.Array, mean: Callable, clip_ratio: float) -> dict:
    """How far the updated policy is from the rollout's, over the weighted tokens."""
    ratio = jnp.exp(log_ratio)
    return {
        "approx_kl": mean(jnp.expm1(log_ratio) - log_ratio),
        "clip_fraction": mean((jnp.abs(ratio - 1.0) > clip_ratio).astype(jnp.float32)),
        "ratio_mean": mean(ratio),
        "ratio_max": jnp.max(jnp.where(weights > 0, ratio, 0.0)),
    }


def make_ppo_objective(apply_fn: Callable, *, clip_ratio: float = 0.2, clip_value: float = 0.2,
                       value_coef: float = 0.1, entropy_coef: float = 0.0, temperature: float = 1.0):
    """Clipped surrogate -min(rho A, clip(rho, 1 +- clip_ratio) A) plus value_coef times the clipped
    value loss 0.5 max((V - R)^2, (clip(V, V_old +- clip_value) - R)^2), minus entropy_coef times
    the entropy; all averaged over the response tokens of the global batch."""

    def objective(params, batch, rng):
        del rng  # dropout is off in every RLHF model
        logits, values = policy_and_values(apply_fn, params, batch, temperature)
        weights = batch["weights"].astype(jnp.float32)
        denominator = batch["loss_denominator"]

        def mean(x):
            return jnp.sum(x * weights) / denominator

        logprobs = action_logprobs(logits, batch["targets"], temperature)
        log_ratio = logprobs - batch["old_logprobs"]
        policy_loss = mean(clipped_surrogate(jnp.exp(log_ratio), batch["advantages"], clip_ratio))

        old_values, returns = batch["old_values"], batch["returns"]
        clipped_values = old_values + jnp.clip(values - old_values, -clip_value, clip_value)
        value_loss = mean(0.5 * jnp.maximum((values - returns) ** 2, (clipped_values - returns) ** 2))

        token_entropy = entropy(logits, temperature)
        loss = policy_loss + value_coef * value_loss - entropy_coef * mean(token_entropy)
        return loss, {
            "policy_loss": policy_loss,
            "value_loss": value_loss,
            "entropy": mean(token_entropy),
            "value_clip_fraction": mean((jnp.abs(values - old_values) > clip_value).astype(jnp.float32)),
            **ratio_metrics(log_ratio, weights, mean, clip_ratio),
        }

    return objective
