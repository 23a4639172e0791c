"""A decoder-only transformer (GPT) as a Flax Linen module.

One set of weights serves three uses:
- the training forward pass: `model.apply(params, tokens)` -> logits;
- decoding with a KV cache: `model.apply(params, tokens, cache=cache)` -> (logits, new_cache),
  where the cache is a plain pytree made by `init_cache` and threaded through by the caller;
- a scalar head (`head="scalar"`): one number per position, for reward and value models.

Parameters are float32; `ModelConfig.dtype` sets the compute dtype. This module imports nothing
from training.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from genai_jax.config import ModelConfig

Head = Literal["lm", "scalar", "hidden"]


def compute_dtype(cfg: ModelConfig):
    return jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32


def _attention_impl(cfg: ModelConfig) -> str:
    """auto: cuDNN flash attention on a GPU in half precision, plain einsums elsewhere."""
    if cfg.attention != "auto":
        return cfg.attention
    on_gpu = jax.default_backend() == "gpu"
    return "cudnn" if on_gpu and cfg.dtype == "bfloat16" else "einsum"


def einsum_attention(q, k, v, mask):
    """Softmax attention of q [B, T, H, D] over k, v [B, S, H, D] with plain 4-D einsums, softmax
    in float32. The same math as `jax.nn.dot_product_attention`'s XLA path, whose grouped 5-D
    einsums run about 2x slower forward and backward on XLA:CPU."""
    scores = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(q.shape[-1])
    if mask is None:
        mask = jnp.tril(jnp.ones(scores.shape[-2:], bool))
    probs = jax.nn.softmax(jnp.where(mask, scores, -1e30), axis=-1).astype(v.dtype)
    return jnp.einsum("bhts,bshd->bthd", probs, v)


def mlp_hidden(cfg: ModelConfig) -> int:
    """The MLP's hidden width: `mlp_hidden` when set; else mlp_ratio * d_model for GELU, and for
    SwiGLU 2/3 of that, rounded up to 8, so both have the same parameter count."""
    if cfg.mlp_hidden:
        return cfg.mlp_hidden
    if cfg.mlp == "swiglu":
        return int(math.ceil(2 * cfg.mlp_ratio * cfg.d_model / 3 / 8)) * 8
    return cfg.mlp_ratio * cfg.d_model


def rotate(x: jax.Array, positions: jax.Array, theta: float = 10000.0) -> jax.Array:
    """Rotary position embedding of x [B, T, H, D] at integer positions [B, T], in the
    half-rotation layout (Hugging Face Llama's `rotate_half`): dimension i pairs with i + D/2."""
    half = x.shape[-1] // 2
    freqs = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
    angles = positions.astype(jnp.float32)[:, :, None, None] * freqs
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int) -> dict[str, jax.Array]:
    """An empty KV cache for `max_len` positions: keys and values (one array per layer, so each
    updates in place), which slots hold real tokens (left padding stays invalid), and the next
    slot to write. Grouped-query attention caches only its key/value heads."""
    shape = (batch_size, max_len, cfg.kv_heads, cfg.head_dim)
    return {
        "k": tuple(jnp.zeros(shape, compute_dtype(cfg)) for _ in range(cfg.n_layer)),
        "v": tuple(jnp.zeros(shape, compute_dtype(cfg)) for _ in range(cfg.n_layer)),
        "valid": jnp.zeros((batch_size, max_len), bool),
        "index": jnp.zeros((), jnp.int32),
    }


def _dense(cfg: ModelConfig, features: int, name: str, std: float | None = None,
           bias: bool | None = None) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=cfg.bias if bias is None else bias,
        dtype=compute_dtype(cfg),
        param_dtype=jnp.float32,
        kernel_init=nn.initializers.normal(cfg.init_std if std is None else std),
        name=name,
    )


def _norm(cfg: ModelConfig, name: str) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(epsilon=cfg.norm_eps, dtype=compute_dtype(cfg), name=name)
    return nn.LayerNorm(epsilon=cfg.norm_eps, use_bias=cfg.bias, dtype=compute_dtype(cfg), name=name)


