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
import json
import os
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
from etils import epath

from genai_jax import lora, replica_log, rundir
from genai_jax import population as population_lib
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
        if rundir.imported_from(run_dir):
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


def final_record(run_dir: epath.Path, replica: int | None = None) -> dict:
    """The records of a run's last step merged, e.g. its train and eval records (process 0; others
    have none); of a population, its mean records, or replica `replica`'s own."""
    if jax.process_index() != 0:
        return {}
    records = rundir.read_metrics(run_dir)
    if replica is not None:
        records = replica_log.replica_records(records, replica)
    else:
        records = [record for record in records
                   if "replica" not in record and record.get("population", "mean") == "mean"]
    return {name: value for record in records if record["step"] == records[-1]["step"]
            for name, value in record.items() if name != "population"}


def _lora_wrapped(cfg: RunConfig, init):
    """`init(key)`'s params as a LoRA tree when lora.rank > 0 (adapters from a key of their own)."""
    if not cfg.lora.rank:
        return init
    return lambda key: lora.wrap(init(key), cfg.lora, jax.random.fold_in(key, 1))


def make_stage_init_fn(cfg: RunConfig, initial_params=None):
    """TrainState init of a pretrain, sft, reward or dpo run, stacked over a population's replicas:
    params from a copy of `initial_params(index, seed)` of each replica (the step donates them; the
    caller may still use them), or a fresh init; a LoRA tree of them with lora.rank > 0 (each
    replica's adapters from its own key). Suits `jax.eval_shape` (abstract states to restore into)."""
    optimizer = make_stage_optimizer(cfg)

    def make(index, seed):
        def init(key):
            if initial_params is None:
                return init_params(cfg.model, key)
            return jax.tree.map(jnp.array, initial_params(index, seed))

        return make_init_fn(_lora_wrapped(cfg, init), optimizer, seed)

    return population_lib.Population(cfg).map_init(make)


def make_ppo_init_fn(cfg: RunConfig, policy_params=None, value_params=None):
    """TrainState init for an RLHF run's {"policy", "value"} ({"policy"} for an algorithm without
    a value model), stacked over a population's replicas: the policy from a copy of
    `policy_params(index)`, the value model from a copy of `value_params(index, seed)` of each
    replica (its own head init where it gets a new one; replica i's own models where they come
    from a population, `load_replicas`); with no params given, random ones of the right shape
    (enough for `jax.eval_shape`, to restore checkpoints into); one LoRA tree of both with
    lora.rank > 0 (each replica's adapters from its own key)."""

    def make(index, seed):
        def init(key):
            policy_key, value_key = jax.random.split(key)
            params = {"policy": init_params(cfg.model, policy_key, "lm") if policy_params is None
                      else jax.tree.map(jnp.array, policy_params(index))}
            if cfg.ppo.has_value_model:
                params["value"] = (init_params(cfg.model, value_key, "scalar") if value_params is None
                                   else jax.tree.map(jnp.array, value_params(index, seed)))
            return params

        return make_init_fn(_lora_wrapped(cfg, init), optimizer, seed)

    optimizer = make_ppo_optimizer(cfg)
    return population_lib.Population(cfg).map_init(make)


def make_run_init_fn(cfg: RunConfig):
    """The init (for its shapes) of any run's state: an RLHF run's (`ppo.policy` set) or a stage's."""
    return make_ppo_init_fn(cfg) if cfg.ppo.policy else make_stage_init_fn(cfg)


def load_trained(run_dir: str | os.PathLike) -> tuple[RunConfig, Tokenizer, dict]:
    """(config, tokenizer, params) of a run's latest checkpoint, on the default device: ordinary
    params (a LoRA run's adapters merged into its base; an RLHF run's policy)."""
    cfg, tokenizer, params = load_saved(run_dir)
    return cfg, tokenizer, model_params(cfg, params)


def model_params(cfg: RunConfig, params) -> dict:
    """The params of a run's train state as the model takes them: a LoRA tree merged, an RLHF
    run's policy."""
    if cfg.ppo.policy:
        return lora.merge_part(params, "policy", cfg.lora)
    return lora.merge(params, cfg.lora)


def load_saved(run_dir: str | os.PathLike) -> tuple[RunConfig, Tokenizer, dict]:
    """(config, tokenizer, params) of a run's latest checkpoint as the train state holds them (a
    LoRA tree, an RLHF run's {"policy", "value"}), on the default device. Only the params are
    read (`Checkpointer.restore_params`), not the optimizer state."""
    run_dir = epath.Path(run_dir)
    cfg = rundir.read_config(run_dir)
    if population_lib.is_population(cfg):
        raise UserError(f"{run_dir} holds a population of {population_lib.Population(cfg).size} replicas; "
                        f"`genai-jax extract --run {run_dir} --replica I --run-dir OUT` writes one as a run")
    return cfg, load_tokenizer(run_dir), restore_params(run_dir, make_run_init_fn(cfg))


