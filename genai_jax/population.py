"""Populations: N replicas of one stage trained by one compiled program, the ordinary train step
under `jax.vmap` over a stacked TrainState (docs/population.md).

Replica k of a population is an ordinary run (`replica_config`): seed `train.seed + s`, data order
`data.order_seed + s` (s = k mod `train.population`) and one combination of the hyperparameter
axes' values. `Population` maps one replica's init, step and eval over the replicas' leading axis
and splits what they return into one record per replica; for an ordinary run (no population) it
passes everything through unchanged, so both go through the same loop. Nothing here knows an
objective: an axis reaches the step as a traced number, an objective keyword or the scale of the
learning-rate schedule.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from genai_jax import config as config_lib
from genai_jax.config import RunConfig, UserError
from genai_jax.data import loader
from genai_jax.metrics import summary
from genai_jax.parallel import TRAIN_STEP_ADVICE

# The fields a population may vary: {field: (stages reading it, the objective keyword it sets, or
# None: the learning rate scales the optimizer's schedule, the KL coefficient is the RL stage's
# starting beta, a number its rollouts take)}.
HYPERPARAMETERS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "optim.lr": (("pretrain", "sft", "reward", "dpo", "ppo"), None),
    "dpo.beta": (("dpo",), "beta"),
    "ppo.kl_coef": (("ppo",), None),
    "ppo.clip_ratio": (("ppo",), "clip_ratio"),
    "ppo.entropy_coef": (("ppo",), "entropy_coef"),
}


def is_population(cfg: RunConfig) -> bool:
    return cfg.train.population > 1 or bool(cfg.population.axes)


def check(cfg: RunConfig, stage: str) -> None:
    """Refuse a population this stage cannot train, naming the field (before anything is written)."""
    if cfg.train.population < 1:
        raise UserError(f"train.population={cfg.train.population} must be at least 1")
    if not is_population(cfg):
        return
    if cfg.train.population_map == "loop" and cfg.train.strategy != "single":
        raise UserError(f"train.population_map=loop runs the replicas in sequence on one device: it needs "
                        f"train.strategy=single, not {cfg.train.strategy}")
    if cfg.train.strategy == "pmap" or (stage == "ppo" and cfg.train.strategy != "single"):
        raise UserError(f"a population of the {stage} stage runs under train.strategy="
                        f"{'single' if stage == 'ppo' else 'single or mesh'}, not {cfg.train.strategy}")
    seen = set()
    for name, values in cfg.population.axes:
        if name not in HYPERPARAMETERS:
            raise UserError(f"--population.{name}: {name} changes shapes or the compiled program, or is not a "
                            f"number the step reads; a population varies {', '.join(HYPERPARAMETERS)}")
        stages, _ = HYPERPARAMETERS[name]
        if stage not in stages:
            raise UserError(f"--population.{name}: the {stage} stage does not read {name}")
        if name in seen or not values:
            raise UserError(f"--population.{name}: give each field once, with at least one value")
        seen.add(name)
        if name == "ppo.kl_coef" and cfg.ppo.algorithm == "grpo":
            raise UserError("--population.ppo.kl_coef: grpo's KL coefficient is a term of its loss that 0 leaves "
                            "out of the program; vary it in separate runs")
        if name == "optim.lr" and cfg.optim.lr <= 0:
            raise UserError(f"--population.optim.lr scales the schedule of optim.lr, which is {cfg.optim.lr}")


@dataclasses.dataclass(frozen=True)
class Replica:
    index: int
    seed: int
    order_seed: int
    values: tuple[tuple[str, float], ...] = ()
    """This replica's value of each hyperparameter axis."""

    def tags(self) -> dict:
        """Its records' `replica_log.TAGS`."""
        return {"replica": self.index, "seed": self.seed, "hyperparameters": dict(self.values)}


def replicas(cfg: RunConfig) -> list[Replica]:
    """Every combination of the axes' values, each with `train.population` seeds (the seeds vary
    fastest, so each value sees the same seeds: paired comparisons). One replica without a population."""
    names = [name for name, _ in cfg.population.axes]
    combinations = itertools.product(*(values for _, values in cfg.population.axes))
    return [Replica(index=c * cfg.train.population + s, seed=cfg.train.seed + s, order_seed=cfg.data.order_seed + s,
                    values=tuple(zip(names, combination)))
            for c, combination in enumerate(combinations) for s in range(cfg.train.population)]


