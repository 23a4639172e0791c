"""Answering conversations in batches, and the gold score of a policy on held-out world prompts."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np

from genai_jax import intervals
from genai_jax.config import RunConfig, UserError
from genai_jax.data import world
from genai_jax.sampling import generate
from genai_jax.tokenizer import Tokenizer, decode_response, encode_chat, stop_ids

_PROMPT_BUCKET = 8


def bucketed_len(length: int, limit: int) -> int:
    """`length` rounded up to a multiple of the prompt bucket (so that prompts of nearby lengths
    share one compilation), at most `limit`."""
    return min(-(-length // _PROMPT_BUCKET) * _PROMPT_BUCKET, limit)


@dataclass(frozen=True)
class Response:
    text: str
    ended: bool
    """Whether the model closed its turn with end-of-turn within the token limit."""
    num_tokens: int


def left_pad(prompts: list[np.ndarray], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts right-aligned in [N, length] rows, with the mask of real tokens."""
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), bool)
    for row, prompt in enumerate(prompts):
        tokens[row, length - len(prompt) :] = prompt
        mask[row, length - len(prompt) :] = True
    return tokens, mask


def respond(cfg: RunConfig, params, tokenizer: Tokenizer, chats: list[list[dict]], *, max_new_tokens: int = 64,
            temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
            batch_size: int = 64) -> list[Response]:
    """The assistant's next turn for each conversation, generated in fixed-shape batches (one
    compilation): prompts left-padded to a common bucketed length, new tokens capped by the context."""
    prompts = [encode_chat(tokenizer, chat, generation_prompt=True)[0] for chat in chats]
    longest = max(len(p) for p in prompts)
    prompt_len = bucketed_len(longest, cfg.model.context_len)
    new_tokens = min(max_new_tokens, cfg.model.context_len - prompt_len)
    if longest > cfg.model.context_len or new_tokens < 1:
        raise UserError(f"a prompt of {longest} tokens leaves no room to answer in context_len {cfg.model.context_len}")
    end_ids = stop_ids(tokenizer)
    responses = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        tokens, mask = left_pad(chunk + [chunk[0]] * (batch_size - len(chunk)), prompt_len, tokenizer.pad_id)
        generated = np.asarray(generate(
            params, tokens, mask, jax.random.PRNGKey(seed + start), cfg=cfg.model, max_new_tokens=new_tokens,
            temperature=temperature, top_k=top_k, top_p=top_p, stop_ids=end_ids,
        ))
        for row in generated[: len(chunk)]:
            text, ended = decode_response(tokenizer, row)
            length = int(np.argmax(np.isin(row, end_ids))) + 1 if ended else len(row)
            responses.append(Response(text, ended, length))
    return responses


def gold_eval(cfg: RunConfig, params, tokenizer: Tokenizer, num_prompts: int, **generation) -> dict:
    """Mean gold score (0-1), exact-answer share, response length and share ending with
    end-of-turn, on held-out problems of the synthetic world (never in any training data)."""
    problems = world.problems(cfg.data.seed + 3, num_prompts, held_out=True)
    chats = [world.chat(p)[:1] for p in problems]
    responses = respond(cfg, params, tokenizer, chats, **generation)
    scores = [world.gold_score(p.instruction, r.text) for p, r in zip(problems, responses)]
    return {
        "gold_score": float(np.mean(scores)),
        "exact": float(np.mean([s == 1.0 for s in scores])),
        "response_tokens": float(np.mean([r.num_tokens for r in responses])),
        "ended": float(np.mean([r.ended for r in responses])),
        "examples": [{"prompt": p.instruction, "response": r.text, "gold": s}
                     for p, r, s in list(zip(problems, responses, scores))[:5]],
    }


def policy_gold(cfg: RunConfig, params, tokenizer: Tokenizer, num_prompts: int, max_new_tokens: int,
                temperature: float, seed: int = 0) -> dict[str, float]:
    """A policy's held-out gold scores, sampled at `temperature` (`val_*`) and greedy
    (`val_greedy_*`), on the task world only (an empty record otherwise)."""
    if cfg.data.resolved_source != "world":
        return {}
    record = {}
    for prefix, temp in (("val_", temperature), ("val_greedy_", 0.0)):
        result = gold_eval(cfg, params, tokenizer, num_prompts, seed=seed, max_new_tokens=max_new_tokens,
                           temperature=temp)
        record |= {prefix + name: result[name] for name in ("gold_score", "exact", "ended", "response_tokens")}
    return record


def task_eval(cfg: RunConfig, params, tokenizer: Tokenizer, prompts: list[str], score, *, max_new_tokens: int,
              temperature: float = 1.0, seed: int = 0, batch_size: int = 64) -> tuple[dict, list[dict]]:
    """(summary, one record per prompt) of a policy on a user's task: each prompt answered greedily
    and sampled at `temperature`, each answer scored by `score(prompts, responses) -> [N]` (a
    user's reward function or a reward model), and per mode the mean with its 95% t interval over
    the prompts (`intervals.summarize`), the share of answers that ended their turn and their
    length. The records hold every prompt's answers and scores."""
    chats = [[{"role": "user", "content": prompt}] for prompt in prompts]
    summary, records = {"prompts": len(prompts)}, [{"prompt": prompt} for prompt in prompts]
    for mode, temp in (("greedy", 0.0), ("sampled", temperature)):
        responses = respond(cfg, params, tokenizer, chats, max_new_tokens=max_new_tokens, temperature=temp,
                            seed=seed, batch_size=batch_size)
        scores = np.asarray(score(prompts, [r.text for r in responses]), np.float64)
        stat = intervals.summarize(scores.tolist())
        summary[mode] = {"mean": stat.mean, "ci95": [stat.low, stat.high], "temperature": temp,
                         "ended": float(np.mean([r.ended for r in responses])),
                         "response_tokens": float(np.mean([r.num_tokens for r in responses]))}
        for record, response, value in zip(records, responses, scores):
            record[mode] = {"response": response.text, "score": float(value), "ended": response.ended}
    return summary, records
