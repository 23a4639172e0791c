"""Direct preference optimisation: the policy trained on ranked responses with no reward model.

For a better response w and a worse one l to the same prompt x, with rho(y) = log pi(y|x) -
log pi_ref(y|x) the policy's log-ratio to the frozen reference and |y| the response's tokens:

  sigmoid (DPO, Rafailov et al. 2023): -(1 - e) log s(beta (rho_w - rho_l)) - e log s(-beta (rho_w - rho_l)),
      with e the label smoothing (conservative DPO; 0 is plain DPO);
  ipo (IPO, Azar et al. 2023): (rho_w / |w| - rho_l / |l| - 1 / (2 beta))^2, length-normalised as the
      IPO authors and TRL do;
  hinge (SLiC-style, Zhao et al. 2023): max(0, 1 - beta (rho_w - rho_l));
  simpo (SimPO, Meng et al. 2024, reference-free): -log s(beta (log pi(w) / |w| - log pi(l) / |l|) - gamma),
      label-smoothed as sigmoid.

The implicit reward of a response is beta rho(y) (simpo: beta log pi(y) / |y|); `accuracy` is the
share of pairs whose better response has the larger one. A batch row is one prompt with K ranked
responses; as in the Bradley-Terry objective every (better, worse) pair is a term weighted
1 / (number of pairs), so a prompt counts once however many answers it ranks.

Batch: tokens, response [B, K, T] (right-padded rows from position 0; `response` is 1 on the
tokens of the final answer and its end of turn), rank, valid [B, K], weights [B], and the
reference's summed response log-probabilities `ref_logprobs` [B, K], unless the objective is
made with `reference_params` (then it computes them itself, without gradient).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from genai_jax.metrics import Spread
from genai_jax.objectives.bradley_terry import pair_weights
from genai_jax.objectives.lm import token_nll

LOSSES = ("sigmoid", "ipo", "hinge", "simpo")


def response_logprobs(apply_fn: Callable, params, tokens, response, deterministic: bool = True, rng=None):
    """(sum of log pi over the response's tokens [N], their count [N]) for rows tokens [N, T]:
    token t + 1 counts where response[t + 1] is 1."""
    logits = apply_fn(params, tokens[:, :-1], deterministic=deterministic,
                      rngs={"dropout": rng} if rng is not None else {})
    weights = response[:, 1:].astype(jnp.float32)
    logprobs = -token_nll(logits, tokens[:, 1:])
    return jnp.sum(logprobs * weights, axis=-1), jnp.sum(weights, axis=-1)


def pair_losses(loss: str, chosen, rejected, chosen_count, rejected_count, beta: float,
                label_smoothing: float = 0.0, simpo_gamma: float = 0.0):
    """The loss of each (better, worse) pair from the log-ratios (simpo: the log-probabilities)
    and token counts of the better and worse responses."""
    if loss == "ipo":
        return (chosen / chosen_count - rejected / rejected_count - 1.0 / (2.0 * beta)) ** 2
    if loss == "hinge":
        return jax.nn.relu(1.0 - beta * (chosen - rejected))
    if loss == "sigmoid":
        logits = beta * (chosen - rejected)
    elif loss == "simpo":
        logits = beta * (chosen / chosen_count - rejected / rejected_count) - simpo_gamma
    else:
        raise ValueError(f"unknown DPO loss {loss!r} ({', '.join(LOSSES)})")
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits) - label_smoothing * jax.nn.log_sigmoid(-logits)


def implicit_rewards(loss: str, logprobs, ref_logprobs, counts, beta: float):
    """beta * (log pi - log pi_ref) per response; for simpo, beta * log pi / |y|."""
    if loss == "simpo":
        return beta * logprobs / jnp.maximum(counts, 1.0)
    return beta * (logprobs - ref_logprobs)


def make_dpo_objective(apply_fn: Callable, deterministic: bool = False, *, loss: str = "sigmoid",
                       beta: float = 0.1, label_smoothing: float = 0.0, simpo_gamma: float = 0.0,
                       reference_params=None):
    if loss not in LOSSES:
        raise ValueError(f"unknown DPO loss {loss!r} ({', '.join(LOSSES)})")

    def objective(params, batch, rng):
        batch_size, k, length = batch["tokens"].shape
        tokens, response = batch["tokens"].reshape(-1, length), batch["response"].reshape(-1, length)
        logprobs, counts = response_logprobs(apply_fn, params, tokens, response, deterministic, rng)
        if reference_params is None:
            ref_logprobs = batch["ref_logprobs"].reshape(-1)
        else:
            ref_logprobs = jax.lax.stop_gradient(response_logprobs(apply_fn, reference_params, tokens, response)[0])
        logprobs, ref_logprobs, counts = (x.reshape(batch_size, k) for x in (logprobs, ref_logprobs, counts))
        counts = jnp.maximum(counts, 1.0)
        ratios = logprobs if loss == "simpo" else logprobs - ref_logprobs
        weight = pair_weights(batch["rank"], batch["valid"], batch["weights"].astype(jnp.float32))
        denominator = batch["loss_denominator"]

        def mean(x):
            return jnp.sum(weight * x) / denominator

        terms = pair_losses(loss, ratios[:, :, None], ratios[:, None, :], counts[:, :, None], counts[:, None, :],
                            beta, label_smoothing, simpo_gamma)
        rewards = implicit_rewards(loss, logprobs, ref_logprobs, counts, beta)
        chosen, rejected = rewards[:, :, None], rewards[:, None, :]
        chosen_mean, rejected_mean = mean(chosen), mean(rejected)
        return mean(terms), {
            "accuracy": mean((chosen > rejected).astype(jnp.float32)),
            "margin": mean(chosen - rejected),
            "chosen_reward": chosen_mean,
            "rejected_reward": rejected_mean,
            "chosen_reward_std": Spread(chosen_mean, mean(chosen**2)),
            "rejected_reward_std": Spread(rejected_mean, mean(rejected**2)),
            "chosen_logprob": mean(logprobs[:, :, None]),
            "rejected_logprob": mean(logprobs[:, None, :]),
        }

    return objective