def replica_config(cfg: RunConfig, replica: Replica) -> RunConfig:
    """The config of the ordinary run replica `replica` equals: its seeds, its values (a learning
    rate scales the whole schedule, so optim.min_lr scales with it)."""
    sections = {"train": {"seed": replica.seed, "population": 1}, "data": {"shuffle_seed": replica.order_seed},
                "population": config_lib.PopulationConfig()}
    for name, value in replica.values:
        section, field = name.split(".")
        sections.setdefault(section, {})[field] = value
        if name == "optim.lr":
            sections["optim"]["min_lr"] = cfg.optim.min_lr * lr_scale(cfg, replica)
    return config_lib.replace(cfg, **sections)


def lr_scale(cfg: RunConfig, replica: Replica) -> float:
    """The factor of replica's learning-rate schedule: its `optim.lr` value over the config's."""
    value = dict(replica.values).get("optim.lr")
    return 1.0 if value is None else value / cfg.optim.lr


def replica_part(data, index: int):
    """Replica `index`'s part of a population's saved data (`Population.result_file`'s
    `{"replicas": [...]}`, wherever it sits in a dict): what the replica saves as an ordinary run."""
    if isinstance(data, dict) and set(data) == {"replicas"}:
        return data["replicas"][index]
    if isinstance(data, dict):
        return {name: replica_part(value, index) for name, value in data.items()}
    return data


def take(tree, index: int):
    """Replica `index` of a stacked pytree."""
    return jax.tree.map(lambda x: x[index], tree)


def stack(trees: list):
    """Trees of one structure, one per replica, stacked on a leading replica axis (numpy)."""
    return jax.tree.map(lambda *parts: np.stack(parts), *trees)


class StackedIterator:
    """One train iterator per replica, their batches stacked on a leading replica axis; its state
    (saved with each checkpoint) is every replica's."""

    def __init__(self, iterators: list):
        self.iterators = iterators

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return stack([next(it) for it in self.iterators])

    def get_state(self) -> dict:
        return {"replicas": [it.get_state() for it in self.iterators]}

    def set_state(self, state: dict) -> None:
        for it, replica_state in zip(self.iterators, state["replicas"], strict=True):
            it.set_state(replica_state)


