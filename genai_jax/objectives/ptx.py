"""PPO-ptx (Ouyang et al. 2022, InstructGPT, eq. 2): the RL objective plus gamma times the LM loss
on pretraining text, against the alignment tax (RL forgetting what pretraining taught):

    loss = RL loss(params["policy"], ...) + gamma * mean over pretraining tokens of -log pi(x_t | x_<t)

The batch carries both parts: the RL rows, and pretraining windows under `ptx_inputs`,
`ptx_targets` [R, T] (every token counts). Each shard holds the same number of windows, so the
mean of the shards' means is the global mean and accumulation or devices change nothing.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

from genai_jax.objectives.lm import token_nll

PTX_KEYS = ("ptx_inputs", "ptx_targets")


def make_ptx_objective(rl_objective: Callable, apply_fn: Callable, ptx_coef: float):
    def objective(params, batch, rng):
        loss, metrics = rl_objective(params, {k: v for k, v in batch.items() if k not in PTX_KEYS}, rng)
        logits = apply_fn(params["policy"], batch["ptx_inputs"], deterministic=True, head="lm")
        ptx_loss = jnp.mean(token_nll(logits, batch["ptx_targets"]))
        return loss + ptx_coef * ptx_loss, metrics | {"ptx_loss": ptx_loss}

    return objective
