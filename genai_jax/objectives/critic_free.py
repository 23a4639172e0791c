"""Critic-free RL: GRPO and RLOO, which replace PPO's value model by a baseline from the other
samples of the same prompt (G samples per prompt, `ppo.group_size`), and their shared objective.

GRPO (Shao et al. 2024, DeepSeekMath): a sequence's advantage is its score against its group,
A_i = (r_i - mean(r)) / (std(r) + eps), or r_i - mean(r) alone (Dr. GRPO, Liu et al. 2025), on
every token of the response; the KL to the reference is a term of the loss, beta times the k3
estimate per token, (pi_ref / pi - 1) - log(pi_ref / pi).

RLOO (Ahmadian et al. 2024): the KL penalty is in the reward, r_i = score_i - beta KL_i, and the
baseline is the mean of the other G - 1 rewards: A_i = r_i - (sum_j r_j - r_i) / (G - 1), which
equals G / (G - 1) (r_i - mean(r)).

Both train PPO's clipped surrogate on the rollout's log-probabilities. The batch is PPO's without
`old_values` and `returns`; GRPO's adds `ref_logprobs`. `weights` choose the token aggregation:
1 per response token (every token of the global batch counts once, as DAPO and Dr. GRPO do), or
1 / length (each sequence counts once, its tokens averaged: the GRPO paper).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from genai_jax.objectives.ppo import action_logprobs, clipped_surrogate, entropy, kl_estimate, ratio_metrics


def group_advantages(scores: jax.Array, group_size: int, scale: bool = True, eps: float = 1e-4) -> jax.Array:
    """GRPO's advantage of each of scores [B * G] (a group's G samples adjacent): against its
    group's mean, divided by the group's standard deviation + eps when `scale`. A group whose
    scores are all equal gets 0."""
    groups = scores.reshape(-1, group_size)
    centred = groups - jnp.mean(groups, axis=1, keepdims=True)
    if scale:
        centred = centred / (jnp.std(groups, axis=1, keepdims=True) + eps)
    return centred.reshape(-1)


def leave_one_out_advantages(rewards: jax.Array, group_size: int) -> jax.Array:
    """RLOO's advantage of each of rewards [B * G]: minus the mean of the group's other rewards."""
    groups = rewards.reshape(-1, group_size)
    others = (jnp.sum(groups, axis=1, keepdims=True) - groups) / (group_size - 1)
    return (groups - others).reshape(-1)


def make_critic_free_objective(apply_fn: Callable, *, clip_ratio: float = 0.2, kl_coef: float = 0.0,
                               entropy_coef: float = 0.0, temperature: float = 1.0):
    """Clipped surrogate plus kl_coef times the k3 KL to the reference (GRPO; RLOO passes 0, its KL
    is in the reward), minus entropy_coef times the entropy; averaged as `weights` say. Params are
    {"policy"}: there is no value model."""

    def objective(params, batch, rng):
        del rng  # dropout is off in every RLHF model
        logits = apply_fn(params["policy"], batch["inputs"], positions=batch["positions"],
                          segment_ids=batch["segment_ids"], deterministic=True, head="lm")
        weights = batch["weights"].astype(jnp.float32)
        denominator = batch["loss_denominator"]

        def mean(x):
            return jnp.sum(x * weights) / denominator

        logprobs = action_logprobs(logits, batch["targets"], temperature)
        log_ratio = logprobs - batch["old_logprobs"]
        policy_loss = mean(clipped_surrogate(jnp.exp(log_ratio), batch["advantages"], clip_ratio))
        token_entropy = mean(entropy(logits, temperature))
        loss = policy_loss - entropy_coef * token_entropy
        metrics = {"policy_loss": policy_loss, "entropy": token_entropy,
                   **ratio_metrics(log_ratio, weights, mean, clip_ratio)}
        if kl_coef:
            ref_logprobs = batch["ref_logprobs"]  # masked tokens' estimates would overflow: set them to 0
            reference_kl = mean(kl_estimate(jnp.where(weights > 0, logprobs, ref_logprobs), ref_logprobs, "k3"))
            loss += kl_coef * reference_kl
            metrics["reference_kl"] = reference_kl
        return loss, metrics

    return objective
