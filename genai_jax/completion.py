"""Whether a stage's run directory is finished, read from its files alone: the pipeline skips a
finished stage, the sweep runner counts a finished run done, and the two must agree. Free of JAX,
as the sweep runner must leave the accelerators to its runs.

Finished is more than the last checkpoint: a reward model is usable (by PPO, `score`,
`export-hf`) only with the normalisation fitted after training, so a run stopped between the two
is unfinished, and the reward stage resumed on it fits the normalisation without training.
"""

from __future__ import annotations

import json
import os

from etils import epath

NORMALIZATION_FILE = "reward_normalization.json"


def finished(run_dir: str | os.PathLike, max_steps: int | None = None) -> bool:
    """Whether `run_dir` holds the checkpoint of step `max_steps` (by default its config.json's
    train.max_steps) and, for a reward model (model.head scalar), its normalisation. Orbax writes
    each step into a temporary folder and renames it to the step number when complete."""
    run_dir = epath.Path(run_dir)
    try:
        saved = json.loads((run_dir / "config.json").read_text())
        last, head = saved["train"]["max_steps"] if max_steps is None else max_steps, saved["model"]["head"]
        steps = [int(path.name) for path in (run_dir / "checkpoints").iterdir() if path.name.isdigit()]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    done = bool(steps) and max(steps) >= last
    return done and (head != "scalar" or (run_dir / NORMALIZATION_FILE).exists())
