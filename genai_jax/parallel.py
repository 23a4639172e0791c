"""Compile strategies for the one train step: `single` (jit), `mesh` (jit + NamedSharding), `pmap`.

A strategy knows how to place the state and a host batch on devices, how to compile a step
`fn(state, batch, rng)` (on first call, or ahead of time for example arguments), and how to bring
state and metrics back to the host. The step itself is the same function under all three; only
`reduce` differs (identity under jit, where arrays are global; `lax.pmean`, and `lax.pmax` for
maxima, over "data" under pmap).
"""

from __future__ import annotations

import resource
import sys
from typing import Any, Callable, NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from genai_jax.config import TrainConfig, UserError
from genai_jax.distributed import say
from genai_jax.metrics import is_maximum

PMAP_AXIS = "data"
# Arrays smaller than this stay replicated under FSDP: splitting them saves nothing.
_MIN_FSDP_SIZE = 2**14


def identity(tree):
    return tree


class Reduction(NamedTuple):
    """How a step combines values over the devices that each hold part of the batch: `mean` for
    gradients and metrics, `max` for maxima. Identity under jit, where arrays are global."""

    mean: Callable = identity
    max: Callable = identity

    def metrics(self, metrics: dict) -> dict:
        return {name: (self.max if is_maximum(name) else self.mean)(value) for name, value in metrics.items()}


def closed_over_as_arguments(fn: Callable[[], Any]) -> tuple[Callable, list]:
    """(program, arrays) with `program(*arrays) == fn()`, where `arrays` are what `fn` closes over
    (a fine-tuning stage's loaded params). `jax.jit(fn)` would capture them as constants of its
    program: compiled into it, slow for large models (JAX warns above 2 GB) and placed wherever
    they already are; as arguments they can be placed first (FSDP shards under `mesh`)."""
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)()
    structure = jax.tree.structure(out_shape)
    return (lambda *arrays: jax.tree.unflatten(structure, jax.core.eval_jaxpr(closed.jaxpr, arrays))), closed.consts


def compile_ahead(jitted, example: tuple | None):
    """`jitted` compiled now for arguments like `example`: a `jax.stages.Compiled`, so shape errors
    and a step too big for the device fail before training, and `memory_mib` can read its buffers.
    Without an example, `jitted` itself (compiled on first call)."""
    return jitted if example is None else jitted.lower(*example).compile()


def memory_mib(compiled) -> dict[str, float] | None:
    """Per-device MiB of a compiled step's buffers from XLA's buffer assignment, and `peak`, what
    it holds at once (outputs aliasing donated arguments counted once); None where the backend
    reports nothing."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    sizes = {"arguments": stats.argument_size_in_bytes, "outputs": stats.output_size_in_bytes,
             "temp": stats.temp_size_in_bytes, "code": stats.generated_code_size_in_bytes}
    sizes["peak"] = sum(sizes.values()) - stats.alias_size_in_bytes
    return {name: size / 2**20 for name, size in sizes.items()}


TRAIN_STEP_ADVICE = "lower train.batch_size or data.seq_len, raise optim.grad_accum or set model.remat"


def peak_record(name: str, memory: dict[str, float] | None) -> dict[str, float]:
    """{name: peak MiB} for a metrics record, or {} where the backend reported no memory."""
    return {} if memory is None else {name: memory["peak"]}


def host_peak_mib() -> float:
    """This process's peak resident host memory so far, in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def host_available_mib() -> float | None:
    """The host memory the kernel could give this process now (Linux's MemAvailable), in MiB;
    None where /proc/meminfo is not there."""
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
    except OSError:
        return None
    return int(fields["MemAvailable"].split()[0]) / 2**10


def free_mib(device) -> tuple[float, str] | None:
    """(MiB free for a program's temporaries, where) on `device`: an accelerator's own memory
    stats, or for a CPU device its share of the host's available memory (the CPU devices of a
    process share it); None where neither is known."""
    stats = device.memory_stats()
    if stats and "bytes_limit" in stats:
        return (stats["bytes_limit"] - stats["bytes_in_use"]) / 2**20, f"free on {device.device_kind}"
    available = host_available_mib() if getattr(device, "platform", None) == "cpu" else None
    if available is None:
        return None
    return available / jax.local_device_count(), "of host memory available to each CPU device"


