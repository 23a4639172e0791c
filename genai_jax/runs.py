"""Run directories as the stages open, resume and load them.

Below every stage module (stages, rlhf, pipeline, the CLI), so each of them opens a run and
loads an earlier one the same way without importing another stage: `open_run` starts or checks
a run directory, `restore_target` says what a checkpoint restores into, `load_trained` reads a
run's latest parameters (of any stage, an RLHF run's policy included, a LoRA run's merged),
`final_record` its last metrics; `make_stage_init_fn` and `make_ppo_init_fn` build the states
they restore into.
"""

from __future__ import annotations

import dataclasses
import os

import jax
from etils import epath

from genai_jax import lora, rundir
from genai_jax.checkpoint import Checkpointer
from genai_jax.config import RunConfig, UserError
from genai_jax.model import init_params
from genai_jax.optim import make_ppo_optimizer, make_stage_optimizer
from genai_jax.parallel import Mesh, Single, sync_processes
from genai_jax.tokenizer import Tokenizer, load_tokenizer
from genai_jax.train import make_init_fn


def with_vocab(cfg: RunConfig, tokenizer: Tokenizer) -> RunConfig:
    """Fill model.vocab_size from the tokenizer (rounded up to model.vocab_multiple)."""
    vocab = cfg.model.vocab_size
    if vocab == 0:
        multiple = cfg.model.vocab_multiple
        vocab = -(-tokenizer.vocab_size // multiple) * multiple
    elif vocab < tokenizer.vocab_size:
        raise UserError(f"model.vocab_size={vocab} is smaller than the tokenizer's {tokenizer.vocab_size}")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))


def restore_target(abstract_state, strategy):
    """Shapes, dtypes and shardings to restore a checkpoint into (sharded under `mesh`)."""
    if isinstance(strategy, Mesh):
        shardings = strategy.state_sharding(abstract_state)
    else:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract_state)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings
    )


def open_run(cfg: RunConfig, run_dir: epath.Path, new_tokenizer) -> tuple[RunConfig, Tokenizer]:
    """(config with vocab filled in, tokenizer) of a new run directory, where
    `new_tokenizer(run_dir)` saves the tokenizer, or of an existing one checked for compatibility.
    A refused run directory is left exactly as it was. With several processes, all of them look
    before process 0 writes, and the others read what it wrote."""
    resuming = (run_dir / rundir.CONFIG_FILE).exists()
    foreign = not resuming and run_dir.exists() and any(run_dir.iterdir())
    sync_processes("open_run: looked")
    if resuming:
        if any("imported_from" in record for record in rundir.read_metrics(run_dir)[:1]):
            raise UserError(f"{run_dir} holds an imported model (import-hf), which is not trained further in "
                            "place: start a stage from it with --init-from (sft, reward, dpo) or --policy (ppo)")
        tokenizer = load_tokenizer(run_dir)
        cfg = with_vocab(cfg, tokenizer)
        rundir.check_resumable(run_dir, cfg)
        return cfg, tokenizer
    if foreign:
        raise UserError(f"{run_dir} is not empty and holds no {rundir.CONFIG_FILE}; choose another --run-dir")
    if jax.process_index() == 0:
        rundir.write_config(run_dir, with_vocab(cfg, new_tokenizer(run_dir)))
    sync_processes("open_run: written")
    tokenizer = load_tokenizer(run_dir)
    return with_vocab(cfg, tokenizer), tokenizer


def final_record(run_dir: epath.Path) -> dict:
    """The records of a run's last step merged, e.g. its train and eval records (process 0; others
    have none)."""
    if jax.process_index() != 0:
        return {}
    records = rundir.read_metrics(run_dir)
    return {name: value for record in records if record["step"] == records[-1]["step"] for name, value in record.items()}


def _lora_wrapped(cfg: RunConfig, init):
    """`init(key)`'s params as a LoRA tree when lora.rank > 0 (adapters from a key of their own)."""
    if not cfg.lora.rank:
        return init
    return lambda key: lora.wrap(init(key), cfg.lora, jax.random.fold_in(key, 1))


def make_stage_init_fn(cfg: RunConfig, params=None):
    """TrainState init for a pretrain, SFT, reward or DPO run: `params`, or random ones of the
    right shape (enough for `jax.eval_shape`, to restore checkpoints into); a LoRA tree of them
    with lora.rank > 0."""
    def init(key):
        return init_params(cfg.model, key) if params is None else params

    return make_init_fn(_lora_wrapped(cfg, init), make_stage_optimizer(cfg), cfg.train.seed)


def make_ppo_init_fn(cfg: RunConfig, policy_params=None, value_params=None):
    """TrainState init for an RLHF run's {"policy", "value"} ({"policy"} for an algorithm without
    a value model); with no params given, random ones of the right shape (enough for
    `jax.eval_shape`, to restore checkpoints into); one LoRA tree of both with lora.rank > 0."""

    def init(key):
        policy_key, value_key = jax.random.split(key)
        params = {"policy": init_params(cfg.model, policy_key, "lm") if policy_params is None else policy_params}
        if cfg.ppo.has_value_model:
            params["value"] = init_params(cfg.model, value_key, "scalar") if value_params is None else value_params
        return params

    return make_init_fn(_lora_wrapped(cfg, init), make_ppo_optimizer(cfg), cfg.train.seed)


def load_trained(run_dir: str | os.PathLike) -> tuple[RunConfig, Tokenizer, dict]:
    """(config, tokenizer, params) of a run's latest checkpoint, on the default device: ordinary
    params (a LoRA run's adapters merged into its base; an RLHF run's policy)."""
    cfg, tokenizer, params = load_saved(run_dir)
    if cfg.ppo.policy:
        return cfg, tokenizer, lora.merge_part(params, "policy", cfg.lora)
    return cfg, tokenizer, lora.merge(params, cfg.lora)


def load_saved(run_dir: str | os.PathLike) -> tuple[RunConfig, Tokenizer, dict]:
    """(config, tokenizer, params) of a run's latest checkpoint as the train state holds them (a
    LoRA tree, an RLHF run's {"policy", "value"}), on the default device. Only the params are
    read (`Checkpointer.restore_params`), not the optimizer state."""
    run_dir = epath.Path(run_dir)
    cfg = rundir.read_config(run_dir)
    tokenizer = load_tokenizer(run_dir)
    checkpointer = Checkpointer(run_dir / "checkpoints")
    if checkpointer.latest_step() is None:
        raise UserError(f"{run_dir}: no checkpoint yet")
    # an RLHF run: {"policy", "value"} (or {"policy"}) under the PPO optimizer
    init_fn = make_ppo_init_fn(cfg) if cfg.ppo.policy else make_stage_init_fn(cfg)
    params = checkpointer.restore_params(restore_target(jax.eval_shape(init_fn).params, Single()))
    checkpointer.close()
    return cfg, tokenizer, params
