"""Which form of reward model learns the world's preferences: the stage's (trunk + scalar head
read at the last token) against two forms read off the language-model head, each trained with
the same Bradley-Terry objective on the reward stage's own world pairs and measured on its
held-out pairs (accuracy against the noisy labels and against the gold order).

- `scalar`: the reward stage's model and objective (with its reward centering);
- `likelihood`: beta * log pi(response | prompt) under a trained copy of the SFT policy;
- `log-ratio`: beta * [log pi - log pi_SFT], DPO's implicit reward (0 before training: all ties).

    python experiments/reward_forms.py --sft runs/pipeline/sft
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import tyro

from genai_jax import config, reward, runs, stages
from genai_jax.data import world
from genai_jax.data.chat import build_preference_rows
from genai_jax.model import GPT, with_scalar_head
from genai_jax.objectives.bradley_terry import make_bradley_terry_objective, sequence_rewards
from genai_jax.objectives.ppo import action_logprobs
from genai_jax.optim import make_optimizer
from genai_jax.tokenizer import ASSISTANT
from genai_jax.train import TrainState, make_train_step

Form = Literal["scalar", "likelihood", "log-ratio"]


@dataclass(frozen=True)
class Args:
    sft: str
    """The SFT run the reward models start from (world data)."""
    preset: str = "tiny"
    """Whose reward-stage settings (data, optimiser, steps, batch) to use."""
    forms: tuple[Form, ...] = ("scalar", "likelihood", "log-ratio")
    beta: float = 0.1
    """Scale of the summed log-probabilities in the two likelihood forms."""
    label_noise: float | None = None
    """Override the stage's `data.label_noise` (0: gold labels)."""
    likelihood_lr: float = 1e-4
    """Peak learning rate of the two likelihood forms (the stage's 3e-4 erodes the policy's prior)."""


def likelihood_apply(model: GPT, beta: float, response_start_id: int, reference=None):
    """An apply function in the scalar head's shape whose value at each position is beta times the
    summed log-probability of the response tokens so far (those after the last `response_start_id`,
    the assistant's role token), minus the reference's, so that the reward read at the last real
    token is the response's."""

    def cumulative(params, tokens, positions, segment_ids, deterministic, rngs):
        logits = model.apply(params, tokens, positions=positions, segment_ids=segment_ids,
                             deterministic=deterministic, head="lm", rngs=rngs)
        starts = tokens == response_start_id
        seen = jnp.cumsum(starts, axis=-1)
        in_response = (seen == seen[:, -1:]) & (seen > 0) & ~starts & (segment_ids > 0)
        per_token = action_logprobs(logits[:, :-1], tokens[:, 1:], 1.0) * in_response[:, 1:]
        return jnp.pad(jnp.cumsum(per_token, axis=-1), ((0, 0), (1, 0)))

    def apply(params, tokens, *, positions, segment_ids, deterministic, head, rngs):
        del head  # always read off the LM head
        values = cumulative(params, tokens, positions, segment_ids, deterministic, rngs)
        if reference is not None:
            values -= cumulative(reference, tokens, positions, segment_ids, True, {})
        return beta * values

    return apply


def train(cfg: config.RunConfig, apply_fn, params, centering: float, rows: dict) -> dict:
    """Bradley-Terry training on random batches of `rows` with the stage's optimiser and the
    project's one train step."""
    objective = make_bradley_terry_objective(apply_fn, deterministic=True, centering=centering)
    optimizer = make_optimizer(cfg.optim, cfg.train.max_steps)
    step = jax.jit(make_train_step(objective, optimizer, accum_steps=cfg.optim.grad_accum))
    state = TrainState.create(params, optimizer, jax.random.PRNGKey(cfg.train.seed))
    rng = np.random.default_rng(cfg.train.seed)
    for _ in range(cfg.train.max_steps):
        chosen = rng.integers(0, len(rows["tokens"]), cfg.train.batch_size)
        state, _ = step(state, {name: array[chosen] for name, array in rows.items()}, state.rng)
    return state.params


def setup(form: Form, args: Args, cfg: config.RunConfig, sft_params, response_start_id: int):
    """(apply function, initial parameters, reward centering, config) of one form."""
    model = GPT(cfg.model)
    if form == "scalar":
        return (model.apply, with_scalar_head(sft_params, cfg.model, jax.random.PRNGKey(cfg.train.seed + 1)),
                cfg.objective.reward_centering, cfg)
    reference = sft_params if form == "log-ratio" else None
    return (likelihood_apply(model, args.beta, response_start_id, reference), sft_params, 0.0,
            config.replace(cfg, optim={"lr": args.likelihood_lr, "min_lr": args.likelihood_lr / 10}))


def main(args: Args) -> None:
    sft_cfg, tokenizer, sft_params = runs.load_trained(args.sft)
    # The stage's data and optimiser around the SFT model (whose LM head samples the pairs).
    cfg = config.replace(config.preset(args.preset, "reward"), model=sft_cfg.model)
    if args.label_noise is not None:
        cfg = config.replace(cfg, data={"label_noise": args.label_noise})
    length = stages.seq_len(cfg)
    problems = world.problems(cfg.data.seed + 4, cfg.data.world_pairs)
    train_groups, _ = reward.world_preferences(cfg, sft_params, tokenizer, problems, cfg.data.seed)
    val_groups, agrees = reward.world_validation(cfg, sft_params, tokenizer)
    train_rows, _ = build_preference_rows(train_groups, tokenizer, length)
    val_rows, _ = build_preference_rows(val_groups, tokenizer, length)
    print(f"{len(train_groups)} training pairs, {len(val_groups)} held-out pairs whose labels agree with gold on "
          f"{100 * np.mean(agrees):.1f}%; {cfg.train.max_steps} steps of {cfg.train.batch_size} pairs, "
          f"lr {cfg.optim.lr} (likelihood forms {args.likelihood_lr})")
    print(f"{'form':<12}{'gold before':>12}{'label after':>12}{'gold after':>12}{'seconds':>9}")
    def gold(label_right: np.ndarray) -> float:
        return 100 * reward.gold_accuracy(label_right, agrees).mean()

    for form in args.forms:
        apply_fn, params, centering, form_cfg = setup(form, args, cfg, sft_params, tokenizer.special_id(ASSISTANT))
        score = jax.jit(partial(sequence_rewards, apply_fn))
        # DPO's implicit reward is 0 for every response before training: every pair is a tie.
        before = ("ties" if form == "log-ratio"
                  else f"{gold(reward.pair_accuracy(cfg, params, val_rows, score=score)):.1f}")
        start = time.perf_counter()
        params = train(form_cfg, apply_fn, params, centering, train_rows)
        seconds = time.perf_counter() - start
        label_right = reward.pair_accuracy(cfg, params, val_rows, score=score)
        print(f"{form:<12}{before:>12}{100 * label_right.mean():12.1f}{gold(label_right):12.1f}{seconds:9.0f}",
              flush=True)

if __name__ == "__main__":
    main(tyro.cli(Args))
