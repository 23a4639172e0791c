"""Compile strategies for the one train step: `single` (jit), `mesh` (jit + NamedSharding), `pmap`.

A strategy knows how to place the state and a host batch on devices, how to compile a step
`fn(state, batch, rng)`, and how to bring state and metrics back to the host. The step itself is
the same function under all three; only `reduce` differs (identity under jit, where arrays are
global; `lax.pmean` over "data" under pmap).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from genai_jax.config import TrainConfig, UserError

PMAP_AXIS = "data"
# Arrays smaller than this stay replicated under FSDP: splitting them saves nothing.
_MIN_FSDP_SIZE = 2**14


def identity(tree):
    return tree


def to_host(tree) -> Any:
    """Numpy copies of (possibly sharded, possibly multi-process) replicated arrays."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else x, tree)


class Single:
    """One device, plain `jax.jit`, state donated."""

    name = "single"
    reduce = staticmethod(identity)
    num_shards = 1
    batch_divisor = 1

    def __init__(self):
        self.device = jax.local_devices()[0]

    def place_state(self, state):
        return jax.device_put(state, self.device)

    def place_batch(self, batch):
        return jax.device_put(batch, self.device)

    def compile(self, step_fn: Callable, abstract_state=None):
        """`step_fn(state, batch, rng) -> (state, metrics)`, the state donated."""
        return jax.jit(step_fn, donate_argnums=(0,))

    def compile_eval(self, eval_fn: Callable, abstract_state=None):
        """`eval_fn(state, batch, rng) -> metrics`."""
        return jax.jit(eval_fn)

    def compile_init(self, init_fn: Callable, abstract_state):
        return jax.jit(init_fn)

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


class Mesh:
    """`jax.jit` over a (data, fsdp) device mesh with explicit NamedShardings.

    The batch is split over both axes; parameters and optimizer state over `fsdp` (see
    `fsdp_spec`). Batches are built from each process's rows with
    `jax.make_array_from_process_local_data`, so multi-host runs feed local data only.
    """

    name = "mesh"
    reduce = staticmethod(identity)
    num_shards = 1

    def __init__(self, data: int = -1, fsdp: int = 1):
        n = jax.device_count()
        if fsdp < 1 or n % fsdp:
            raise UserError(f"train.mesh_fsdp={fsdp} does not divide the {n} devices")
        if data == -1:
            data = n // fsdp
        if data * fsdp != n:
            raise UserError(f"train.mesh_data={data} x train.mesh_fsdp={fsdp} != {n} devices")
        self.mesh = jax.make_mesh((data, fsdp), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
        self.fsdp = fsdp
        self.batch_sharding = NamedSharding(self.mesh, P(("data", "fsdp")))
        self.replicated = NamedSharding(self.mesh, P())

    @property
    def batch_divisor(self) -> int:
        """A process's rows must split evenly over its own devices."""
        return jax.local_device_count()

    def state_sharding(self, abstract_state):
        return jax.tree.map(lambda x: NamedSharding(self.mesh, fsdp_spec(x.shape, self.fsdp)), abstract_state)

    def place_state(self, state):
        return jax.device_put(state, self.state_sharding(state))

    def place_batch(self, batch):
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self.batch_sharding, x), batch)

    def _under_mesh(self, jitted: Callable) -> Callable:
        def run(*args):
            with jax.set_mesh(self.mesh):
                return jitted(*args)

        return run

    def compile(self, step_fn: Callable, abstract_state):
        state_sharding = self.state_sharding(abstract_state)
        return self._under_mesh(jax.jit(
            step_fn,
            in_shardings=(state_sharding, self.batch_sharding, self.replicated),
            out_shardings=(state_sharding, self.replicated),
            donate_argnums=(0,),
        ))

    def compile_eval(self, eval_fn: Callable, abstract_state):
        return self._under_mesh(jax.jit(
            eval_fn,
            in_shardings=(self.state_sharding(abstract_state), self.batch_sharding, self.replicated),
            out_shardings=self.replicated,
        ))

    def compile_init(self, init_fn: Callable, abstract_state):
        return jax.jit(init_fn, out_shardings=self.state_sharding(abstract_state))

    def state_to_host(self, state):
        return state

    def metrics_to_host(self, metrics):
        return to_host(metrics)


class Pmap:
    """`jax.pmap` data parallelism over the local devices; the state is replicated per device."""

    name = "pmap"
    reduce = staticmethod(lambda tree: jax.lax.pmean(tree, PMAP_AXIS))

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

    def _pmap(self, fn: Callable, donate: bool) -> Callable:
        """pmap over the local devices; each device folds its index into the shared rng."""

        def per_device(state, batch, rng):
            return fn(state, batch, jax.random.fold_in(rng, jax.lax.axis_index(PMAP_AXIS)))

        return jax.pmap(per_device, axis_name=PMAP_AXIS, in_axes=(0, 0, None),
                        donate_argnums=(0,) if donate else (), devices=self.devices)

    def compile(self, step_fn: Callable, abstract_state=None):
        return self._pmap(step_fn, donate=True)

    def compile_eval(self, eval_fn: Callable, abstract_state=None):
        return self._pmap(eval_fn, donate=False)

    def compile_init(self, init_fn: Callable, abstract_state):
        return lambda: self.place_state(jax.jit(init_fn)())

    def state_to_host(self, state):
        return jax.tree.map(lambda x: x[0], state)

    def metrics_to_host(self, metrics):
        """Metrics are already reduced, hence equal on every device: device 0's copy."""
        return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)).reshape(x.shape[1:]), metrics)


def make_strategy(cfg: TrainConfig):
    if cfg.strategy == "single":
        return Single()
    if cfg.strategy == "pmap":
        return Pmap()
    return Mesh(cfg.mesh_data, cfg.mesh_fsdp)

