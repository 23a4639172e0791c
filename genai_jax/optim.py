"""optax chains per stage: AdamW with warmup + cosine decay, clipping and a weight-decay mask."""

from __future__ import annotations

import dataclasses

import jax
import optax

from genai_jax import lora
from genai_jax.config import OptimConfig, RunConfig

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


def make_optimizer(cfg: OptimConfig, max_steps: int, lr_scale=None) -> optax.GradientTransformation:
    """Clipped AdamW; its first moment is kept in `cfg.moments_dtype` (the second in float32).

    `lr_scale` (a number, traced in a population's step) multiplies the whole schedule; the
    optimizer state is the same either way."""
    base = schedule(cfg, max_steps)
    adamw = optax.adamw(
        learning_rate=base if lr_scale is None else lambda count: lr_scale * base(count),
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


def freeze_base(transforms: dict[str, optax.GradientTransformation], trained) -> optax.GradientTransformation:
    """`transforms` (by label) for a LoRA tree's adapters and fully trained leaves, labelled by
    `trained(subtree)`; the base gets `set_to_zero`: no update, and no state to hold."""
    return optax.multi_transform(transforms | {lora.FROZEN: optax.set_to_zero()},
                                 lambda tree: lora.labels(tree, trained))


def make_stage_optimizer(cfg: RunConfig, lr_scale=None) -> optax.GradientTransformation:
    """`make_optimizer` for a pretrain, SFT, reward or DPO run's params: all of them, or with
    lora.rank > 0 only the LoRA tree's trained leaves."""
    optimizer = make_optimizer(cfg.optim, cfg.train.max_steps, lr_scale)
    if not cfg.lora.rank:
        return optimizer
    return freeze_base({"train": optimizer}, lambda tree: jax.tree.map(lambda _: "train", tree))


def _by_model(params: dict) -> dict:
    """Each leaf of {"policy", "value"} labelled by its model's name."""
    return {name: jax.tree.map(lambda _: name, tree) for name, tree in params.items()}


def updates_per_iteration(cfg: RunConfig) -> int:
    return cfg.ppo.epochs * cfg.ppo.minibatches


def make_ppo_optimizer(cfg: RunConfig, lr_scale=None) -> optax.GradientTransformation:
    """AdamW for the policy at optim.lr and, if the algorithm has one, for the value model at
    ppo.value_lr (each clipped on its own), with schedules over all the run's updates; the value model's decays by the same
    factor as the policy's (not at all when optim.lr is 0: a frozen policy). `lr_scale` scales
    the policy's schedule, and the value model's where ppo.value_lr is 0 (it follows optim.lr).
    With lora.rank > 0 they update the adapters and fully trained leaves of a LoRA tree of
    {"policy", "value"}."""
    total_updates = cfg.train.max_steps * updates_per_iteration(cfg)
    value_lr = cfg.ppo.value_lr or cfg.optim.lr
    decay = cfg.optim.min_lr / cfg.optim.lr if cfg.optim.lr else 1.0
    value_optim = dataclasses.replace(cfg.optim, lr=value_lr, min_lr=decay * value_lr)
    transforms = {"policy": make_optimizer(cfg.optim, total_updates, lr_scale)}
    if cfg.ppo.has_value_model:
        transforms["value"] = make_optimizer(value_optim, total_updates, None if cfg.ppo.value_lr else lr_scale)
    if cfg.lora.rank:
        return freeze_base(transforms, _by_model)
    return optax.multi_transform(transforms, _by_model)