def check_fits(memory: dict[str, float] | None, device, program: str = "the train step",
               advice: str | Callable[[float, float], str] = TRAIN_STEP_ADVICE) -> None:
    """Refuse a compiled program needing more than `device`'s free memory before it first runs (XLA
    on GPU compiles one anyway and fails at its first allocation, on CPU with a traceback or the
    kernel's OOM killer; the TPU compiler refuses it itself). The arguments are on the device
    already. `advice` may be a function of the MiB needed and free (a population's says how many
    fit)."""
    free = free_mib(device)
    if memory is None or free is None:
        return
    free, where = free
    needed = memory["peak"] - memory["arguments"]
    if needed > free:
        raise UserError(
            f"{program} needs {needed:,.0f} MiB more per device than the {free:,.0f} MiB {where}; "
            f"{advice(needed, free) if callable(advice) else advice}"
        )


def report_memory(compiled, program: str, advice: str | Callable[[float, float], str] = TRAIN_STEP_ADVICE
                  ) -> dict[str, float] | None:
    """`compiled`'s memory per device (`memory_mib`), printed once as "PROGRAM memory per device:
    ..."; refused, with `advice`, if it cannot fit the first local device (`check_fits`)."""
    memory = memory_mib(compiled)
    check_fits(memory, jax.local_devices()[0], f"the {program}", advice)
    say(f"{program} memory per device: " + ("not reported by this backend" if memory is None else
                                            ", ".join(f"{name} {mib:,.1f} MiB" for name, mib in memory.items())))
    return memory


def compile_step(strategy, train_step: Callable, abstract_state, example: tuple, program: str = "train step",
                 advice: str | Callable[[float, float], str] = TRAIN_STEP_ADVICE):
    """(`train_step` compiled by `strategy` ahead of time for `example` arguments, its memory per
    device or None): refused, with `advice`, if it cannot fit the device, its memory printed
    (`report_memory`)."""
    compiled = strategy.compile(train_step, abstract_state, example=example)
    return compiled, report_memory(compiled, program, advice)


def to_host(tree) -> Any:
    """Numpy copies of arrays on this process's devices (a population's state may be split over
    them), or of replicated arrays spanning several processes (their local copy)."""
    def copy(x):
        if not isinstance(x, jax.Array):
            return x
        return np.asarray(x if x.is_fully_addressable else x.addressable_data(0))

    return jax.tree.map(copy, tree)


def host_copy(tree) -> Any:
    """`tree` whole on every process: unchanged with one process; with several, numpy copies of
    arrays that may be sharded across processes (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return tree
    return multihost_utils.process_allgather(tree, tiled=True)


def sync_processes(name: str) -> None:
    """A barrier across processes (nothing with one): no process passes until all reach it."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


class Single:
    """One device, plain `jax.jit`, state donated."""

    name = "single"
    reduce = Reduction()
    num_shards = 1
    batch_divisor = 1

    def __init__(self):
        self.device = jax.local_devices()[0]

    def place_state(self, state):
        return jax.device_put(state, self.device)

    def place_batch(self, batch):
        return jax.device_put(batch, self.device)

    place_global = place_batch

    def compile(self, step_fn: Callable, abstract_state=None, example: tuple | None = None):
        """`step_fn(state, batch, rng) -> (state, metrics)`, the state donated; compiled now when
        given `example` arguments (see `compile_ahead`)."""
        return compile_ahead(jax.jit(step_fn, donate_argnums=(0,)), example)

    def compile_eval(self, eval_fn: Callable, abstract_state=None):
        """`eval_fn(state, batch, rng) -> metrics`."""
        return jax.jit(eval_fn)

    def compile_init(self, init_fn: Callable, abstract_state):
        """`init_fn()` as one program (`closed_over_as_arguments`), its output committed to the
        device like the states steps return, so the first step's output does not trigger a second
        compilation of the eval step."""
        program, arrays = closed_over_as_arguments(init_fn)
        jitted = jax.jit(program, out_shardings=jax.sharding.SingleDeviceSharding(self.device))
        return lambda: jitted(*self.place_state(arrays))

    def state_to_host(self, state):
        return state

    def metrics_to_host(self, metrics):
        return to_host(metrics)


