"""SFT's objective: the LM loss on response tokens only.

The batch's `weights` are the loss mask (1 on assistant tokens and their end-of-turn), so this is
the LM objective with metrics named for what they measure. Normalisation by the number of
response tokens in the whole global batch comes from the train step's `loss_denominator`.
"""

from __future__ import annotations

from typing import Callable

from genai_jax.objectives.lm import make_lm_objective


def make_masked_lm_objective(apply_fn: Callable, deterministic: bool = False):
    lm_objective = make_lm_objective(apply_fn, deterministic)

    def objective(params, batch, rng):
        loss, metrics = lm_objective(params, batch, rng)
        return loss, {"response_accuracy": metrics["accuracy"]}

    return objective
