"""Stage 3: RLHF against the reward model (or the gold checker), held near the SFT model by a KL
penalty, with PPO (the default), GRPO or RLOO (`ppo.algorithm`).

PPO has four models: the policy (from SFT, trained), the value model (from the reward model,
trained), the frozen reference (the SFT model) and the frozen reward model with its
normalisation. Policy and value are one parameter pytree {"policy", "value"} under one
optimizer, so the stage trains with the same `make_train_step` as every other; only the
objective (`ppo`) differs. GRPO and RLOO have no value model (params {"policy"}): their baseline
is the other samples of the same prompt (`ppo.group_size` per prompt), and their objective is
`critic_free`.

One iteration (one "step" of this stage): sample responses for a batch of prompts with the KV
cache, score them (`experience`, one compiled function: log-probabilities under the policy and the
reference, values, the normalised reward), compute per-token rewards and GAE advantages, then run
`epochs` passes of `minibatches` optimizer updates over the batch. Everything a resumed run needs
is in the checkpoint: params, optimizer state, PRNG key, the KL coefficient, the iteration (which
fixes the prompts it draws), so a stopped run continues exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from functools import partial
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from tqdm import tqdm

from genai_jax import config as config_lib
from genai_jax import lora
from genai_jax import population as population_lib
from genai_jax import reward as reward_lib
from genai_jax import rundir
from genai_jax.checkpoint import Checkpointer
from genai_jax.config import RunConfig, UserError
from genai_jax.data import loader, sources, world
from genai_jax.data.conversations import prompt_line, read_prompts_jsonl
from genai_jax.data.chat import fitted_seq_len
from genai_jax.evaluation import bucketed_len, left_pad, policy_gold
from genai_jax.model import GPT, count_params, with_scalar_head
from genai_jax.objectives.bradley_terry import sequence_rewards
from genai_jax.objectives.critic_free import group_advantages, leave_one_out_advantages, make_critic_free_objective
from genai_jax.objectives.lm import token_nll
from genai_jax.objectives.ppo import (action_logprobs, adaptive_kl_update, explained_variance, gae, kl_estimate,
                                      make_ppo_objective, masked_whiten, policy_and_values)
from genai_jax.objectives.ptx import make_ptx_objective
from genai_jax.optim import make_ppo_optimizer
from genai_jax.parallel import (Mesh, compile_step, host_copy, host_peak_mib, make_strategy, peak_record, report_memory,
                                to_host)
from genai_jax.runs import final_record, load_replicas, make_ppo_init_fn, open_run, restore_target
from genai_jax.sampling import generate, is_stop
from genai_jax.scorers import CODE_REWARD, checked_scores, load_reward_function
from genai_jax.tokenizer import Tokenizer, decode_response, encode_chat, stop_ids
from genai_jax.train import Preempted, PreemptionGuard, make_train_step

GOLD_REWARD = "gold"
"""`ppo.reward` naming the task world's gold checker instead of a reward model run."""


def response_mask(response: jax.Array, end_ids: tuple[int, ...]) -> jax.Array:
    """True on the response's tokens up to and including its first end-of-turn."""
    is_end = is_stop(response, end_ids).astype(jnp.int32)
    return (jnp.cumsum(is_end, axis=1) - is_end) == 0


