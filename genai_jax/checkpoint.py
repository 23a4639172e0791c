"""An orbax CheckpointManager holding the train state and the data iterator's position."""

from __future__ import annotations

import os

import orbax.checkpoint as ocp
from etils import epath

from genai_jax import rundir


class Checkpointer:
    """Checkpoints under `directory/<step>/` with two items: `state` (the TrainState pytree) and
    `data` (the loader's iterator state, JSON). Orbax writes each step to a temporary folder and
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

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
