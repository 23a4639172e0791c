"""The GPT module: KV-cache decoding vs the full forward pass, padding, packing, heads, dtypes, remat."""

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_trees_close, cases, init, random_tokens, tiny_model

from genai_jax.model import GPT, init_cache
from genai_jax.objectives.lm import token_nll

ARCHITECTURES = {
    "learned-layernorm-gelu": dict(positions="learned", norm="layernorm", mlp="gelu"),
    "rope-rmsnorm-swiglu-bias-untied": dict(
        positions="rope", norm="rmsnorm", mlp="swiglu", bias=True, tie_embeddings=False
    ),
    "gqa-qkv-bias-exact-gelu": dict(
        positions="rope", n_kv_head=1, qkv_bias=True, rope_theta=1e6, norm_eps=1e-6, gelu_approximate=False,
        mlp_hidden=24,
    ),
}


@pytest.fixture(params=cases("rope-rmsnorm-swiglu-bias-untied", **{name: name for name in ARCHITECTURES}))
def model(request):
    """(cfg, params) of a tiny model of each architecture."""
    cfg = tiny_model(**ARCHITECTURES[request.param])
    return cfg, init(cfg, seed=1)


@partial(jax.jit, static_argnums=0)
def apply_cached(cfg, params, tokens, cache, positions=None, token_mask=None):
    return GPT(cfg).apply(params, tokens, positions=positions, token_mask=token_mask, cache=cache)


def test_kv_cache_matches_full_forward_token_by_token(model):
    cfg, params = model
    tokens = random_tokens((2, cfg.context_len), seed=2)
    full = np.asarray(GPT(cfg).apply(params, tokens))
    prompt_len = 5

    cache = init_cache(cfg, batch_size=2, max_len=cfg.context_len)
    logits, cache = apply_cached(cfg, params, tokens[:, :prompt_len], cache)
    np.testing.assert_allclose(logits, full[:, :prompt_len], atol=1e-5)
    for t in range(prompt_len, cfg.context_len):
        logits, cache = apply_cached(cfg, params, tokens[:, t : t + 1], cache)
        np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5, err_msg=f"position {t}")
    assert int(cache["index"]) == cfg.context_len


def test_left_padded_prompt_matches_unpadded(model):
    cfg, params = model
    prompt = random_tokens((1, 6), seed=3)
    continuation = random_tokens((1, 3), seed=4)
    pad = 4
    # Padding slots hold arbitrary tokens: the mask, not the pad id, must hide them.
    padded = np.concatenate([random_tokens((1, pad), seed=5), prompt], axis=1)

    def decode(prompt_tokens, mask):
        """Logits after the prompt, then after each continuation token fed through the cache."""
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        cache = init_cache(cfg, 1, prompt_tokens.shape[1] + continuation.shape[1])
        logits, cache = apply_cached(cfg, params, prompt_tokens, cache, positions, mask)
        outs, position = [logits[:, -1]], positions[:, -1:]
        for i in range(continuation.shape[1]):
            position = position + 1
            logits, cache = apply_cached(cfg, params, continuation[:, i : i + 1], cache, position)
            outs.append(logits[:, 0])
        return np.stack(outs)

    unpadded = decode(prompt, np.ones(prompt.shape, bool))
    with_padding = decode(padded, np.arange(padded.shape[1])[None] >= pad)
    np.testing.assert_allclose(with_padding, unpadded, atol=1e-5)


def test_packed_segments_match_separate_sequences(model):
    cfg, params = model
    first, second = random_tokens((1, 6), seed=6), random_tokens((1, 10), seed=7)
    packed = np.concatenate([first, second], axis=1)
    segment_ids = np.array([[0] * 6 + [1] * 10])
    positions = np.array([list(range(6)) + list(range(10))])

    logits = np.asarray(GPT(cfg).apply(params, packed, positions=positions, segment_ids=segment_ids))
    np.testing.assert_allclose(logits[:, :6], GPT(cfg).apply(params, first), atol=1e-5)
    np.testing.assert_allclose(logits[:, 6:], GPT(cfg).apply(params, second), atol=1e-5)


def test_scalar_head_gives_one_value_per_position():
    cfg = tiny_model()
    params = init(cfg, head="scalar")
    tokens = random_tokens((3, 7))
    values = GPT(cfg).apply(params, tokens, head="scalar")
    assert values.shape == (3, 7)
    assert values.dtype == jnp.float32
    assert np.all(np.isfinite(values)) and np.std(values) > 0


def test_bfloat16_compute_keeps_float32_params_and_close_logits():
    cfg32 = tiny_model()
    cfg16 = tiny_model(dtype="bfloat16")
    params = init(cfg16)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    assert_trees_close(params, init(cfg32), rtol=0, atol=0)

    tokens = random_tokens((2, cfg32.context_len))
    logits16 = GPT(cfg16).apply(params, tokens)
    logits32 = np.asarray(GPT(cfg32).apply(params, tokens))
    assert logits16.dtype == jnp.bfloat16
    scale = np.abs(logits32).max()
    np.testing.assert_allclose(np.asarray(logits16, np.float32), logits32, atol=0.01 * scale)


@pytest.mark.parametrize("remat", cases("dots", full="full", dots="dots"))
def test_remat_gives_same_loss_and_grads(remat):
    tokens = random_tokens((2, 17))

    def loss_and_grads(cfg, params):
        def loss(p):
            return jnp.mean(token_nll(GPT(cfg).apply(p, tokens[:, :-1]), tokens[:, 1:]))

        return jax.jit(jax.value_and_grad(loss))(params)

    params = init(tiny_model())
    loss, grads = loss_and_grads(tiny_model(), params)
    loss_remat, grads_remat = loss_and_grads(tiny_model(remat=remat), params)
    np.testing.assert_allclose(loss_remat, loss, rtol=1e-6)
    assert_trees_close(grads_remat, grads)


def test_sequence_longer_than_context_raises():
    cfg = tiny_model()
    params = init(cfg)
    with pytest.raises(ValueError, match="context_len"):
        GPT(cfg).apply(params, random_tokens((1, cfg.context_len + 1)))


def test_einsum_attention_matches_dot_product_attention(model):
    """The CPU einsum path and `jax.nn.dot_product_attention` (XLA) agree under every mask kind:
    causal, packed segments, and a left-padded prompt in the cache."""
    cfg, params = model
    einsum, xla = dataclasses.replace(cfg, attention="einsum"), dataclasses.replace(cfg, attention="xla")
    tokens = random_tokens((2, cfg.context_len), seed=8)
    segment_ids = np.repeat([[0, 1]], cfg.context_len // 2, axis=1).repeat(2, axis=0)
    mask = np.arange(cfg.context_len)[None] >= np.array([[0], [5]])
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)

    def outputs(c):
        cache = init_cache(c, 2, cfg.context_len)
        return [
            GPT(c).apply(params, tokens),
            GPT(c).apply(params, tokens, segment_ids=segment_ids),
            apply_cached(c, params, tokens, cache, positions, mask)[0][mask],
        ]

    for got, expected in zip(outputs(einsum), outputs(xla)):
        np.testing.assert_allclose(got, expected, atol=1e-5)
