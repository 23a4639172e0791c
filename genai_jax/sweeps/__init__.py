"""`genai-jax sweep SPEC --sweep-dir DIR`: one training command over a grid (or a list of named
cells) of overrides and a list of seeds, each (cell, seed) an ordinary run directory under DIR
made by its saved command (DIR/runs.jsonl), then a report over seeds (docs/sweeps.md).

    spec.py    the spec file: checked, expanded into runs, reconciled with runs.jsonl
    runner.py  launching runs as subprocesses of the CLI; status files; device shares (--jobs)
    report.py  results.csv, summary.md (mean, sd, n, 95% t interval per cell) and plots

No stage module imports this package: a sweep drives the CLI and reads run directories.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Annotated

import tyro

from genai_jax.config import UserError
from genai_jax.sweeps import report, runner
from genai_jax.sweeps.spec import load_spec, plan, recorded_runs, write_records

RUNS_FILE = "runs.jsonl"


@dataclass(frozen=True)
class SweepArgs:
    """Run a spec's grid of overrides x seeds, each run an ordinary run directory under
    --sweep-dir made by its saved command (runs.jsonl); finished runs are skipped, unfinished ones
    resume; ends with a report (results.csv, summary.md, plots). Exit status: the number of failed
    runs (at most 100); 128 + N when stopped by signal N."""

    spec: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="SPEC")]
    """The spec file (TOML; see docs/sweeps.md)."""
    sweep_dir: str = ""
    """Directory of the sweep's runs (default sweeps/<spec file name>); a local or mounted path."""
    list: bool = False
    """Print the runs with their indices and status, and run nothing."""
    only: tuple[int, ...] = ()
    """Run just these indices (e.g. one per job of a SLURM array); no report at the end."""
    jobs: int = 1
    """Runs at a time on this machine, each with its own share of GPUs, TPU chips or CPU cores."""
    report: bool = False
    """Write and print the report of what the runs have finished so far, and run nothing."""


def _list(runs, records: dict[int, dict], sweep_dir: str, say) -> None:
    say(f"{'index':>5}  {'status':<11}  run (then its command)")
    for run in runs:
        record = records[run.index]
        say(f"{run.index:>5}  {runner.effective_status(sweep_dir, record):<11}  {run.name}")
        say(f"{'':>20}{record['command']}")


def main(argv: list[str], say=print) -> None:
    args = tyro.cli(SweepArgs, args=argv, prog="genai-jax sweep")
    if "://" in args.sweep_dir:
        raise UserError(f"--sweep-dir {args.sweep_dir}: a sweep directory is a local (or mounted) path: its logs "
                        "are streamed to files")
    if args.jobs < 1:
        raise UserError(f"--jobs {args.jobs}: give 1 or more")
    spec = load_spec(args.spec)
    default_dir = os.path.join("sweeps", os.path.splitext(os.path.basename(args.spec))[0])
    sweep_dir = os.path.abspath(args.sweep_dir or default_dir)
    runs_file = os.path.join(sweep_dir, RUNS_FILE)
    recorded = recorded_runs(runs_file)
    title = f"{args.spec}: genai-jax {spec.command} --preset {spec.preset}"

    def write_report(records: list[dict]) -> None:
        report.write_report(sweep_dir, records, list(spec.metrics), spec.axes, title, say, frontiers=spec.frontiers)
    if args.report and not args.list:
        if not recorded:
            raise UserError(f"{runs_file}: no such file: nothing was launched into {sweep_dir} yet")
        write_report(recorded)
        return
    runs = plan(spec, recorded, lambda record: runner.started(sweep_dir, record))
    records = {run.index: run.record(sweep_dir) for run in runs}
    selected = runs
    if args.only:
        missing = [i for i in args.only if i not in records]
        if missing:
            raise UserError(f"--only {missing[0]}: {args.spec} has no run {missing[0]} (indices: "
                            f"{', '.join(str(i) for i in sorted(records))})")
        selected = [run for run in runs if run.index in args.only]
    say(f"sweep {title}: {len(spec.cells)} cell(s) x {len(spec.seeds)} seed(s) = {len(runs)} run(s) in {sweep_dir}")
    if args.list:
        _list(selected, records, sweep_dir, say)
        if args.report and recorded:
            write_report(recorded)
        return
    shares, note = runner.machine_shares(args.jobs)
    os.makedirs(sweep_dir, exist_ok=True)
    write_records(runs_file, [records[run.index] for run in runs])
    if os.path.abspath(args.spec) != os.path.join(sweep_dir, "spec.toml"):
        shutil.copyfile(args.spec, os.path.join(sweep_dir, "spec.toml"))
    say(f"sweep: {note}")
    code = runner.execute(selected, records, sweep_dir, shares, say)
    if not args.only and code < 128:
        write_report(list(records.values()))
    if code:
        raise SystemExit(min(code, 100) if code < 128 else code)