@partial(jax.jit, static_argnames=("cfg", "end_ids", "pad_id"))
def experience(params, ref_params, reward_params, normalization, prompt, prompt_mask, response, beta,
               scores=None, *, cfg: RunConfig, end_ids: tuple[int, ...], pad_id: int):
    """(train batch, per-sequence stats) for sampled responses [B, R] to left-padded prompts [B, P].

    The response ends at its first end-of-turn (later tokens become padding). Per-token reward is
    -beta * KL estimate, plus the sequence's score at its last token: the reward model's normalised
    score (or the given `scores` [B], e.g. the gold checker's), clipped, minus `no_end_penalty` if
    the turn never ended. With lora.rank > 0, `params` is a LoRA tree of {"policy", "value"}:
    a None `ref_params` is the policy's base, a None `reward_params` the value model's base.
    """
    ppo = cfg.ppo
    apply_fn = GPT(cfg.model).apply
    if cfg.lora.rank:
        ref_params = params["base"]["policy"] if ref_params is None else ref_params
        reward_params = params["base"].get("value") if reward_params is None else reward_params
        params = lora.merge(params, cfg.lora)
    in_response = response_mask(response, end_ids)
    ended = jnp.any(is_stop(response, end_ids), axis=1)
    response = jnp.where(in_response, response, pad_id)
    tokens = jnp.concatenate([prompt, response], axis=1)
    mask = jnp.concatenate([prompt_mask, in_response], axis=1).astype(jnp.int32)
    input_mask = mask[:, :-1]
    action_mask = jnp.concatenate(
        [jnp.zeros((prompt.shape[0], prompt.shape[1] - 1), jnp.float32), in_response.astype(jnp.float32)], axis=1)
    batch = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": jnp.maximum(jnp.cumsum(input_mask, axis=1) - 1, 0),
        "segment_ids": input_mask,
        "weights": action_mask,
    }
    if ppo.has_value_model:
        logits, values = policy_and_values(apply_fn, params, batch, ppo.temperature)
    else:
        logits = apply_fn(params["policy"], batch["inputs"], positions=batch["positions"],
                          segment_ids=batch["segment_ids"], deterministic=True, head="lm")
    logprobs = action_logprobs(logits, batch["targets"], ppo.temperature)
    ref_logits = apply_fn(ref_params, batch["inputs"], positions=batch["positions"],
                          segment_ids=batch["segment_ids"], deterministic=True, head="lm")
    ref_logprobs = action_logprobs(ref_logits, batch["targets"], ppo.temperature)

    proxy_reward = scores
    if proxy_reward is None:
        proxy_reward = (normalization["gain"] * sequence_rewards(apply_fn, reward_params, tokens, mask)
                        + normalization["bias"])
    score = jnp.clip(proxy_reward, -ppo.reward_clip, ppo.reward_clip) if ppo.reward_clip > 0 else proxy_reward
    score = score - ppo.no_end_penalty * (1.0 - ended.astype(jnp.float32))
    kl = kl_estimate(logprobs, ref_logprobs, ppo.kl_estimator) * action_mask
    sequence_kl = jnp.sum(kl, axis=1)
    batch["old_logprobs"] = logprobs * action_mask
    stats = {}
    if ppo.algorithm == "ppo":
        last_action = jax.nn.one_hot(action_mask.shape[1] - 1 - jnp.argmax(action_mask[:, ::-1], axis=1),
                                     action_mask.shape[1])
        rewards = -beta * kl + score[:, None] * last_action
        if ppo.whiten_rewards:
            rewards = masked_whiten(rewards, action_mask, shift_mean=False)
        values = values * action_mask
        advantages, returns = gae(rewards, values, action_mask, ppo.gamma, ppo.lam)
        batch |= {"old_values": values, "advantages": masked_whiten(advantages, action_mask), "returns": returns}
        stats["explained_variance"] = explained_variance(values, returns, action_mask)
    else:
        if ppo.algorithm == "grpo":
            sequence_advantages = group_advantages(score, ppo.group_size, scale=ppo.scale_rewards == "group")
            batch["ref_logprobs"] = ref_logprobs * action_mask
        else:  # rloo
            sequence_advantages = leave_one_out_advantages(score - beta * sequence_kl, ppo.group_size)
            if ppo.whiten_advantages:
                sequence_advantages = masked_whiten(sequence_advantages, jnp.ones_like(sequence_advantages))
        batch["advantages"] = sequence_advantages[:, None] * action_mask
    if ppo.loss_aggregation == "sequence":  # each sequence weighs 1, shared by its tokens
        batch["weights"] = action_mask / jnp.maximum(jnp.sum(action_mask, axis=1, keepdims=True), 1.0)

    stats |= {
        "proxy_reward": jnp.mean(proxy_reward),
        "score": jnp.mean(score),
        "kl": jnp.mean(sequence_kl),
        "rl_reward": jnp.mean(score - beta * sequence_kl),
        "response_tokens": jnp.mean(jnp.sum(action_mask, axis=1)),
        "ended": jnp.mean(ended.astype(jnp.float32)),
    }
    return batch, stats


@dataclasses.dataclass(frozen=True)
class Prompts:
    """Every prompt of the stage, encoded and left-padded to one length (one compiled shape)."""

    tokens: np.ndarray
    mask: np.ndarray
    problems: list[world.Problem] | None
    """Task world: the problem behind each prompt, for the gold score of rollouts."""
    texts: tuple[str, ...] = ()
    """Each prompt as the user wrote it, for a reward function of code."""


def load_prompts(cfg: RunConfig, tokenizer: Tokenizer) -> Prompts:
    """Training-side task-world instructions, or the prompts of a JSONL file (--data.path)."""
    source = cfg.data.resolved_source
    problems = None
    if source == "world":
        problems = world.problems(cfg.data.seed + 6, cfg.data.world_chats)
        chats = [world.chat(problem)[:1] for problem in problems]
    elif source == "text":
        chats = [[{"role": "user", "content": prompt}] for prompt in read_prompts_jsonl(cfg.data.path)]
    else:
        raise UserError(f"ppo takes prompts from the task world or --data.path FILE.jsonl, not data.source={source!r}")

    def where(index: int) -> str:
        if source == "text":
            return f"{cfg.data.path}:{prompt_line(cfg.data.path, index + 1)}: the prompt"
        return f"world prompt {index + 1}"

    encoded = []
    for index, chat in enumerate(chats):
        try:
            encoded.append(encode_chat(tokenizer, chat, generation_prompt=True)[0])
        except UserError as err:
            raise UserError(f"{where(index)}: {err}") from None
    longest = int(np.argmax([len(e) for e in encoded]))
    room = cfg.model.context_len - cfg.ppo.max_new_tokens
    if len(encoded[longest]) > room:
        raise UserError(f"{where(longest)} has {len(encoded[longest])} tokens; with ppo.max_new_tokens="
                        f"{cfg.ppo.max_new_tokens} it exceeds model.context_len={cfg.model.context_len}")
    prompt_len = bucketed_len(len(encoded[longest]), room)
    tokens, mask = left_pad(encoded, prompt_len, tokenizer.pad_id)
    return Prompts(tokens, mask, problems, tuple(chat[-1]["content"] for chat in chats))


