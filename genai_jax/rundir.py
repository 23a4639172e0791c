"""The run directory: config.json, metrics.jsonl, TensorBoard events, checkpoints/, samples.

A run directory is a local path or a bucket URL (gs://bucket/run): every file in it is read and
written through etils' `epath`, as orbax writes the checkpoints.
"""

from __future__ import annotations

import json
import os
import time

import jax
from etils import epath

from genai_jax import config as config_lib
from genai_jax import replica_log
from genai_jax.config import RunConfig, UserError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` is a URL (gs://, s3://, ...) rather than a local path."""
    return "://" in os.fspath(path)


def read_config(run_dir: epath.Path) -> RunConfig:
    path = run_dir / CONFIG_FILE
    if not path.exists():
        raise UserError(f"{run_dir}: not a run directory (no {CONFIG_FILE})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    return config_lib.from_dict(data, where=str(path))


def check_resumable(run_dir: epath.Path, cfg: RunConfig) -> RunConfig:
    """The saved config of an existing run, refusing model, data, lora or population changes (they
    would not load: lora.* shapes the parameter tree, the population its leading axis).

    Training and optimizer settings may change between launches (e.g. more steps)."""
    saved = read_config(run_dir)
    changed = [name for name in config_lib.diff(saved, cfg)
               if name.split(".")[0] in ("model", "data", "lora", "population") or name == "train.population"]
    if changed:
        raise UserError(
            f"{run_dir} holds a run with a different config ({', '.join(changed)}); "
            "use a new --run-dir or the saved settings"
        )
    return saved


def write_config(run_dir: epath.Path, cfg: RunConfig) -> None:
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / CONFIG_FILE).write_text(config_lib.dumps(cfg))


def tensorboard_run(record: dict) -> str:
    """The TensorBoard run (sub-directory of tensorboard/) a record's curves go to: a population's
    replicas (`replica_K`) and its mean and std (`population_mean`, ...) each get one, so
    TensorBoard draws one curve per replica; an ordinary run's records go to tensorboard/ itself."""
    if "replica" in record:
        return f"replica_{record['replica']}"
    if "population" in record:
        return f"population_{record['population']}"
    return ""


class MetricsWriter:
    """Appends records to metrics.jsonl and mirrors numeric fields to TensorBoard (process 0 only).

    A local log gets each record at once. A bucket's objects cannot be appended to (nor rewritten
    more than about once a second), so there the whole log is rewritten at most every
    `REMOTE_REWRITE_SECONDS`, on `flush` (with every checkpoint, so that a resumed run's log has no
    gap) and on close."""

    REMOTE_REWRITE_SECONDS = 30.0

    def __init__(self, run_dir: epath.Path, start_step: int = 0):
        """Records after `start_step` (left by a run that stopped after its last checkpoint) are
        dropped, so a resumed run's log has each step once; a run starting at step 0 starts a new log."""
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter  # only process 0 writes events, so only it pays for the import

        self.path = run_dir / METRICS_FILE
        # a run starting over at step 0 (it stopped before its first checkpoint) starts a new log
        kept = [record for record in read_metrics(run_dir) if record["step"] <= start_step] if start_step else []
        self.lines = [json.dumps(record) + "\n" for record in kept]
        self.path.write_text("".join(self.lines))
        self.remote = is_remote(run_dir)
        self.file = None if self.remote else self.path.open("a")
        self.rewritten_at = time.monotonic()
        self.tensorboard_dir = run_dir / "tensorboard"
        self.make_tensorboard = SummaryWriter
        self.tensorboards = {}

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        line = json.dumps(record) + "\n"
        if self.remote:
            self.lines.append(line)
            if time.monotonic() - self.rewritten_at >= self.REMOTE_REWRITE_SECONDS:
                self.flush()
        else:
            self.file.write(line)
            self.file.flush()
        run = tensorboard_run(record)
        if run not in self.tensorboards:
            self.tensorboards[run] = self.make_tensorboard(os.fspath(self.tensorboard_dir / run))
        for name, value in record.items():
            if name not in ("step", "replica", "seed") and isinstance(value, (int, float)):
                self.tensorboards[run].add_scalar(name, value, record["step"])

    def write_all(self, records: list[dict]) -> dict:
        """Write every record; returns the first (an ordinary run's only one, a population's mean)."""
        for record in records:
            self.write(record)
        return records[0]

    def flush(self) -> None:
        """Every record so far into the log (local records are there already)."""
        if self.enabled and self.remote:
            self.path.write_text("".join(self.lines))
            self.rewritten_at = time.monotonic()

    def close(self) -> None:
        if self.enabled:
            self.flush()
            if not self.remote:
                self.file.close()
            for tensorboard in self.tensorboards.values():
                tensorboard.close()


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The records of a run's metrics.jsonl (none when it has no log yet); a line that is not a
    JSON object is refused with the file and line."""
    path = epath.Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return replica_log.parse_records(path.read_text(), path)


def imported_from(run_dir: str | os.PathLike) -> str | None:
    """The Hugging Face folder a run directory was imported from (`hf.import_hf`'s first record),
    None for a run trained here."""
    records = read_metrics(run_dir)[:1]
    return records[0].get("imported_from") if records else None


def pretrained_elsewhere(run_dir: str | os.PathLike) -> str | None:
    """Where the model at the root of a run's lineage was imported from (`imported_from`): the run
    itself, the run it was fine-tuned from (train.init_from; a PPO run's ppo.policy), and so on
    back; None for a lineage pretrained here, or one whose runs are gone."""
    run, seen = epath.Path(run_dir), set()
    while (run / CONFIG_FILE).exists() and run not in seen:
        seen.add(run)
        if source := imported_from(run):
            return source
        cfg = read_config(run)
        if not (parent := cfg.train.init_from or cfg.ppo.policy):
            return None
        run = epath.Path(parent)
    return None


def print_final(stage: str, run_dir, final: dict) -> None:
    """One line with a finished stage's final metrics (nothing on processes other than 0, whose
    `final` is empty)."""
    if final:
        print(f"{stage} finished in {run_dir}: " + ", ".join(
            f"{name} {value:.4g}" for name, value in final.items() if name != "step"))