def load_population(run_dir: str | os.PathLike) -> tuple[RunConfig, Tokenizer, dict]:
    """(config, tokenizer, params stacked over the replicas) of a population run's latest
    checkpoint, ordinary params (`model_params` of each replica's)."""
    run_dir = epath.Path(run_dir)
    cfg = rundir.read_config(run_dir)
    params = restore_params(run_dir, make_run_init_fn(cfg))
    return cfg, load_tokenizer(run_dir), population_lib.Population(cfg).map(partial(model_params, cfg))(params)


def load_replicas(run_dir: str | os.PathLike, size: int, flag: str) -> tuple[RunConfig, Tokenizer, Callable, bool]:
    """(config, tokenizer, `params(index)`, whether the params differ per replica) of the run that
    replica `index` of a population of `size` starts from (`flag` names the run in errors): an
    ordinary run's params for every replica (`load_trained`), or replica `index`'s own of a
    population run of as many replicas (`load_population`; of another size, refused). `index`
    may be traced (`Population.map_init`)."""
    run_cfg = rundir.read_config(epath.Path(run_dir))
    if size == 1 or not population_lib.is_population(run_cfg):  # load_trained refuses a population
        cfg, tokenizer, params = load_trained(run_dir)
        return cfg, tokenizer, lambda index: params, False
    run_size = population_lib.Population(run_cfg).size
    if run_size != size:
        raise UserError(f"{flag} {run_dir} is a population of {run_size} replicas and this run's has {size} "
                        "(train.population times the --population values); replica i starts from replica i, so "
                        "they must be as many")
    cfg, tokenizer, stacked = load_population(run_dir)
    return cfg, tokenizer, lambda index: population_lib.take(stacked, index), True


def restore_latest(run_dir: epath.Path, init_fn):
    """(state, data iterator state) of a run's latest checkpoint, on one device, shaped as
    `init_fn()` makes them (its RLHF state is `make_ppo_init_fn`'s)."""
    checkpointer = _latest_checkpoint(run_dir)
    restored = checkpointer.restore(restore_target(jax.eval_shape(init_fn), Single()))
    checkpointer.close()
    return restored


def restore_params(run_dir: epath.Path, init_fn):
    """The params alone of a run's latest checkpoint (`Checkpointer.restore_params`: no optimizer
    state is read), on one device, shaped as `init_fn()` makes them."""
    checkpointer = _latest_checkpoint(run_dir)
    params = checkpointer.restore_params(restore_target(jax.eval_shape(init_fn).params, Single()))
    checkpointer.close()
    return params


def _latest_checkpoint(run_dir: epath.Path) -> Checkpointer:
    checkpointer = Checkpointer(run_dir / "checkpoints")
    if checkpointer.latest_step() is None:
        checkpointer.close()
        raise UserError(f"{run_dir}: no checkpoint yet")
    return checkpointer


def extract(run_dir: str | os.PathLike, index: int, out: str | os.PathLike) -> None:
    """Write replica `index` of a population run as the ordinary run it equals
    (`population.replica_config`): config.json, tokenizer, its latest checkpoint (its state and
    data order, so the new run resumes exactly), its records without the replica tags, and a reward
    model's normalisation."""
    run_dir, out = epath.Path(run_dir), epath.Path(out)
    cfg = rundir.read_config(run_dir)
    population = population_lib.Population(cfg)
    if not population.stacked:
        raise UserError(f"{run_dir} holds no population (train.population=1, no population axes)")
    if not 0 <= index < population.size:
        raise UserError(f"--replica {index}: {run_dir} holds replicas 0 to {population.size - 1}")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} is not empty; choose another --run-dir")
    state, data_state = restore_latest(run_dir, make_run_init_fn(cfg))
    replica_cfg = population_lib.replica_config(cfg, population.replicas[index])
    rundir.write_config(out, replica_cfg)
    load_tokenizer(run_dir).save(out)
    checkpointer = Checkpointer(out / "checkpoints")
    checkpointer.save(int(state.step[index]), population_lib.take(state, index),
                      population_lib.replica_part(data_state, index))
    checkpointer.wait()
    checkpointer.close()
    records = replica_log.replica_records(rundir.read_metrics(run_dir), index)
    (out / rundir.METRICS_FILE).write_text("".join(json.dumps(record) + "\n" for record in records))
    for path in run_dir.glob("*.json"):  # per-replica results (a reward model's normalisation)
        if path.name != rundir.CONFIG_FILE:
            data = json.loads(path.read_text())
            (out / path.name).write_text(json.dumps(population_lib.replica_part(data, index), indent=2))
