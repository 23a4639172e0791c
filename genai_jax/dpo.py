"""DPO's library (the stage is `stages.dpo`): the reference's log-probabilities of preference
rows, cached in the run directory, and the implicit reward's pair accuracy.

The reference is frozen, so by default its summed response log-probabilities are computed once,
in one compiled pass over fixed-size batches, and travel with the rows as `ref_logprobs`: the
train step then never runs the reference and the optimizer never sees it.
"""

from __future__ import annotations

from functools import partial

import jax
import numpy as np
from etils import epath

from genai_jax.config import RunConfig
from genai_jax.distributed import say
from genai_jax.model import GPT
from genai_jax.objectives.dpo import implicit_rewards, response_logprobs
from genai_jax.reward import pair_accuracy, score_rows

REFERENCE_FILE = "reference_logprobs.npz"


@partial(jax.jit, static_argnames=("cfg",))
def _summed_logprobs(params, tokens, response, *, cfg):
    return response_logprobs(GPT(cfg).apply, params, tokens, response)[0]


def reference_logprobs(cfg: RunConfig, reference_params, rows: dict[str, np.ndarray], batch_size: int = 64) -> np.ndarray:
    """[N, K] summed log-probabilities of each row's response under the reference."""
    n, k, length = rows["tokens"].shape
    flat = score_rows(partial(_summed_logprobs, cfg=cfg.model), reference_params, rows["tokens"].reshape(-1, length),
                      rows["response"].reshape(-1, length), batch_size)
    return flat.reshape(n, k).astype(np.float32)


def cached_reference_logprobs(cfg: RunConfig, run_dir: epath.Path, reference_params,
                              named_rows: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per name (train, val), the reference log-probabilities of those rows: read from the run
    directory when it holds them for rows of these shapes, else computed and saved there (by
    process 0; every process computes the same)."""
    path = run_dir / REFERENCE_FILE
    if path.exists():
        with path.open("rb") as f:
            cached = dict(np.load(f))
        if sorted(cached) == sorted(named_rows) and all(
                cached[name].shape == rows["tokens"].shape[:2] for name, rows in named_rows.items()):
            return cached
    say(f"dpo: scoring {sum(len(rows['tokens']) for rows in named_rows.values())} preference groups "
        "under the reference")
    computed = {name: reference_logprobs(cfg, reference_params, rows) for name, rows in named_rows.items()}
    if jax.process_index() == 0:
        with path.open("wb") as f:
            np.savez(f, **computed)
    return computed


@partial(jax.jit, static_argnames=("cfg", "loss", "beta"))
def _implicit_rewards(params, tokens, response, *, cfg, loss, beta):
    policy_params, reference_params = params
    logprobs, counts = response_logprobs(GPT(cfg).apply, policy_params, tokens, response)
    ref_logprobs = response_logprobs(GPT(cfg).apply, reference_params, tokens, response)[0]
    return implicit_rewards(loss, logprobs, ref_logprobs, counts, beta)


def implicit_pair_accuracy(cfg: RunConfig, policy_params, reference_params, rows: dict[str, np.ndarray]) -> np.ndarray:
    """Per pair: 1.0 where the labelled-better response has the larger implicit reward."""
    score = partial(_implicit_rewards, cfg=cfg.model, loss=cfg.dpo.loss, beta=cfg.dpo.beta)
    params = jax.device_put((policy_params, reference_params), jax.local_devices()[0])  # wherever each was
    return pair_accuracy(cfg, params, dict(rows, mask=rows["response"]), score=score)
