"""The run directory: config.json, metrics.jsonl, TensorBoard events, checkpoints/, samples."""

from __future__ import annotations

import json
from pathlib import Path

import jax

from genai_jax import config as config_lib
from genai_jax.config import RunConfig, UserError

CONFIG_FILE = "config.json"


def read_config(run_dir: Path) -> RunConfig:
    path = run_dir / CONFIG_FILE
    if not path.exists():
        raise UserError(f"{run_dir}: not a run directory (no {CONFIG_FILE})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    return config_lib.from_dict(data, where=str(path))


def check_resumable(run_dir: Path, cfg: RunConfig) -> RunConfig:
    """The saved config of an existing run, refusing model or data changes (they would not load).

    Training and optimizer settings may change between launches (e.g. more steps)."""
    saved = read_config(run_dir)
    changed = [name for name in config_lib.diff(saved, cfg) if name.split(".")[0] in ("model", "data")]
    if changed:
        raise UserError(
            f"{run_dir} holds a run with a different config ({', '.join(changed)}); "
            "use a new --run-dir or the saved settings"
        )
    return saved


def write_config(run_dir: Path, cfg: RunConfig) -> None:
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / CONFIG_FILE).write_text(config_lib.dumps(cfg))


class MetricsWriter:
    """Appends records to metrics.jsonl and mirrors numeric fields to TensorBoard (process 0 only)."""

    def __init__(self, run_dir: Path, start_step: int = 0):
        """Records after `start_step` (left by a run that stopped after its last checkpoint) are
        dropped, so a resumed run's log has each step once; a run starting at step 0 starts a new log."""
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter

        path = run_dir / "metrics.jsonl"
        if path.exists():
            # a run starting over at step 0 (it stopped before its first checkpoint) starts a new log
            kept = [record for record in read_metrics(run_dir) if 0 < start_step and record["step"] <= start_step]
            path.write_text("".join(json.dumps(record) + "\n" for record in kept))
        self.file = open(run_dir / "metrics.jsonl", "a")
        self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)):
                self.tensorboard.add_scalar(name, value, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tensorboard.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def print_final(stage: str, run_dir, final: dict) -> None:
    """One line with a finished stage's final metrics (nothing on processes other than 0, whose
    `final` is empty)."""
    if final:
        print(f"{stage} finished in {run_dir}: " + ", ".join(
            f"{name} {value:.4g}" for name, value in final.items() if name != "step"))
