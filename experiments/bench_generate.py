"""Generation speed: KV-cache decoding vs recomputing the full forward pass for every new token.

    python experiments/bench_generate.py --preset shakespeare-char --new-tokens 255

Both paths are jit-compiled whole (a `lax.scan` / `lax.fori_loop` over tokens) and greedy, so
they produce the same tokens (checked) and differ only in the work per token. With learned
positions the model sees at most context_len tokens: a 1-token prompt leaves context_len - 1 new
tokens. Weights are random: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from genai_jax.config import preset
from genai_jax.model import GPT, init_params
from genai_jax.sampling import generate


@partial(jax.jit, static_argnames=("cfg", "max_new_tokens"))
def generate_without_cache(params, prompt, *, cfg, max_new_tokens):
    """Greedy decoding that runs the whole (padded) sequence through the model for each token."""
    batch, prompt_len = prompt.shape
    total = prompt_len + max_new_tokens
    tokens = jnp.zeros((batch, total), jnp.int32).at[:, :prompt_len].set(prompt)

    def step(i, tokens):
        logits = GPT(cfg).apply(params, tokens)
        next_token = jnp.argmax(logits[:, prompt_len + i - 1], axis=-1).astype(jnp.int32)
        return tokens.at[:, prompt_len + i].set(next_token)

    return jax.lax.fori_loop(0, max_new_tokens, step, tokens)[:, prompt_len:]


def timed(fn, repeats: int) -> tuple[float, np.ndarray]:
    out = jax.block_until_ready(fn())  # compile
    start = time.perf_counter()
    for _ in range(repeats):
        out = jax.block_until_ready(fn())
    return (time.perf_counter() - start) / repeats, np.asarray(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="shakespeare-char")
    parser.add_argument("--new-tokens", type=int, default=255)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--vocab-size", type=int, default=65)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    cfg = preset(args.preset)
    model_cfg = dataclasses.replace(cfg.model, vocab_size=args.vocab_size, dropout=0.0)
    prompt_len = model_cfg.context_len - args.new_tokens
    params = init_params(model_cfg, jax.random.PRNGKey(0))
    prompt = np.random.default_rng(0).integers(0, args.vocab_size, (args.batch_size, prompt_len), dtype=np.int32)
    mask = np.ones_like(prompt, dtype=bool)

    cached_s, cached = timed(lambda: generate(params, prompt, mask, jax.random.PRNGKey(0), cfg=model_cfg,
                                              max_new_tokens=args.new_tokens, temperature=0.0), args.repeats)
    full_s, full = timed(lambda: generate_without_cache(params, prompt, cfg=model_cfg,
                                                        max_new_tokens=args.new_tokens), args.repeats)
    new = args.batch_size * args.new_tokens
    print(f"preset={args.preset} device={jax.devices()[0].device_kind} batch={args.batch_size} "
          f"prompt={prompt_len} new_tokens={args.new_tokens} same_tokens={bool((cached == full).all())}")
    print(f"kv_cache: {cached_s * 1000:.1f} ms ({new / cached_s:,.0f} tokens/s)")
    print(f"full_recompute: {full_s * 1000:.1f} ms ({new / full_s:,.0f} tokens/s)")
    print(f"speedup={full_s / cached_s:.1f}x")


if __name__ == "__main__":
    main()
