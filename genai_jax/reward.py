"""Reward-model data from the synthetic world, batched scoring, and reward normalisation.

World preference pairs: for a training problem, one response is sampled from the SFT policy and
the other is either a second sample or a near miss of the correct answer; the gold checker orders them
(ties are skipped) and the order is flipped with probability `label_noise`, as human labels
disagree. The gold order is kept beside the noisy one to measure agreement with the truth.

Normalisation (as in OpenAI's lm-human-preferences): gain and bias fitted after training so that
the SFT policy's own samples score mean 0, std 1; saved beside the checkpoints and applied
whenever the model scores.
"""

from __future__ import annotations

import json
import os
from functools import partial

import jax
import numpy as np
from etils import epath

from genai_jax.completion import NORMALIZATION_FILE
from genai_jax.config import RunConfig, UserError
from genai_jax.data import world
from genai_jax.data.chat import fitted_seq_len, prompt_tail, response_tokens
from genai_jax.data.preferences import PreferenceGroup, read_preferences_jsonl
from genai_jax.distributed import say
from genai_jax.evaluation import respond
from genai_jax.model import GPT
from genai_jax.objectives.bradley_terry import sequence_rewards
from genai_jax.tokenizer import Tokenizer

SAMPLE_TOKENS = 16
"""New tokens of each policy sample: world pairs' answers and the normalisation's."""
NORMALIZATION_PROMPTS = 256


def world_preferences(cfg: RunConfig, policy_params, tokenizer: Tokenizer, problems: list[world.Problem],
                      seed: int) -> tuple[list[PreferenceGroup], list[bool]]:
    """(groups with noisy labels, whether each label agrees with gold) for `problems`."""
    rng = np.random.default_rng(seed)
    chats = [world.chat(p)[:1] for p in problems]
    generation = dict(max_new_tokens=SAMPLE_TOKENS, temperature=1.0)
    first = respond(cfg, policy_params, tokenizer, chats, seed=seed, **generation)
    second = respond(cfg, policy_params, tokenizer, chats, seed=seed + 1, **generation)
    groups, agrees = [], []
    for problem, chat, a, b in zip(problems, chats, first, second):
        other = b.text if rng.random() < 0.5 else world.near_miss(problem.answer, rng)
        gold_a, gold_b = world.gold_score(problem.instruction, a.text), world.gold_score(problem.instruction, other)
        if gold_a == gold_b:
            continue
        gold_order = (0, 1) if gold_a > gold_b else (1, 0)
        flipped = rng.random() < cfg.data.label_noise
        groups.append(PreferenceGroup(tuple(chat), (a.text, other), gold_order[::-1] if flipped else gold_order))
        agrees.append(not flipped)
    return groups, agrees