def prompt_rows(num_prompts: int, batch_size: int, iteration: int, seed: int) -> np.ndarray:
    """The prompts of one iteration: the next `batch_size` of a stream that visits every prompt once
    per epoch in a fresh order. A function of the iteration alone, so a resumed run draws the same."""
    stream = np.arange(iteration * batch_size, (iteration + 1) * batch_size)
    epochs = stream // num_prompts
    orders = {int(e): np.random.default_rng([seed, int(e)]).permutation(num_prompts) for e in np.unique(epochs)}
    return np.array([orders[int(e)][i % num_prompts] for e, i in zip(epochs, stream)])


def _same_vocabulary(a: Tokenizer, b: Tokenizer) -> bool:
    return a.vocab_size == b.vocab_size and all(a.decode([i]) == b.decode([i]) for i in range(a.vocab_size))


def load_models(cfg: RunConfig):
    """(config with the policy's model, tokenizer, and per replica `index`: its SFT params
    `policy(index)`, its value model's initial params `value(index, seed)`, its reward params
    `reward(index)` and normalisation `normalization(index)`), refusing runs that cannot work
    together. `--policy` and `--reward` may each be a population of as many replicas as this run
    has: replica i then gets replica i's (`runs.load_replicas`; `index` may be traced). With
    `ppo.reward=gold` there is no reward model (None, None) and the value model starts from the
    SFT trunk with a head of its seed + 1; an algorithm without a value model gets None for it."""
    if not cfg.ppo.policy or not cfg.ppo.reward:
        raise UserError("ppo needs --policy SFT_RUN and --reward REWARD_RUN (or gold)")
    size = population_lib.Population(cfg).size
    policy_cfg, tokenizer, policy, _ = load_replicas(cfg.ppo.policy, size, "--policy")
    if policy_cfg.model.head != "lm":
        raise UserError(f"--policy {cfg.ppo.policy} is not a policy run (model.head={policy_cfg.model.head})")
    model = dataclasses.replace(policy_cfg.model, dropout=0.0, head="lm")
    cfg = dataclasses.replace(cfg, model=model)
    if cfg.ppo.reward == GOLD_REWARD or cfg.ppo.reward.startswith(CODE_REWARD):
        if cfg.ppo.reward == GOLD_REWARD and cfg.data.resolved_source != "world":
            raise UserError("--reward gold needs the task world's prompts (data.source=world)")
        value = ((lambda index, seed: with_scalar_head(policy(index), model, jax.random.PRNGKey(seed + 1)))
                 if cfg.ppo.has_value_model else None)
        return cfg, tokenizer, policy, value, None, None
    reward_cfg, reward_tokenizer, reward, _ = load_replicas(cfg.ppo.reward, size, "--reward")
    if reward_cfg.model.head != "scalar":
        raise UserError(f"--reward {cfg.ppo.reward} is not a reward model run (model.head={reward_cfg.model.head})")
    mismatched = [n for n in config_lib.diff(policy_cfg.model, reward_cfg.model) if n not in ("dropout", "head")]
    if mismatched:
        raise UserError(f"--reward {cfg.ppo.reward} and --policy {cfg.ppo.policy} differ in "
                        f"{', '.join('model.' + n for n in mismatched)}")
    if not _same_vocabulary(tokenizer, reward_tokenizer):
        raise UserError(f"--reward {cfg.ppo.reward} and --policy {cfg.ppo.policy} use different tokenizers")
    saved_normalization = reward_lib.load_normalization(cfg.ppo.reward)

    def normalization(index: int) -> dict:
        return population_lib.replica_part(saved_normalization, index)

    value = (lambda index, seed: reward(index)) if cfg.ppo.has_value_model else None
    return cfg, tokenizer, policy, value, reward, normalization


def rollouts_per_iteration(cfg: RunConfig) -> int:
    """Sequences sampled per iteration: `ppo.group_size` for each of `train.batch_size` prompts,
    a prompt's group adjacent."""
    return cfg.train.batch_size * cfg.ppo.group_size


def check_algorithm(cfg: RunConfig) -> None:
    """Refuse RL settings that cannot work together, before anything is loaded or written."""
    ppo = cfg.ppo
    if ppo.group_size < 1:
        raise UserError(f"ppo.group_size={ppo.group_size} must be at least 1")
    if not ppo.has_value_model and ppo.group_size < 2:
        raise UserError(f"ppo.algorithm={ppo.algorithm} takes its baseline from the other samples of a prompt: "
                        "set ppo.group-size to 2 or more")
    if ppo.algorithm == "grpo" and ppo.kl_target > 0:
        raise UserError("ppo.kl-target adapts a KL penalty in the reward (ppo, rloo); grpo's KL is a loss term "
                        "with the fixed coefficient ppo.kl-coef")


def check_batches(cfg: RunConfig, divisor: int) -> int:
    """Rows per minibatch, once the prompts split evenly into minibatches (a prompt's group stays
    in one) and each minibatch over `divisor` devices (all processes' devices: a minibatch is global)."""
    batch, minibatches = cfg.train.batch_size, cfg.ppo.minibatches
    if minibatches < 1 or batch % minibatches:
        raise UserError(f"train.batch_size={batch} (prompts per iteration) does not split into "
                        f"ppo.minibatches={minibatches}")
    rows = batch // minibatches * cfg.ppo.group_size
    if rows % (divisor * cfg.optim.grad_accum):
        raise UserError(f"a minibatch of {rows} rows does not split over {divisor} device(s) x "
                        f"optim.grad_accum={cfg.optim.grad_accum}")
    return rows


