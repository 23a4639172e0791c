"""Jit-compiled generation with a KV cache: prefill the prompt once, then one token per step.

Prompts are left-padded to a common length (`prompt_mask` marks real tokens); positions count
real tokens only, so padding changes nothing. Temperature, top-k and top-p shape the sampled
distribution; temperature 0 is greedy decoding.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from genai_jax.config import ModelConfig, UserError
from genai_jax.model import GPT, init_cache


def filter_logits(logits: jax.Array, top_k: int, top_p: jax.Array) -> jax.Array:
    """Keep the `top_k` largest logits (0: all) and the smallest set whose probability reaches
    `top_p` (1: all); the rest become -inf."""
    if top_k > 0:
        kth_largest = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.where(mass_before < top_p, sorted_logits, jnp.inf)
    threshold = jnp.min(kept, axis=-1, keepdims=True)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def sample_token(logits: jax.Array, rng: jax.Array, temperature: jax.Array, top_k: int, top_p: jax.Array):
    """Next token ids [B] from logits [B, V]; temperature <= 0 means argmax."""
    logits = logits.astype(jnp.float32)
    tempered = logits / jnp.maximum(temperature, 1e-6)
    sampled = jax.random.categorical(rng, filter_logits(tempered, top_k, top_p), axis=-1)
    return jnp.where(temperature > 0, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


def is_stop(tokens: jax.Array, stop_ids: tuple[int, ...]) -> jax.Array:
    """True where a token is one of `stop_ids` (a chat model's turn may end on several tokens)."""
    return jnp.isin(tokens, jnp.asarray(stop_ids, jnp.int32))


@partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "top_k", "with_logprobs", "stop_ids"))
def generate(params, prompt, prompt_mask, rng, *, cfg: ModelConfig, max_new_tokens: int, temperature=1.0,
             top_k: int = 0, top_p=1.0, with_logprobs: bool = False, stop_ids: tuple[int, ...] | None = None):
    """New tokens [B, max_new_tokens] after left-padded prompts [B, P]; with `with_logprobs`, also
    each token's log-probability under softmax(logits / temperature) (before top-k/top-p).

    With `stop_ids` (end of turn), decoding stops as soon as every row has emitted one: each row's
    tokens up to its first stop token are those of a run without them (the same key per step), and
    the slots after the last row stopped hold `stop_ids[0]` (log-probability 0). Chat answers end
    long before the token limit, so this skips most of the steps.
    """
    model = GPT(cfg)
    batch, prompt_len = prompt.shape
    cache = init_cache(cfg, batch, prompt_len + max_new_tokens)
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0)
    logits, cache = model.apply(params, prompt, positions=positions, token_mask=prompt_mask, cache=cache)

    def step(carry, key):
        cache, logits, position = carry
        token = sample_token(logits, key, temperature, top_k, top_p)
        emitted = token
        if with_logprobs:  # only then: a log-softmax over the vocabulary at every step
            tempered = jax.nn.log_softmax(logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6), axis=-1)
            emitted = (token, jnp.take_along_axis(tempered, token[:, None], axis=-1)[:, 0])
        logits, cache = model.apply(params, token[:, None], positions=position[:, None], cache=cache)
        return (cache, logits[:, 0], position + 1), emitted

    keys = jax.random.split(rng, max_new_tokens)
    start = (cache, logits[:, -1], positions[:, -1] + 1)
    if stop_ids is None:
        _, emitted = jax.lax.scan(step, start, keys)
        return jax.tree.map(lambda x: x.T, emitted)

    def unfinished(loop):
        i, _, stopped, _ = loop
        return (i < max_new_tokens) & ~jnp.all(stopped)

    def decode_one(loop):
        i, carry, stopped, emitted = loop
        carry, new = step(carry, keys[i])
        token = new[0] if with_logprobs else new
        emitted = jax.tree.map(lambda slots, x: slots.at[i].set(x), emitted, new)
        return i + 1, carry, stopped | is_stop(token, stop_ids), emitted

    slots = jnp.full((max_new_tokens, batch), stop_ids[0], jnp.int32)
    emitted = (slots, jnp.zeros((max_new_tokens, batch), jnp.float32)) if with_logprobs else slots
    loop = (jnp.int32(0), start, jnp.zeros(batch, bool), emitted)
    _, _, _, emitted = jax.lax.while_loop(unfinished, decode_one, loop)
    return jax.tree.map(lambda x: x.T, emitted)


def check_length(cfg: ModelConfig, prompt_len: int, max_new_tokens: int) -> None:
    if prompt_len + max_new_tokens > cfg.context_len:
        raise UserError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"context_len {cfg.context_len}"
        )