def fsdp_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """Split the largest axis divisible by the fsdp size; small or indivisible arrays replicate."""
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < _MIN_FSDP_SIZE:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp == 0:
            return P(*([None] * axis + ["fsdp"]))
    return P()


def _placed(tree, shardings):
    """`tree` put on `shardings`, from every process's whole copy when there are several (arrays on
    one local device cannot move to other hosts: they go via numpy)."""
    if jax.process_count() > 1:
        tree = jax.tree.map(lambda x: np.asarray(x) if getattr(x, "is_fully_addressable", True) else x, tree)
    return jax.device_put(tree, shardings)


class Mesh:
    """`jax.jit` over a (data, fsdp) device mesh with explicit NamedShardings.

    The batch is split over both axes; parameters and optimizer state over `fsdp` (see
    `fsdp_spec`). Batches are built from each process's rows with
    `jax.make_array_from_process_local_data`, so multi-host runs feed local data only.

    A population of `population` replicas (states and batches with a leading replica axis) puts
    that axis over `data` when it divides the replicas, each replica's rows then over `fsdp`;
    otherwise the replicas stay whole on every device and the rows split as without one.
    """

    name = "mesh"
    reduce = Reduction()
    num_shards = 1

    def __init__(self, data: int = -1, fsdp: int = 1, population: int | None = None):
        n = jax.device_count()
        if fsdp < 1 or n % fsdp:
            raise UserError(f"train.mesh_fsdp={fsdp} does not divide the {n} devices")
        if data == -1:
            data = n // fsdp
        if data * fsdp != n:
            raise UserError(f"train.mesh_data={data} x train.mesh_fsdp={fsdp} != {n} devices")
        if population is not None and jax.process_count() > 1:
            raise UserError("a population runs on one process's devices for now (train.population, --population.*)")
        self.mesh = jax.make_mesh((data, fsdp), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
        self.fsdp = fsdp
        self.population = population
        self.replica_axis = "data" if population is not None and population % data == 0 else None
        rows = "fsdp" if self.replica_axis else ("data", "fsdp")
        self.batch_sharding = NamedSharding(self.mesh, P(rows) if population is None else P(self.replica_axis, rows))
        self.replicated = NamedSharding(self.mesh, P())

    @property
    def batch_divisor(self) -> int:
        """A process's rows (of each replica) must split evenly over its own devices (its fsdp
        axis, when replicas split over data)."""
        return self.fsdp if self.replica_axis else jax.local_device_count()

    def model_sharding(self, tree):
        """FSDP shardings (`fsdp_spec`) of arrays without a replica axis: one model's params."""
        return jax.tree.map(lambda x: NamedSharding(self.mesh, fsdp_spec(np.shape(x), self.fsdp)), tree)

    def state_sharding(self, abstract_state):
        if self.population is None:
            return self.model_sharding(abstract_state)
        return jax.tree.map(
            lambda x: NamedSharding(self.mesh, P(self.replica_axis, *fsdp_spec(x.shape[1:], self.fsdp))), abstract_state)

    def place_state(self, state):
        return _placed(state, self.state_sharding(state))

    def place_model(self, params):
        """Params without a replica axis (loaded for a fine-tuning stage, frozen models) as FSDP shards."""
        return _placed(params, self.model_sharding(params))

    def place_batch(self, batch):
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self.batch_sharding, x), batch)

    def place_global(self, batch):
        """Like `place_batch`, from the whole global batch, which every process holds: each process
        puts on its devices the rows they own (PPO's rollouts, which all processes see whole)."""
        return jax.tree.map(
            lambda x: jax.make_array_from_callback(x.shape, self.batch_sharding, lambda index: x[index]), batch)

    def _under_mesh(self, jitted: Callable) -> Callable:
        def run(*args):
            with jax.set_mesh(self.mesh):
                return jitted(*args)

        return run

    def compile(self, step_fn: Callable, abstract_state, example: tuple | None = None):
        state_sharding = self.state_sharding(abstract_state)
        jitted = jax.jit(
            step_fn,
            in_shardings=(state_sharding, self.batch_sharding, self.replicated),
            out_shardings=(state_sharding, self.replicated),
            donate_argnums=(0,),
        )
        if example is None:
            return self._under_mesh(jitted)
        with jax.set_mesh(self.mesh):  # tracing needs the mesh; the compiled step does not
            return compile_ahead(jitted, example)

    def compile_eval(self, eval_fn: Callable, abstract_state):
        return self._under_mesh(jax.jit(
            eval_fn,
            in_shardings=(self.state_sharding(abstract_state), self.batch_sharding, self.replicated),
            out_shardings=self.replicated,
        ))

    def compile_init(self, init_fn: Callable, abstract_state):
        """`init_fn()` as one program whose output is the sharded state: what it closes over (the
        loaded params of a fine-tuning stage) goes in as FSDP shards (`closed_over_as_arguments`),
        so no device ever holds the whole state (Adam's moments included)."""
        program, arrays = closed_over_as_arguments(init_fn)
        jitted = jax.jit(program, out_shardings=self.state_sharding(abstract_state))
        return lambda: jitted(*self.place_model(arrays))

    def state_to_host(self, state):
        return state

    def metrics_to_host(self, metrics):
        return to_host(metrics)