def _residual_std(cfg: ModelConfig) -> float:
    """GPT-2's scaled init for projections that write into the residual stream."""
    return cfg.init_std / math.sqrt(2 * cfg.n_layer)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, mask, layer_cache=None):
        """x [B * T, C] (rows flattened, see GPT), positions [B, T]. One fused projection gives
        the query heads, then the key heads, then the value heads."""
        cfg = self.cfg
        batch, length = positions.shape
        heads, kv_heads = cfg.n_head, cfg.kv_heads
        qkv = _dense(cfg, (heads + 2 * kv_heads) * cfg.head_dim, "qkv", bias=cfg.bias or cfg.qkv_bias)(x)
        qkv = qkv.reshape(batch, length, heads + 2 * kv_heads, cfg.head_dim)
        q, k, v = jnp.split(qkv, [heads, heads + kv_heads], axis=2)
        if cfg.positions == "rope":
            q, k = rotate(q, positions, cfg.rope_theta), rotate(k, positions, cfg.rope_theta)
        new_cache = None
        if layer_cache is not None:
            cached_k, cached_v, index = layer_cache
            k = jax.lax.dynamic_update_slice(cached_k, k.astype(cached_k.dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(cached_v, v.astype(cached_v.dtype), (0, index, 0, 0))
            new_cache = (k, v)
        implementation = _attention_impl(cfg)
        if implementation == "einsum":
            # query head h reads key/value head h // group, as jax.nn.dot_product_attention does
            group = heads // kv_heads
            out = einsum_attention(q, jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2), mask)
        else:
            out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=mask is None,
                                               implementation=implementation)
        out = _dense(cfg, cfg.d_model, "proj", std=_residual_std(cfg))(out.reshape(batch * length, -1))
        return out, new_cache


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        hidden = mlp_hidden(cfg)
        if cfg.mlp == "swiglu":
            gate, up = jnp.split(_dense(cfg, 2 * hidden, "fc")(x), 2, axis=-1)
            x = nn.silu(gate) * up
        else:
            x = nn.gelu(_dense(cfg, hidden, "fc")(x), approximate=cfg.gelu_approximate)
        return _dense(cfg, cfg.d_model, "proj", std=_residual_std(cfg))(x)


class Block(nn.Module):
    cfg: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, positions, mask, layer_cache=None):
        drop = nn.Dropout(self.cfg.dropout, deterministic=self.deterministic)
        attn_out, new_cache = Attention(self.cfg, name="attn")(_norm(self.cfg, "ln_1")(x), positions, mask, layer_cache)
        x = x + drop(attn_out)
        x = x + drop(MLP(self.cfg, name="mlp")(_norm(self.cfg, "ln_2")(x)))
        return x, new_cache


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _attention_mask(length: int, segment_ids, cache) -> jax.Array | None:
    """None for plain causal attention (lets cuDNN use its causal kernel); else a [B, 1, T, S] mask.

    With segment ids (packed rows) a token sees earlier tokens of its own segment only. With a
    cache, query t sits at slot index + t and sees the valid slots up to it.
    """
    if cache is not None:
        slots = jnp.arange(cache["valid"].shape[1])
        query_slots = cache["index"] + jnp.arange(length)
        causal = slots[None, :] <= query_slots[:, None]
        return causal[None, None] & cache["valid"][:, None, None, :]
    if segment_ids is not None:
        causal = jnp.tril(jnp.ones((length, length), bool))
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
        return (causal[None] & same)[:, None]
    return None