class PretrainingText(NamedTuple):
    """Windows of the corpus the policy was pretrained on: its training head (PPO-ptx's batches)
    and fixed batches of its held-out tail (the alignment tax: the policy's LM loss there)."""
    train: loader.TokenWindows
    val_batches: list[dict[str, np.ndarray]]


def load_pretraining_text(cfg: RunConfig, tokenizer: Tokenizer) -> PretrainingText | None:
    """The pretraining text of the policy's lineage (`ppo.policy`'s train.init_from run), cut into
    windows of model.context_len and split as that run split it; None when the lineage is gone
    (then ppo.ptx_coef > 0 is refused)."""
    base_dir = rundir.read_config(epath.Path(cfg.ppo.policy)).train.init_from
    if not base_dir or not (epath.Path(base_dir) / rundir.CONFIG_FILE).exists():
        if cfg.ppo.ptx_coef > 0:
            raise UserError(f"ppo.ptx-coef needs the pretraining run --policy {cfg.ppo.policy} was fine-tuned "
                            f"from (its train.init_from {base_dir!r} holds no {rundir.CONFIG_FILE})")
        return None
    if rundir.imported_from(base_dir):  # pretrained elsewhere: its data config names no text of its own
        if cfg.ppo.ptx_coef > 0:
            raise UserError(f"ppo.ptx-coef needs the text --policy {cfg.ppo.policy}'s base was pretrained on; "
                            f"its train.init_from {base_dir} is a model imported from "
                            f"{rundir.imported_from(base_dir)}")
        return None
    base_data = rundir.read_config(epath.Path(base_dir)).data
    length = cfg.model.context_len
    train, val = loader.split_tokens(tokenizer.encode(sources.load_text(base_data)), base_data.val_fraction, length)
    val_batches = []
    if len(val):  # the same windows on every process and at every evaluation
        val_windows = loader.TokenWindows(val, length)
        val_batches = [ptx_batch(val_windows, cfg.train.batch_size, [cfg.data.seed + 1, b])
                       for b in range(cfg.train.eval_batches)]
    return PretrainingText(loader.TokenWindows(train, length), val_batches)


def ptx_batch(windows: loader.TokenWindows, rows: int, seed) -> dict[str, np.ndarray]:
    """`rows` windows of text drawn by `seed` (for training, a function of the update alone, so a
    resumed run draws the same), under PPO-ptx's batch names."""
    drawn = [windows[int(i)] for i in np.random.default_rng(seed).integers(len(windows), size=rows)]
    return {f"ptx_{name}": np.stack([w[name] for w in drawn]) for name in ("inputs", "targets")}


@partial(jax.jit, static_argnames=("cfg",))
def _lm_loss(params, inputs, targets, *, cfg):
    return jnp.mean(token_nll(GPT(cfg).apply(params, inputs, deterministic=True, head="lm"), targets))


def evaluate_policy(cfg: RunConfig, policy_params, tokenizer: Tokenizer, text: PretrainingText | None
                    ) -> dict[str, float]:
    """Held-out gold score of the policy as PPO trains it, sampled at ppo.temperature and greedy,
    and its LM loss on held-out pretraining text (`val_pretrain_loss`) where the lineage has it."""
    record = policy_gold(cfg, policy_params, tokenizer, cfg.ppo.gold_prompts, cfg.ppo.max_new_tokens,
                         cfg.ppo.temperature)
    if text is not None and text.val_batches:
        losses = [_lm_loss(policy_params, b["ptx_inputs"], b["ptx_targets"], cfg=cfg.model) for b in text.val_batches]
        record["val_pretrain_loss"] = float(np.mean(losses))
    return record


def code_scores(function: Callable, spec: str, prompts: Prompts, tokenizer: Tokenizer, rows: np.ndarray,
                responses: np.ndarray) -> np.ndarray:
    """The user's reward function's scores of the sampled responses (`scorers.checked_scores`)."""
    texts = [decode_response(tokenizer, response)[0] for response in responses]
    return checked_scores(function, spec, [prompts.texts[row] for row in rows], texts)


def host_scorer(cfg: RunConfig, prompts: Prompts, tokenizer: Tokenizer) -> Callable | None:
    """`score_responses(rows, responses)` on the host for `ppo.reward` gold or python:..., loaded
    now so that a missing function stops the run before anything is written; None for a reward
    model run."""
    if cfg.ppo.reward == GOLD_REWARD:
        return partial(gold_scores, prompts, tokenizer)
    if cfg.ppo.reward.startswith(CODE_REWARD):
        return partial(code_scores, load_reward_function(cfg.ppo.reward), cfg.ppo.reward, prompts, tokenizer)
    return None


def gold_scores(prompts: Prompts, tokenizer: Tokenizer, rows: np.ndarray, responses: np.ndarray) -> np.ndarray:
    """The gold checker's score of each sampled response (task world prompts only)."""
    return np.array([world.gold_score(prompts.problems[row].instruction, decode_response(tokenizer, response)[0])
                     for row, response in zip(rows, responses)], np.float32)


