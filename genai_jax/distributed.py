"""Multi-host start-up: every process joins the JAX distributed system before any computation, so
that the `mesh` strategy spans the devices of all hosts and each process feeds its own share of
the data (`data.loader`).

    GENAI_JAX_COORDINATOR    host:port where process 0 serves the coordinator (or JAX_COORDINATOR_ADDRESS)
    GENAI_JAX_NUM_PROCESSES  how many processes take part
    GENAI_JAX_PROCESS_ID     this process's id, 0 .. count - 1

    GENAI_JAX_DISTRIBUTED    "auto": let JAX find the cluster itself (a Cloud TPU pod slice, GKE,
                             SLURM, Open MPI), e.g. on every worker of a TPU VM pod slice

Without them, a process whose environment shows a Cloud TPU (the TPU_* variables below) also lets
JAX set itself up; anything else runs as one process.
"""

from __future__ import annotations

import os
import sys

import jax

from genai_jax.config import UserError

COORDINATOR = "GENAI_JAX_COORDINATOR"
NUM_PROCESSES = "GENAI_JAX_NUM_PROCESSES"
PROCESS_ID = "GENAI_JAX_PROCESS_ID"
AUTO = "GENAI_JAX_DISTRIBUTED"
# What a Cloud TPU VM sets; jax/_src/clusters reads the worker lists to find the other hosts.
TPU_VARIABLES = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "TPU_ACCELERATOR_TYPE")


def _integer(name: str) -> int | None:
    """The integer value of environment variable `name`, None when unset."""
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name}={value!r} is not an integer") from None


def _coordinator() -> str | None:
    """host:port of the coordinator, checked here because JAX fails obscurely without a port."""
    name = COORDINATOR if os.environ.get(COORDINATOR) else "JAX_COORDINATOR_ADDRESS"
    address = os.environ.get(name)
    if address is None:
        return None
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"{name}={address!r} is not host:port")
    return address


def say(message: str) -> None:
    """Print `message` on process 0 only: every process runs the same code, and N copies of a
    line help nobody."""
    if jax.process_index() == 0:
        print(message, flush=True)


def initialize() -> None:
    """Join the distributed system the environment describes, if any; a second call does nothing.

    Must run before any JAX computation: JAX fixes the set of devices when it first uses them."""
    if jax.distributed.is_initialized():
        return
    count = _integer(NUM_PROCESSES)
    if count is None:
        stray = [name for name in (COORDINATOR, PROCESS_ID) if name in os.environ]
        if stray:
            raise UserError(f"{' and '.join(stray)} set without {NUM_PROCESSES}")
        mode = os.environ.get(AUTO)
        if mode not in (None, "auto"):
            raise UserError(f"{AUTO}={mode!r}: the only value is 'auto'")
        if mode is None and not any(name in os.environ for name in TPU_VARIABLES):
            return
        jax.distributed.initialize()  # JAX finds the cluster: TPU metadata, GKE, SLURM, Open MPI
    else:
        if count < 1:
            raise UserError(f"{NUM_PROCESSES}={count} must be at least 1")
        process_id = _integer(PROCESS_ID)
        if process_id is not None and not 0 <= process_id < count:
            raise UserError(f"{PROCESS_ID}={process_id} is out of range for {NUM_PROCESSES}={count} (0 to {count - 1})")
        if count == 1:
            return
        coordinator = _coordinator()
        if coordinator is None:
            raise UserError(f"{NUM_PROCESSES}={count} needs {COORDINATOR}=host:port (where process 0 listens)")
        if process_id is None:
            raise UserError(f"{NUM_PROCESSES}={count} needs {PROCESS_ID} (0 to {count - 1})")
        # Processes on CPU exchange their collectives through gloo (the default only in recent JAX).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=count, process_id=process_id)
    if jax.process_index() == 0:  # on stderr, unlike `say`: start-up diagnostics
        print(f"distributed: {jax.process_count()} processes, {jax.local_device_count()} local devices, "
              f"{jax.device_count()} global devices", file=sys.stderr, flush=True)