class GPT(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        token_mask: jax.Array | None = None,
        cache: dict[str, jax.Array] | None = None,
        deterministic: bool = True,
        head: Head = "lm",
    ) -> Any:
        """tokens [B, T] -> logits [B, T, V] (head="lm"), values [B, T] ("scalar") or hidden states.

        positions: [B, T] integer positions (default 0..T-1, or from the cache's index on).
        segment_ids: [B, T] ids of packed sequences; attention never crosses them.
        token_mask: [B, T] which tokens are real (decode only: marks left padding).
        cache: from `init_cache`; when given, returns (output, new_cache).
        """
        cfg = self.cfg
        batch, length = tokens.shape
        if length > cfg.context_len and cache is None:
            raise ValueError(f"sequence of {length} tokens is longer than the model's context_len {cfg.context_len}")
        if positions is None:
            start = 0 if cache is None else cache["index"]
            positions = jnp.broadcast_to(start + jnp.arange(length), (batch, length))

        wte = self.param("wte", nn.initializers.normal(cfg.init_std), (cfg.vocab_size, cfg.d_model), jnp.float32)
        x = jnp.take(wte, tokens, axis=0)
        if cfg.positions == "learned":
            wpe = self.param("wpe", nn.initializers.normal(cfg.init_std), (cfg.context_len, cfg.d_model), jnp.float32)
            x = x + jnp.take(wpe, positions, axis=0)
        x = nn.Dropout(cfg.dropout, deterministic=deterministic)(x.astype(compute_dtype(cfg)))
        # Blocks work on [B * T, C]: 2-D matmuls are markedly faster than 3-D ones on XLA:CPU,
        # and the same on accelerators.
        x = x.reshape(batch * length, cfg.d_model)

        new_cache = None
        if cache is not None:
            valid_new = jnp.ones((batch, length), bool) if token_mask is None else token_mask.astype(bool)
            valid = jax.lax.dynamic_update_slice(cache["valid"], valid_new, (0, cache["index"]))
            cache = dict(cache, valid=valid)
            new_cache = {"k": [], "v": []}
        mask = _attention_mask(length, segment_ids, cache)

        block_cls = Block
        if cfg.remat != "none" and cache is None:
            block_cls = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat])
        for i in range(cfg.n_layer):
            layer_cache = None if cache is None else (cache["k"][i], cache["v"][i], cache["index"])
            x, layer_new = block_cls(cfg, deterministic, name=f"h_{i}")(x, positions, mask, layer_cache)
            if layer_new is not None:
                new_cache["k"].append(layer_new[0])
                new_cache["v"].append(layer_new[1])
        x = _norm(cfg, "ln_f")(x)

        if head == "hidden":
            out = x
        elif head == "scalar":
            scalar_init = nn.initializers.normal(1.0 / math.sqrt(cfg.d_model + 1))
            out = nn.Dense(1, dtype=jnp.float32, kernel_init=scalar_init, name="scalar_head")(x)[..., 0]
        elif cfg.tie_embeddings:
            out = x @ wte.astype(x.dtype).T
        else:
            out = nn.Dense(cfg.vocab_size, use_bias=False, dtype=compute_dtype(cfg), name="lm_head",
                           kernel_init=nn.initializers.normal(cfg.init_std))(x)
        out = out.reshape(batch, length, *out.shape[1:])
        if cache is None:
            return out
        new_cache = {
            "k": tuple(new_cache["k"]),
            "v": tuple(new_cache["v"]),
            "valid": cache["valid"],
            "index": cache["index"] + length,
        }
        return out, new_cache


def init_params(cfg: ModelConfig, rng: jax.Array, head: Head | None = None):
    """Float32 parameters for `GPT(cfg)` with its head (`cfg.head` unless given), built from a
    dummy batch of one token row."""
    tokens = jnp.zeros((1, min(cfg.context_len, 8)), jnp.int32)
    return GPT(cfg).init(rng, tokens, head=head or cfg.head)


def with_scalar_head(params, cfg: ModelConfig, rng: jax.Array):
    """A language model's trunk with a new scalar head (reward and value models start so):
    the LM head, if untied, is dropped; the scalar head is initialised N(0, 1/sqrt(d + 1))."""
    trunk = {name: value for name, value in params["params"].items() if name != "lm_head"}
    head = init_params(cfg, rng, head="scalar")["params"]["scalar_head"]
    return {"params": trunk | {"scalar_head": head}}


def grow_vocab(params, vocab_size: int):
    """`params` with room for `vocab_size` tokens: new embedding rows (and, if untied, LM-head
    columns) set to the mean of the existing ones, so a new token starts as an average token and
    the model's distribution over the old ones barely moves (Hewitt 2021, "Initializing new word
    embeddings for pretrained language models")."""
    inner = dict(params["params"])
    wte = inner["wte"]
    inner["wte"] = jnp.concatenate([wte, jnp.broadcast_to(wte.mean(0), (vocab_size - len(wte), wte.shape[1]))])
    if "lm_head" in inner:
        kernel = inner["lm_head"]["kernel"]
        extra = jnp.broadcast_to(kernel.mean(1, keepdims=True), (kernel.shape[0], vocab_size - kernel.shape[1]))
        inner["lm_head"] = {"kernel": jnp.concatenate([kernel, extra], axis=1)}
    return {"params": inner}


def count_params(params, embeddings: bool = True) -> int:
    """Parameter count; `embeddings=False` leaves out token and position embeddings (for MFU)."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    total = 0
    for path, leaf in flat:
        names = {getattr(k, "key", None) for k in path}
        if not embeddings and names & {"wte", "wpe"}:
            continue
        total += leaf.size
    return total


def flops_per_token(cfg: ModelConfig, n_non_embedding: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus 12·L·H·Q·T for attention (PaLM appendix B)."""
    return 6 * n_non_embedding + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len