def rollout_gold(prompts: Prompts, rows: np.ndarray, responses: np.ndarray, tokenizer: Tokenizer) -> dict:
    """Gold score of the sampled responses themselves (the samples the reward model scored)."""
    if prompts.problems is None:
        return {}
    return {"gold_score": float(np.mean(gold_scores(prompts, tokenizer, rows, responses)))}


class _Placement:
    """Where rollout inputs go: sharded over the mesh under `mesh` (every process holds the whole
    batch, see `Mesh.place_global`), on the first device otherwise."""

    def __init__(self, strategy):
        self.mesh = strategy.mesh if isinstance(strategy, Mesh) else None
        self.strategy = strategy

    def params(self, tree):
        """A frozen model's params: FSDP shards under `mesh`, whole on the first device otherwise."""
        return self.strategy.place_model(tree) if self.mesh else jax.device_put(tree, jax.local_devices()[0])

    def rows(self, tree):
        return self.strategy.place_global(tree) if self.mesh else jax.device_put(tree, jax.local_devices()[0])

    def context(self):
        return jax.set_mesh(self.mesh) if self.mesh else contextlib.nullcontext()


def rollout(cfg: RunConfig, params, frozen: dict, prompts: Prompts, rows: np.ndarray, beta: float, key,
            placement: "_Placement", *, end_ids: tuple[int, ...], pad_id: int, score_responses=None):
    """(sampled responses, train batch, stats, timings) of one iteration's prompts, on the host
    (whole on every process). `score_responses(rows, responses)`, if given, scores on the host
    instead of the reward model."""
    start = time.perf_counter()
    prompt, prompt_mask = placement.rows((prompts.tokens[rows], prompts.mask[rows]))
    response = jax.block_until_ready(generate(
        lora.merge_part(params, "policy", cfg.lora), prompt, prompt_mask, key, cfg=cfg.model,
        max_new_tokens=cfg.ppo.max_new_tokens, temperature=cfg.ppo.temperature, top_k=cfg.ppo.top_k,
        top_p=cfg.ppo.top_p, stop_ids=end_ids))
    generate_s = time.perf_counter() - start
    host_response = np.asarray(host_copy(response))
    scores = None if score_responses is None else placement.rows(score_responses(rows, host_response))
    batch, stats = experience(params, frozen["reference"], frozen["reward"], frozen["normalization"], prompt,
                              prompt_mask, response, jnp.float32(beta), scores, cfg=cfg, end_ids=end_ids,
                              pad_id=pad_id)
    batch, stats = jax.tree.map(np.asarray, host_copy((batch, stats)))
    timings = {"generate_s": generate_s, "experience_s": time.perf_counter() - start - generate_s,
               "generate_tokens_per_s": host_response.size / generate_s}
    return host_response, batch, {name: float(value) for name, value in stats.items()}, timings


def compile_rollout(cfg: RunConfig, params, frozen: dict, prompts: Prompts, placement: "_Placement", *,
                    end_ids: tuple[int, ...], pad_id: int, gold: bool) -> tuple[dict, dict[str, float]]:
    """Compile an iteration's generation and `experience` now, as the train step is: each one's
    memory per device is printed, and a rollout too big for the device is refused before the first
    iteration. The iterations' calls have the same shapes and placements, so they reuse both
    programs (`gold`: the scores come from the host, as with `ppo.reward=gold`).

    Returns the shapes of `experience`'s train batch (a ShapeDtypeStruct per name) and the two
    programs' peaks in MiB (empty where the backend reports none)."""
    rows = np.arange(rollouts_per_iteration(cfg)) % len(prompts.tokens)
    prompt, prompt_mask = placement.rows((prompts.tokens[rows], prompts.mask[rows]))
    scores = placement.rows(np.zeros(len(rows), np.float32)) if gold else None
    key = jax.random.PRNGKey(0)  # made outside the mesh context, like the iterations' keys
    advice = "lower train.batch_size or ppo.max_new_tokens"
    with placement.context():
        generation = generate.lower(
            lora.merge_part(params, "policy", cfg.lora), prompt, prompt_mask, key, cfg=cfg.model,
            max_new_tokens=cfg.ppo.max_new_tokens, temperature=cfg.ppo.temperature, top_k=cfg.ppo.top_k,
            top_p=cfg.ppo.top_p, stop_ids=end_ids).compile()
        response = jax.ShapeDtypeStruct(generation.out_info.shape, generation.out_info.dtype,
                                        sharding=generation.out_info.sharding)
        scoring = experience.lower(
            params, frozen["reference"], frozen["reward"], frozen["normalization"], prompt, prompt_mask, response,
            jnp.float32(0.0), scores, cfg=cfg, end_ids=end_ids, pad_id=pad_id).compile()
    peaks = {}
    for name, compiled in (("generate", generation), ("experience", scoring)):
        peaks |= peak_record(f"{name}_memory_mib", report_memory(compiled, f"rollout {name}", advice))
    train_batch, _ = scoring.out_info
    return train_batch, peaks


def packed_width(cfg: RunConfig, prompts: Prompts) -> int:
    """The length of a packed row: room for two of the longest sequences (prompt width plus
    `max_new_tokens`), rounded up to a multiple of 64, at most `model.context_len` (a pretrained
    model's context, thousands of tokens, would make each row's attention needlessly long)."""
    return fitted_seq_len(2 * (prompts.tokens.shape[1] + cfg.ppo.max_new_tokens - 1), cfg.model.context_len)