class Population:
    """A run's replicas, and the one-replica functions of a stage mapped over them."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.stacked = is_population(cfg)
        self.replicas = replicas(cfg)
        self.size = len(self.replicas)

    @property
    def strategy_size(self) -> int | None:
        """What `parallel.make_strategy` takes for this run: the replicas of a population, None
        for an ordinary run."""
        return self.size if self.stacked else None

    def memory_advice(self, needed: float, free: float) -> str:
        """What to lower when the step does not fit: for a population, how many replicas would
        (memory grows about linearly with them)."""
        if not self.stacked:
            return TRAIN_STEP_ADVICE
        fits = int(free // (needed / self.size))
        return (f"about {fits} of its {self.size} replicas fit ({needed / self.size:,.0f} MiB each): lower "
                f"train.population or the --population values, or {TRAIN_STEP_ADVICE}")

    def step_values(self) -> dict[str, np.ndarray]:
        """[N] arrays of what the step reads per replica: `lr_scale` (the schedule's factor) and
        each objective keyword an axis sets."""
        values = {"lr_scale": np.array([self.lr_scale(r) for r in self.replicas], np.float32)}
        for name, _ in self.cfg.population.axes:
            keyword = HYPERPARAMETERS[name][1]
            if keyword is not None:
                values[keyword] = np.array([dict(r.values)[name] for r in self.replicas], np.float32)
        return values

    def lr_scale(self, replica: Replica) -> float:
        """`lr_scale` of this population's config (what `train.fit` logs as each replica's lr)."""
        return lr_scale(self.cfg, replica)

    def map_init(self, make_init: Callable[[int, int], Callable]) -> Callable:
        """`make_init(index, seed)() -> TrainState` for every replica's index and seed (traced),
        stacked (jittable)."""
        if not self.stacked:
            return make_init(0, self.cfg.train.seed)
        indices = jnp.arange(self.size)
        seeds = jnp.array([r.seed for r in self.replicas], jnp.int32)
        return lambda: jax.vmap(lambda index, seed: make_init(index, seed)())(indices, seeds)

    def map_step(self, make_step: Callable[[dict], Callable]) -> Callable:
        """`make_step(values)(state, batch, rng)`, one replica's step (or eval step) for its
        `step_values` (an empty dict for an ordinary run), mapped over stacked states, batches and
        keys by `jax.vmap`, or by `jax.lax.map` with train.population_map=loop. Evaluation batches
        are the same for every replica: `stack_like` stacks them."""
        if not self.stacked:
            return make_step({})
        values = self.step_values()

        def replica_step(state, batch, rng, value):
            return make_step(value)(state, batch, rng)

        def step(states, batches, rngs):
            if self.cfg.train.population_map == "loop":
                return jax.lax.map(lambda args: replica_step(*args), (states, batches, rngs, values))
            return jax.vmap(replica_step)(states, batches, rngs, values)

        return step

    def map(self, fn: Callable) -> Callable:
        """`fn` of one replica's tree, over a stacked tree's replicas (jittable)."""
        return jax.vmap(fn) if self.stacked else fn

    def keys(self, rng, step: int):
        """Step `step`'s key of each replica, `fold_in(replica's rng, step)`."""
        if not self.stacked:
            return jax.random.fold_in(rng, step)
        return jax.vmap(jax.random.fold_in, (0, None))(rng, step)

    def sources(self, source) -> list:
        """One random-access source per replica: `source` itself when it is a list of them (data
        of each replica's own, the reward stage's from an SFT population), else `source` for every
        replica."""
        return source if isinstance(source, list) else [source] * self.size

    def first_source(self, source):
        """Replica 0's source (every replica's rows have its shapes)."""
        return self.sources(source)[0]

    def train_iterator(self, source, batch_size: int):
        """Batches of each replica's source (`sources`) in its data order (`data.order_seed` + its
        seed offset)."""
        if not self.stacked:
            return loader.train_iterator(self.first_source(source), batch_size, seed=self.cfg.data.order_seed)
        return StackedIterator([loader.train_iterator(replica_source, batch_size, seed=r.order_seed)
                                for r, replica_source in zip(self.replicas, self.sources(source), strict=True)])

    def validation_batches(self, source, batch_size: int, max_batches: int, seed: int) -> list:
        """`loader.validation_batches` as the eval step takes them: one source's batches stacked
        by broadcasting (the same for every replica), or the batches of each replica's own source
        stacked (as many as the smallest source fills)."""
        if not isinstance(source, list):
            return [self.stack_like(batch) for batch in loader.validation_batches(source, batch_size, max_batches, seed)]
        per_replica = [loader.validation_batches(replica_source, batch_size, max_batches, seed)
                       for replica_source in self.sources(source)]
        return [self.stack(list(batches)) for batches in zip(*per_replica)]

    def stack_like(self, tree):
        """`tree` with a leading replica axis (broadcast), as the population's batches have one."""
        if not self.stacked:
            return tree
        return jax.tree.map(lambda x: np.broadcast_to(x, (self.size, *np.shape(x))), tree)

    def split(self, tree) -> list[tuple[Replica, object]]:
        """(replica, its part of `tree`) for each replica; an ordinary run's whole tree."""
        if not self.stacked:
            return [(self.replicas[0], tree)]
        return [(r, take(tree, r.index)) for r in self.replicas]

    def summaries(self, host_metrics: list[dict]) -> list[dict]:
        """Each replica's `metrics.summary` of host metrics (of one or more equal-weight batches)."""
        parts = [self.split(metrics) for metrics in host_metrics]
        return [summary([batch[k][1] for batch in parts]) for k in range(self.size)]

    def records(self, step: int, host_metrics: list[dict],
                extra: Callable[[Replica], dict] = lambda r: {}) -> list[dict]:
        """Log records of host metrics (`summaries`) and `extra(replica)`, as `log` makes them."""
        return self.log(step, self.summaries(host_metrics), extra)

    def log(self, step: int, per_replica: list[dict], extra: Callable[[Replica], dict] = lambda r: {}) -> list[dict]:
        """Log records of one record of numbers per replica: an ordinary run's one; a population's
        mean, std, then each replica's with its tags."""
        per_replica = [record | extra(r) for r, record in zip(self.replicas, per_replica, strict=True)]
        if not self.stacked:
            return [{"step": step, **per_replica[0]}]
        tagged = [{"step": step, **r.tags(), **record} for r, record in zip(self.replicas, per_replica)]
        names = [name for name, value in per_replica[0].items() if isinstance(value, (int, float))]
        moments = [{"step": step, "population": kind, **{name: float(fn([record[name] for record in per_replica]))
                                                          for name in names}}
                   for kind, fn in (("mean", np.mean), ("std", np.std))]
        return moments + tagged

    def result_file(self, per_replica: list):
        """The content of a JSON result file of one value per replica (a reward model's
        normalisation): an ordinary run's value; a population's `{"replicas": [...]}`, of which
        `runs.extract` writes a replica's value under the same name."""
        return per_replica[0] if not self.stacked else {"replicas": per_replica}

    def read_result(self, data) -> list:
        """The values per replica of what `result_file` made."""
        return [data] if not self.stacked else list(data["replicas"])

    def stack(self, trees: list):
        """One tree per replica as the step takes them: stacked for a population."""
        return trees[0] if not self.stacked else stack(trees)
