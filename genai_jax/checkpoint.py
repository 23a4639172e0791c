"""An orbax CheckpointManager holding the train state and the data iterator's position."""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from etils import epath

from genai_jax import rundir


class Checkpointer:
    """Checkpoints under `directory/<step>/` with two items: `state` (the TrainState pytree, or for
    an imported model {"step", "params"} alone) and `data` (the loader's iterator state, JSON). Orbax writes each step to a temporary folder and
    renames it when complete, so an interrupted save never leaves a half-written checkpoint."""

    def __init__(self, directory: str | os.PathLike, keep: int = 2):
        directory = epath.Path(directory)
        self.manager = ocp.CheckpointManager(
            directory if rundir.is_remote(directory) else directory.absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_names=("state", "data"),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict) -> None:
        self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))
        )

    def restore(self, abstract_state, step: int | None = None):
        """(state, data_state) of `step` (default: the latest), laid out like `abstract_state`."""
        step = self.latest_step() if step is None else step
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], restored["data"]

    def restore_params(self, abstract_params, step: int | None = None):
        """Only the `params` of a checkpointed state (default: the latest step), laid out like
        `abstract_params`: orbax's partial restore reads none of the optimizer state, so loading
        a trained model takes a third of the memory and time of its whole TrainState."""
        step = self.latest_step() if step is None else step
        target = {"params": abstract_params}
        restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), target)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
            ),
        )
        return restored["state"]["params"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