def packed_rows(cfg: RunConfig, prompts: Prompts, minibatch_rows: int, divisor: int) -> int:
    """Rows of `packed_width` tokens a packed minibatch gets (`ppo.pack_rows`; 0 when packing
    is off or would not compute fewer tokens than the unpacked minibatch), a multiple of `divisor`.
    By default: room for the minibatch's prompts (at their mean length) plus half of
    `max_new_tokens` each, and one row more for the slack of packing whole sequences."""
    if cfg.ppo.pack_rows < 0:
        return 0
    width = packed_width(cfg, prompts)
    rows = cfg.ppo.pack_rows
    if rows == 0:
        expected_len = prompts.mask.sum(axis=1).mean() + cfg.ppo.max_new_tokens / 2
        rows = math.ceil(minibatch_rows * expected_len / width) + 1
    rows = -(-rows // divisor) * divisor
    unpacked_tokens = minibatch_rows * (prompts.tokens.shape[1] + cfg.ppo.max_new_tokens - 1)
    return rows if rows * width < unpacked_tokens else 0


def pack_minibatch(minibatch: dict[str, np.ndarray], rows: int, width: int) -> dict[str, np.ndarray] | None:
    """The minibatch's sequences (each row's real tokens, where `segment_ids` > 0, contiguous) moved
    into `rows` rows of `width` tokens, several to a row (first fit, longest first), with segment
    ids 1, 2, ... within each row; None if they do not fit. Attention never crosses segments and
    every sequence keeps its positions, so each token's logits, values and loss terms are those of
    the unpacked minibatch; only padding is dropped."""
    real = minibatch["segment_ids"] > 0
    lengths = real.sum(axis=1)
    starts = np.argmax(real, axis=1)
    used, segments = np.zeros(rows, int), np.zeros(rows, int)
    packed = {name: np.zeros((rows, width), x.dtype) for name, x in minibatch.items()}
    for sequence in np.argsort(-lengths, kind="stable"):
        length = lengths[sequence]
        fitting = np.flatnonzero(used + length <= width)
        if len(fitting) == 0:
            return None
        row = fitting[0]
        source, target = slice(starts[sequence], starts[sequence] + length), slice(used[row], used[row] + length)
        for name, x in minibatch.items():
            packed[name][row, target] = x[sequence, source]
        segments[row] += 1
        packed["segment_ids"][row, target] = segments[row]
        used[row] += length
    return packed


class UpdateSteps(NamedTuple):
    """PPO's compiled train steps: on minibatches as the rollout left them, and (when packing is
    on) on minibatches packed into `packed_shape` = (rows, width)."""
    unpacked: Callable
    packed: Callable | None = None
    packed_shape: tuple[int, int] | None = None


def update_order(rows: int, group_size: int, seed) -> np.ndarray:
    """The rollout rows in one epoch's shuffled order, each prompt's group (adjacent rows) kept
    together, so that every minibatch holds whole groups."""
    groups = np.random.default_rng(seed).permutation(rows // group_size)
    return (groups[:, None] * group_size + np.arange(group_size)).reshape(-1)


def ppo_updates(state, batches: list[dict], steps: UpdateSteps, strategy, cfg: RunConfig, iteration: int, keys,
                minibatch_rows: int, population: population_lib.Population, text: PretrainingText | None = None):
    """`ppo.epochs` passes over `ppo.minibatches` shuffled minibatches of each replica's rollout
    batch (`batches`, one per replica; whole on every process, so the minibatches do not depend on
    the number of processes), one train step each, every replica in its own order: `steps.packed`
    on the minibatches packed (`pack_minibatch`) where every replica's fits, else
    `steps.unpacked`; with ppo.ptx_coef > 0 each minibatch also carries `minibatch_rows` windows of
    pretraining `text`. Returns the state and each replica's updates' metrics as one record
    (`metrics.summary`), with the share of updates that ran packed."""
    updates, packed_updates = [], 0
    for epoch in range(cfg.ppo.epochs):
        orders = [update_order(len(batch["inputs"]), cfg.ppo.group_size, [replica.order_seed, iteration, epoch])
                  for replica, batch in zip(population.replicas, batches)]
        for m in range(cfg.ppo.minibatches):
            minibatches = [{name: value[order[m * minibatch_rows : (m + 1) * minibatch_rows]]
                            for name, value in batch.items()} for order, batch in zip(orders, batches)]
            step_fn = steps.unpacked
            if steps.packed is not None:
                packed = [pack_minibatch(minibatch, *steps.packed_shape) for minibatch in minibatches]
                if all(minibatch is not None for minibatch in packed):
                    minibatches, step_fn, packed_updates = packed, steps.packed, packed_updates + 1
            if cfg.ppo.ptx_coef > 0:
                minibatches = [minibatch | ptx_batch(text.train, minibatch_rows,
                                                     [replica.order_seed, iteration, len(updates)])
                               for replica, minibatch in zip(population.replicas, minibatches)]
            state, metrics = step_fn(state, strategy.place_global(population.stack(minibatches)),
                                     population.keys(keys, len(updates) + 1))
            updates.append(metrics)
    records = population.summaries([strategy.metrics_to_host(metrics) for metrics in updates])
    return state, [record | {"packed_updates": packed_updates / len(updates)} for record in records]


def rl_objective(cfg: RunConfig, **coefficients):
    """The objective of `ppo.algorithm`: PPO's (policy and value), or the critic-free one (GRPO
    with its KL term in the loss; RLOO, whose KL is in the reward); with the pretraining LM term
    of PPO-ptx when ppo.ptx_coef > 0; on a LoRA tree's adapters with lora.rank > 0. `coefficients`
    (`clip_ratio`, `entropy_coef`: a population replica's, traced) replace the config's."""
    ppo = cfg.ppo
    apply_fn = GPT(cfg.model).apply
    shared = dict(clip_ratio=ppo.clip_ratio, entropy_coef=ppo.entropy_coef, temperature=ppo.temperature) | coefficients
    if ppo.has_value_model:
        objective = make_ppo_objective(apply_fn, clip_value=ppo.clip_value, value_coef=ppo.value_coef, **shared)
    else:
        objective = make_critic_free_objective(apply_fn, kl_coef=ppo.kl_coef if ppo.algorithm == "grpo" else 0.0,
                                               **shared)
    objective = make_ptx_objective(objective, apply_fn, ppo.ptx_coef) if ppo.ptx_coef > 0 else objective
    return lora.objective(objective, cfg.lora)


def frozen_models(cfg: RunConfig, placement: "_Placement", sft_params, reward_params, normalization) -> dict:
    """One replica's frozen models in its rollout: the reference (the SFT policy) and the reward
    model with its normalisation (None for host scores). With lora.rank > 0 the reference is the
    policy's base in the train state, and so is the reward model where it is the value model's
    base (None here: `experience` reads them there), so neither is held twice."""
    shared = cfg.lora.rank > 0
    frozen = {"reference": None if shared else placement.params(sft_params), "reward": None, "normalization": None}
    if reward_params is not None:
        frozen |= {"reward": None if shared and cfg.ppo.has_value_model else placement.params(reward_params),
                   "normalization": {name: jnp.float32(value) for name, value in normalization.items()}}
    return frozen


def ppo(cfg: RunConfig, run_dir: str | os.PathLike) -> dict:
    """Stage 3: PPO on the policy of `ppo.policy` against the reward model of `ppo.reward`.
    Returns the final metrics (the last iteration's record merged with the last evaluation).

    A population (`population.Population`) samples each replica's rollouts in turn with the
    rollout programs of one replica (its prompts, key and beta), then updates every replica in one
    mapped train step per minibatch (`Population.map_step`)."""
    run_dir = epath.Path(run_dir)
    population_lib.check(cfg, "ppo")
    check_algorithm(cfg)
    cfg, tokenizer, sft_params, value_params, reward_params, normalization = load_models(cfg)
    prompts = load_prompts(cfg, tokenizer)
    score_responses = host_scorer(cfg, prompts, tokenizer)
    population = population_lib.Population(cfg)
    strategy = make_strategy(cfg.train, population.strategy_size)
    minibatch_rows = check_batches(cfg, strategy.batch_divisor * jax.process_count())
    text = load_pretraining_text(cfg, tokenizer)
    init_fn = make_ppo_init_fn(cfg, sft_params, value_params)
    abstract_state = jax.eval_shape(init_fn)  # before anything is written: it checks the lora.* settings
    cfg, _ = open_run(cfg, run_dir, tokenizer.save)

    checkpointer = Checkpointer(run_dir / "checkpoints", keep=cfg.train.keep_checkpoints)
    if checkpointer.latest_step() is not None:
        state, progress = checkpointer.restore(restore_target(abstract_state, strategy))
        iteration, betas = int(progress["iteration"]), [float(b) for b in population.read_result(progress["beta"])]
        state = strategy.place_state(state)
    else:
        state, iteration = strategy.compile_init(init_fn, abstract_state)(), 0
        betas = [dict(replica.values).get("ppo.kl_coef", cfg.ppo.kl_coef) for replica in population.replicas]
    placement = _Placement(strategy)
    # Each replica's; the same arrays for all where the policy and reward runs are no population.
    frozen = [frozen_models(cfg, placement, sft_params(index), reward_params and reward_params(index),
                            normalization and normalization(index)) for index in range(population.size)]
    # The loaded models live on only where the state or `frozen` holds them (with LoRA, nowhere else).
    del init_fn, sft_params, value_params, reward_params
    end_ids = stop_ids(tokenizer)

    def replica_params():
        """Each replica's parameters (on the device), for its rollout."""
        return [params for _, params in population.split(strategy.state_to_host(state).params)]

    train_batch, rollout_memory = compile_rollout(
        cfg, replica_params()[0], frozen[0], prompts, placement, end_ids=end_ids, pad_id=tokenizer.pad_id,
        gold=score_responses is not None)

    def replica_step(values: dict):
        values = dict(values)
        optimizer = make_ppo_optimizer(cfg, values.pop("lr_scale", None))
        return make_train_step(rl_objective(cfg, **values), optimizer, strategy.reduce, cfg.optim.grad_accum)

    train_step = population.map_step(replica_step)
    base_rng = to_host(strategy.state_to_host(state).rng)

    def compile_update(rows: int, width: int, program: str):
        example = {name: np.zeros((rows, width), x.dtype) for name, x in train_batch.items()}
        if cfg.ppo.ptx_coef > 0:
            example |= ptx_batch(text.train, minibatch_rows, [0])
        return compile_step(strategy, train_step, abstract_state,
                            example=(state, strategy.place_global(population.stack_like(example)),
                                     population.keys(base_rng, 0)),
                            program=program, advice=population.memory_advice)

    unpacked_step, memory = compile_update(minibatch_rows, train_batch["inputs"].shape[1], "train step")
    steps = UpdateSteps(unpacked_step)
    pack_rows = packed_rows(cfg, prompts, minibatch_rows, strategy.batch_divisor * jax.process_count() * cfg.optim.grad_accum)
    if pack_rows:
        width = packed_width(cfg, prompts)
        packed_step, _ = compile_update(pack_rows, width, "train step on packed minibatches")
        steps = UpdateSteps(unpacked_step, packed_step, (pack_rows, width))

    def evaluations() -> list[dict]:
        """Each replica's policy evaluated (`evaluate_policy`), whole on every process (a
        collective: all processes evaluate)."""
        policies = host_copy(population.map(partial(lora.merge_part, name="policy", cfg=cfg.lora))(
            strategy.state_to_host(state).params))
        return [evaluate_policy(cfg, policy, tokenizer, text) for _, policy in population.split(policies)]

    writer = rundir.MetricsWriter(run_dir, iteration)
    if iteration == 0:
        models = jax.eval_shape(population.map(partial(lora.merge, cfg=cfg.lora)), abstract_state.params)
        writer.write({"step": 0, "n_params": count_params(models) // population.size,
                      "n_trainable_params": count_params(lora.trainable(abstract_state.params, cfg.lora))
                      // population.size,
                      **({"replicas": population.size} if population.stacked else {}),
                      "prompts": len(prompts.tokens), "prompt_len": prompts.tokens.shape[1], "packed_rows": pack_rows,
                      "packed_width": packed_width(cfg, prompts),
                      **peak_record("step_memory_mib", memory), **rollout_memory})
        writer.write_all(population.log(0, evaluations()))
    show = cfg.train.progress and jax.process_index() == 0
    bar = tqdm(total=cfg.train.max_steps, initial=iteration, disable=not show, dynamic_ncols=True)

    def save():
        checkpointer.save(iteration, strategy.state_to_host(state),
                          {"iteration": iteration, "beta": population.result_file(betas)})
        writer.flush()

    try:  # closed on preemption too, so the log and TensorBoard get every record
        with PreemptionGuard() as guard:
            while iteration < cfg.train.max_steps:
                keys = population.keys(base_rng, iteration)
                rollouts = []
                for (replica, key), params, beta, models in zip(population.split(keys), replica_params(), betas, frozen):
                    rows = np.repeat(prompt_rows(len(prompts.tokens), cfg.train.batch_size, iteration,
                                                 replica.order_seed), cfg.ppo.group_size)
                    with placement.context():
                        response, batch, stats, timings = rollout(
                            cfg, params, models, prompts, rows, beta, key, placement, end_ids=end_ids,
                            pad_id=tokenizer.pad_id, score_responses=score_responses)
                    rollouts.append((rows, response, batch, stats, timings))
                start = time.perf_counter()
                state, updates = ppo_updates(state, [batch for _, _, batch, _, _ in rollouts], steps, strategy, cfg,
                                             iteration, keys, minibatch_rows, population, text)
                iteration += 1
                train_s = time.perf_counter() - start
                per_replica = [{**stats, "beta": beta, **rollout_gold(prompts, rows, response, tokenizer), **update,
                                **timings, "train_s": train_s, "host_peak_mib": host_peak_mib()}
                               for (rows, response, _, stats, timings), beta, update in zip(rollouts, betas, updates)]
                if cfg.ppo.kl_target > 0:
                    betas = [adaptive_kl_update(beta, record["kl"], cfg.ppo.kl_target, cfg.ppo.kl_horizon,
                                                rollouts_per_iteration(cfg))
                             for beta, record in zip(betas, per_replica)]
                shown = writer.write_all(population.log(iteration, per_replica))
                bar.update(1)
                bar.set_postfix(score=f"{shown['score']:.3f}", kl=f"{shown['kl']:.3f}")
                if iteration % cfg.train.eval_every == 0 or iteration == cfg.train.max_steps:
                    evaluated = evaluations()
                    if evaluated[0]:
                        shown = writer.write_all(population.log(iteration, evaluated))
                    if "val_gold_score" in evaluated[0] and jax.process_index() == 0:
                        bar.write(f"iteration {iteration}: held-out gold {100 * shown['val_gold_score']:.1f}/100")
                saved = iteration % cfg.train.ckpt_every == 0 or iteration == cfg.train.max_steps
                if saved:
                    save()
                if iteration < cfg.train.max_steps and guard.requested:
                    if not saved:
                        save()
                    checkpointer.wait()
                    raise Preempted(iteration, str(checkpointer.manager.directory))
        checkpointer.wait()
    finally:
        writer.close()
    checkpointer.close()
    bar.close()
    return final_record(run_dir)
