"""optax chains per stage: AdamW with warmup + cosine decay, clipping and a weight-decay mask."""

from __future__ import annotations

import jax
import optax

from genai_jax.config import OptimConfig

_EMBEDDING_NAMES = frozenset({"wte", "wpe"})


def schedule(cfg: OptimConfig, max_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine decay to `min_lr` at `decay_steps` (or max_steps)."""
    decay_steps = cfg.decay_steps or max_steps
    if cfg.warmup_steps >= decay_steps:
        return optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        decay_steps=decay_steps,
        end_value=cfg.min_lr,
    )


def decay_mask(params, decay_embeddings: bool = False):
    """True for the leaves weight decay applies to: matrices, and embeddings only if asked."""

    def wants_decay(path, leaf) -> bool:
        names = {getattr(k, "key", None) for k in path}
        is_embedding = bool(names & _EMBEDDING_NAMES)
        return leaf.ndim >= 2 and (decay_embeddings or not is_embedding)

    return jax.tree_util.tree_map_with_path(wants_decay, params)


def make_optimizer(cfg: OptimConfig, max_steps: int) -> optax.GradientTransformation:
    """Clipped AdamW; its first moment is kept in `cfg.moments_dtype` (the second in float32)."""
    adamw = optax.adamw(
        learning_rate=schedule(cfg, max_steps),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        mu_dtype=cfg.moments_dtype,
        weight_decay=cfg.weight_decay,
        mask=lambda params: decay_mask(params, cfg.decay_embeddings),
    )
    if cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
    return adamw
