"""How much of what the SFT policy knows a world reward model has learned: gold accuracy on
held-out world preference pairs (the reward stage's own), for the reward model and,
without any training, for the SFT policy's own log-likelihood of each response. Pairs are split
into those with a correct answer and those of two wrong answers (ordered by partial credit).

    python experiments/reward_ceiling.py --reward runs/pipeline/reward --sft runs/pipeline/sft
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial

import jax
import numpy as np
import tyro

from genai_jax import reward, runs, stages
from genai_jax.data import world
from genai_jax.data.chat import build_preference_rows
from genai_jax.model import GPT
from genai_jax.objectives.ppo import action_logprobs


@dataclass(frozen=True)
class Args:
    reward: str
    """A finished reward model run (world data)."""
    sft: str
    """The SFT run it started from."""


@partial(jax.jit, static_argnames=("cfg",))
def _log_likelihood(params, tokens, mask, *, cfg):
    logits = GPT(cfg).apply(params, tokens)
    return (action_logprobs(logits[:, :-1], tokens[:, 1:], 1.0) * mask[:, 1:]).sum(axis=-1)


def log_likelihoods(cfg, params, tokens: np.ndarray, mask: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Summed log-probability of each row [N, T] (the prompt's share is the same for both
    responses of a pair, so differences compare the responses)."""
    return np.concatenate([np.asarray(_log_likelihood(params, tokens[i:i + batch_size], mask[i:i + batch_size],
                                                      cfg=cfg.model))
                           for i in range(0, len(tokens), batch_size)])


def main(args: Args) -> None:
    reward_cfg, tokenizer, reward_params = runs.load_trained(args.reward)
    sft_cfg, _, sft_params = runs.load_trained(args.sft)
    groups, agrees = reward.world_validation(dataclasses.replace(reward_cfg, model=sft_cfg.model), sft_params, tokenizer)
    rows, _ = build_preference_rows(groups, tokenizer, stages.seq_len(reward_cfg))
    agrees = np.asarray(agrees)
    gold_first = (rows["rank"][:, 0] == 0) == agrees

    reward_right = reward.gold_accuracy(reward.pair_accuracy(reward_cfg, reward_params, rows), agrees)
    n, k, length = rows["tokens"].shape
    likelihood = log_likelihoods(sft_cfg, sft_params, rows["tokens"].reshape(-1, length),
                                 rows["mask"].reshape(-1, length)).reshape(n, k)
    likelihood_right = (likelihood[:, 0] > likelihood[:, 1]) == gold_first

    gold = np.array([[world.gold_score(g.prompt[-1]["content"], r) for r in g.responses] for g in groups])
    both_wrong = (gold < 1).all(axis=1)
    print(f"gold accuracy, % ({len(groups)} held-out pairs; labels agree with gold on {100 * agrees.mean():.1f}%)")
    print(f"{'pairs':<28}{'share':>8}{'reward model':>14}{'SFT likelihood':>16}")
    for name, chosen in (("one correct answer", ~both_wrong), ("two wrong answers", both_wrong),
                         ("all", np.ones(n, bool))):
        print(f"{name:<28}{100 * chosen.mean():8.1f}{100 * reward_right[chosen].mean():14.1f}"
              f"{100 * likelihood_right[chosen].mean():16.1f}")


if __name__ == "__main__":
    main(tyro.cli(Args))