class Pmap:
    """`jax.pmap` data parallelism over the local devices; the state is replicated per device."""

    name = "pmap"
    reduce = Reduction(mean=lambda tree: jax.lax.pmean(tree, PMAP_AXIS),
                       max=lambda tree: jax.lax.pmax(tree, PMAP_AXIS))

    def __init__(self):
        self.devices = jax.local_devices()
        self.num_shards = len(self.devices)

    @property
    def batch_divisor(self) -> int:
        return self.num_shards

    def place_state(self, state):
        stacked = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (self.num_shards, *np.shape(x))), state)
        return jax.pmap(identity, devices=self.devices)(stacked)

    def place_batch(self, batch):
        return jax.tree.map(lambda x: x.reshape(self.num_shards, -1, *x.shape[1:]), batch)

    place_global = place_batch  # one process: its batch is the global one

    def _pmap(self, fn: Callable, donate: bool) -> Callable:
        """pmap over the local devices; each device folds its index into the shared rng."""

        def per_device(state, batch, rng):
            return fn(state, batch, jax.random.fold_in(rng, jax.lax.axis_index(PMAP_AXIS)))

        return jax.pmap(per_device, axis_name=PMAP_AXIS, in_axes=(0, 0, None),
                        donate_argnums=(0,) if donate else (), devices=self.devices)

    def compile(self, step_fn: Callable, abstract_state=None, example: tuple | None = None):
        return compile_ahead(self._pmap(step_fn, donate=True), example)

    def compile_eval(self, eval_fn: Callable, abstract_state=None):
        return self._pmap(eval_fn, donate=False)

    def compile_init(self, init_fn: Callable, abstract_state):
        program, arrays = closed_over_as_arguments(init_fn)
        return lambda: self.place_state(jax.jit(program)(*arrays))

    def state_to_host(self, state):
        return jax.tree.map(lambda x: x[0], state)

    def metrics_to_host(self, metrics):
        """Metrics are already reduced, hence equal on every device: device 0's copy."""
        return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)).reshape(x.shape[1:]), metrics)


def make_strategy(cfg: TrainConfig, population: int | None = None):
    """The strategy of `cfg.strategy`; `population`: the replicas of a population's stacked
    states and batches (under `mesh`, where they go on the mesh), None without one."""
    if cfg.strategy != "mesh" and jax.process_count() > 1:
        raise UserError(f"train.strategy={cfg.strategy} runs on one process's devices; with "
                        f"{jax.process_count()} processes use train.strategy=mesh")
    if cfg.strategy == "single":
        return Single()
    if cfg.strategy == "pmap":
        return Pmap()
    return Mesh(cfg.mesh_data, cfg.mesh_fsdp, population)