def world_validation(cfg: RunConfig, policy_params, tokenizer: Tokenizer) -> tuple[list[PreferenceGroup], list[bool]]:
    """The held-out world pairs a reward run with `cfg.data` is measured on, sampled from the policy
    (`cfg.model`), and whether each label agrees with gold."""
    problems = world.problems(cfg.data.seed + 5, max(cfg.data.world_pairs // 8, 64), held_out=True)
    return world_preferences(cfg, policy_params, tokenizer, problems, cfg.data.seed + 7)


def gold_accuracy(label_right: np.ndarray, agrees) -> np.ndarray:
    """Per pair, 1.0 where the model orders it as gold does, from whether it matched its label."""
    return np.where(agrees, label_right, 1 - label_right)


@partial(jax.jit, static_argnames=("cfg",))
def _rewards(params, tokens, mask, *, cfg):
    return sequence_rewards(GPT(cfg).apply, params, tokens, mask)


def score_rows(score, params, tokens: np.ndarray, mask: np.ndarray, batch_size: int) -> np.ndarray:
    """Rewards of token rows [N, T] by `score(params, tokens, mask)` in fixed-shape batches (one
    compilation)."""
    scores = []
    for start in range(0, len(tokens), batch_size):
        chunk = slice(start, start + batch_size)
        pad = batch_size - len(tokens[chunk])
        batch_tokens = np.concatenate([tokens[chunk], np.repeat(tokens[:1], pad, axis=0)])
        batch_mask = np.concatenate([mask[chunk], np.repeat(mask[:1], pad, axis=0)])
        scores.append(np.asarray(score(params, batch_tokens, batch_mask))[: batch_size - pad])
    return np.concatenate(scores)


def raw_scores(cfg: RunConfig, params, tokenizer: Tokenizer, prompts: list[list[dict]], responses: list[str],
               batch_size: int = 64) -> np.ndarray:
    """Unnormalised rewards of each (prompt, response), in rows as long as the longest needs
    (`fitted_seq_len`: a pretrained model's context of thousands of tokens would make every row
    that long), each keeping its last `model.context_len` tokens."""
    encoded = [response_tokens(tokenizer, prompt, response, cfg.model.context_len)[0]
               for prompt, response in zip(prompts, responses)]
    length = fitted_seq_len(max(map(len, encoded)), cfg.model.context_len)
    tokens = np.full((len(prompts), length), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for row, sequence in enumerate(encoded):
        tokens[row, : len(sequence)], mask[row, : len(sequence)] = sequence, 1
    return score_rows(partial(_rewards, cfg=cfg.model), params, tokens, mask, batch_size)


def pair_accuracy(cfg: RunConfig, params, rows: dict[str, np.ndarray], batch_size: int = 64,
                  score=None) -> np.ndarray:
    """Per pair (rows of `build_preference_rows` with K = 2): 1.0 where the labelled-better
    response scores higher, scored by the reward model of `cfg`, or by a jitted `score(params,
    tokens, mask)` -> rewards [N] of another form."""
    n, k, length = rows["tokens"].shape
    if k != 2:
        raise ValueError("pair_accuracy needs pairs (K = 2)")
    flat = score_rows(score or partial(_rewards, cfg=cfg.model), params, rows["tokens"].reshape(-1, length),
                       rows["mask"].reshape(-1, length), batch_size)
    first, second = flat.reshape(n, 2).T
    first_better = rows["rank"][:, 0] == 0
    return np.where(first_better, first > second, second > first).astype(np.float64)


def preference_data(cfg: RunConfig, policy_cfg: RunConfig, policy_params, tokenizer: Tokenizer):
    """(train groups, validation groups, whether each validation label agrees with gold or None)
    of the reward and DPO stages: world pairs sampled from the policy, or a JSONL file's groups."""
    if cfg.data.resolved_source != "world":
        return *load_preference_groups(cfg.data), None
    train_problems = world.problems(cfg.data.seed + 4, cfg.data.world_pairs)
    train_groups, _ = world_preferences(policy_cfg, policy_params, tokenizer, train_problems, cfg.data.seed)
    return train_groups, *world_validation(policy_cfg, policy_params, tokenizer)


def load_preference_groups(cfg) -> tuple[list[PreferenceGroup], list[PreferenceGroup]]:
    """(train, validation) groups of a JSONL file: its last `val_fraction` validates."""
    if cfg.resolved_source != "text":
        raise UserError(f"data.source {cfg.resolved_source!r} has no preferences (use world or --data.path FILE.jsonl)")
    groups, skipped = read_preferences_jsonl(cfg.path, cfg.skip_malformed, cfg.max_responses, "--data.skip-malformed")
    if skipped:
        say(f"{cfg.path}: skipped {skipped} malformed line(s)")
    n_val = int(len(groups) * cfg.val_fraction)
    return groups[: len(groups) - n_val], groups[len(groups) - n_val :]


def normalization_prompts(cfg: RunConfig, tokenizer: Tokenizer, groups: list[PreferenceGroup]) -> list[list[dict]]:
    """The training prompts the normalisation samples the policy on, each cut to its end (as the
    training rows are) so that a sample of SAMPLE_TOKENS fits in the context: a file's prompts may
    be far longer. Taken before training, so a context too short stops the stage before it starts."""
    return [prompt_tail(tokenizer, group.prompt, cfg.model.context_len, SAMPLE_TOKENS)
            for group in groups[:NORMALIZATION_PROMPTS]]


def fit_normalization(scores: np.ndarray) -> dict[str, float]:
    """gain and bias with gain * score + bias of mean 0 and std 1 over `scores`."""
    std = float(np.std(scores))
    if std <= 1e-6 * max(1.0, abs(float(np.mean(scores)))):
        raise UserError("the reward model gives every policy sample the same score; cannot normalise")
    return {"gain": 1.0 / std, "bias": -float(np.mean(scores)) / std}


def save_normalization(run_dir: str | os.PathLike, normalization: dict) -> None:
    (epath.Path(run_dir) / NORMALIZATION_FILE).write_text(json.dumps(normalization, indent=2))


def load_normalization(run_dir: str | os.PathLike) -> dict[str, float]:
    path = epath.Path(run_dir) / NORMALIZATION_FILE
    if not path.exists():
        raise UserError(f"{run_dir}: no {NORMALIZATION_FILE} (not a finished reward model run)")
    return json.loads(path.read_text())


def scores(cfg: RunConfig, params, tokenizer: Tokenizer, prompts: list[list[dict]], responses: list[str],
           normalization: dict[str, float], batch_size: int = 64) -> np.ndarray:
    """Normalised rewards: what every user of a trained reward model sees."""
    raw = raw_scores(cfg, params, tokenizer, prompts, responses, batch_size)
    return normalization["gain"] * raw + normalization["bias"]
