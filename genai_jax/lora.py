"""Low-rank adapters (LoRA; Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language
Models") as a transform of the parameter pytree, so the model, the objectives and sampling
never see an adapter.

A LoRA tree is `{"base": params, "lora": adapters, "full": leaves trained in full}`:

- `base`: the ordinary params the stage starts from, frozen: the objective reads them through
  `stop_gradient` and the optimizer gives them neither updates nor state (`optim.freeze_base`).
- `lora`: for each kernel W [in, out] that `lora.targets` matches, at W's path,
  `{"a": [in, r], "b": [r, out]}`. `b` starts at zero, so the step-0 model is the base exactly;
  `a` starts as PEFT's (Kaiming-uniform: U(-1/sqrt(in), 1/sqrt(in))).
- `full`: the scalar head (`scalar_head`) of reward and value models, trained in full as PEFT's
  `modules_to_save` trains a classification head: a reward model's head is new, a value model's
  must learn values, and it is d_model + 1 numbers.

`merge` turns a LoRA tree into ordinary params, W + (alpha / r) a @ b. The train step
differentiates through it, so each targeted kernel's full-size gradient still exists within the
step, but only the adapters' reach the optimizer.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict

from genai_jax.config import LoRAConfig, UserError

FROZEN = "frozen"
"""The optimizer label of a LoRA tree's base (`labels`)."""
FULLY_TRAINED = "scalar_head"
"""A parameter with this name in its path trains in full, never through adapters."""


def path_name(path: tuple[str, ...]) -> str:
    """A parameter's path as `lora.targets` sees it: params/h_0/attn/qkv/kernel."""
    return "/".join(path)


def _trains_fully(path: tuple[str, ...]) -> bool:
    return FULLY_TRAINED in path


def target_paths(params, cfg: LoRAConfig) -> list[tuple[str, ...]]:
    """The paths of the kernels that get adapters, refusing settings that cannot work: a rank
    below 0, a non-positive alpha, a pattern that is no regular expression, matches no
    parameter or matches one that is not a 2-D kernel. Works on abstract params too."""
    if cfg.rank < 0:
        raise UserError(f"lora.rank={cfg.rank} must be 0 (off) or positive")
    if cfg.alpha <= 0:
        raise UserError(f"lora.alpha={cfg.alpha} must be positive (the adapters' scale is alpha / rank)")
    try:
        pattern = re.compile(cfg.targets)
    except re.error as err:
        raise UserError(f"lora.targets={cfg.targets!r} is not a regular expression ({err})") from None
    matched = []
    for path, leaf in flatten_dict(params).items():
        if _trains_fully(path) or not pattern.search(path_name(path)):
            continue
        if leaf.ndim != 2:
            raise UserError(f"lora.targets={cfg.targets!r} matches {path_name(path)} of shape {list(leaf.shape)}; "
                            "adapters need a 2-D kernel [in, out]")
        matched.append(path)
    if not matched:
        example = next((path_name(p) for p in flatten_dict(params) if p[-1] == "kernel"), "none")
        raise UserError(f"lora.targets={cfg.targets!r} matches no parameter (a kernel's path reads like {example})")
    return matched


def wrap(params, cfg: LoRAConfig, key: jax.Array) -> dict:
    """`params` as a LoRA tree whose merge is `params` itself: zero `b`, seeded `a` (one key
    per targeted kernel, in path order)."""
    flat, adapters = flatten_dict(params), {}
    for index, path in enumerate(target_paths(params, cfg)):
        fan_in, fan_out = flat[path].shape
        bound = 1.0 / math.sqrt(fan_in)
        adapters[path + ("a",)] = jax.random.uniform(jax.random.fold_in(key, index), (fan_in, cfg.rank),
                                                     jnp.float32, -bound, bound)
        adapters[path + ("b",)] = jnp.zeros((cfg.rank, fan_out), jnp.float32)
    # A copy, not the base's array: the train step donates the state, and one buffer must not
    # be donated twice.
    full = {path: jnp.copy(leaf) for path, leaf in flat.items() if _trains_fully(path)}
    return {"base": params, "lora": unflatten_dict(adapters), "full": unflatten_dict(full)}


def merge(tree, cfg: LoRAConfig):
    """The ordinary params of a LoRA tree: base, with the `full` leaves in place and each
    targeted kernel W + (alpha / rank) a @ b. With lora.rank 0, `tree` is ordinary params and
    comes back unchanged."""
    if not cfg.rank:
        return tree
    flat = flatten_dict(tree["base"]) | flatten_dict(tree["full"])
    adapters = flatten_dict(tree["lora"])
    for path in {path[:-1] for path in adapters}:
        delta = jnp.matmul(adapters[path + ("a",)], adapters[path + ("b",)], precision=jax.lax.Precision.HIGHEST)
        flat[path] = flat[path] + (cfg.scale * delta).astype(flat[path].dtype)
    return unflatten_dict(flat)


def merge_part(tree, name: str, cfg: LoRAConfig):
    """`merge(tree, cfg)[name]` of a tree of several models ({"policy", "value"}), merging
    only that one (the policy to sample from, say)."""
    if not cfg.rank:
        return tree[name]
    return merge({part: {name: tree[part][name]} if name in tree[part] else {} for part in tree}, cfg)[name]


def objective(objective_fn, cfg: LoRAConfig):
    """`objective_fn(params, batch, rng)` as an objective of a LoRA tree: the merged params with
    the base behind `stop_gradient`, so only adapters and `full` leaves get gradients.
    Unchanged with lora.rank 0."""
    if not cfg.rank:
        return objective_fn

    def on_adapters(tree, batch, rng):
        return objective_fn(merge(dict(tree, base=jax.lax.stop_gradient(tree["base"])), cfg), batch, rng)

    return on_adapters


def trainable(tree, cfg: LoRAConfig):
    """The leaves a run trains: the adapters and `full` leaves of a LoRA tree, or all params."""
    return {"lora": tree["lora"], "full": tree["full"]} if cfg.rank else tree


def labels(tree, trained) -> dict:
    """Optimizer labels (`optax.multi_transform`) of a LoRA tree: FROZEN for the base, and
    `trained(subtree)` (a tree of labels) for the adapters and for the `full` leaves."""
    return {"base": jax.tree.map(lambda _: FROZEN, tree["base"]), "lora": trained(tree["lora"]),
            "full": trained(tree["full"])}
