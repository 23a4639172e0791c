"""`genai-jax sweep`: spec checking and expansion, resume and refusal, failures, dispatch (--list,
--only, --jobs), the report against a hand computation from metrics.jsonl, and the pipeline's
per-stage flags. One small sweep of few-step pretraining runs is shared by the tests that need
real runs; the rest use the pure functions."""

import contextlib
import csv
import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, assert_one_error, error_lines, run_cli

from genai_jax import cli, config, intervals, overrides, pipeline
from genai_jax.sweeps import report, runner
from genai_jax.sweeps.spec import expand, load_spec, plan

# A pretraining run of seconds: one tiny layer, 3 steps, one device, no sample, no progress bar.
TINY = {
    "model.n-layer": 1, "model.n-head": 2, "model.d-model": 32, "model.context-len": 32,
    "train.batch-size": 8, "train.max-steps": 3, "train.eval-every": 3, "train.eval-batches": 1,
    "train.ckpt-every": 3, "train.sample-tokens": 0, "train.log-every": 1, "train.progress": False,
    "train.strategy": "single", "optim.warmup-steps": 1,
}
GRID = {"data.world-docs": [200, 300, "lots"]}  # "lots" is no integer: those runs fail


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def write_spec(path, *, command="pretrain", seeds=(0, 1), metrics=("val_loss", "loss"), fixed=None, grid=None,
               cells=None, top=""):
    lines = [f"command = {toml_value(command)}", f"seeds = {toml_value(list(seeds))}",
             f"metrics = {toml_value(list(metrics))}", top, "[fixed]"]
    lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in (TINY if fixed is None else fixed).items()]
    if grid is not None:
        lines += ["[grid]"] + [f"{json.dumps(k)} = {toml_value(v)}" for k, v in grid.items()]
    for cell in cells or []:
        lines += ["[[cells]]"] + [f"{json.dumps(k)} = {toml_value(v)}" for k, v in cell.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def sweep(spec, sweep_dir, *flags) -> tuple[int, str, str]:
    """`genai-jax sweep` in this process (its runs are subprocesses): (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main(["sweep", str(spec), "--sweep-dir", str(sweep_dir), *map(str, flags)])
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def statuses(sweep_dir) -> dict[str, dict]:
    records = [json.loads(line) for line in (sweep_dir / "runs.jsonl").read_text().splitlines()]
    return {r["name"]: runner.read_status(str(sweep_dir), r["name"]) for r in records}


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    """3 cells x 2 seeds of 3-step pretraining: run 0, then run 1 (an interrupted sweep), then the
    whole sweep two at a time; the two runs of the cell world-docs=lots fail."""
    root = tmp_path_factory.mktemp("sweep")
    spec = write_spec(root / "spec.toml", grid=GRID, top='frontiers = [["loss", "val_loss"]]')
    sweep_dir = root / "sweep"
    results = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JAX_PLATFORMS", "cpu")
        patch.setenv("JAX_COMPILATION_CACHE_DIR", str(root / "jax-cache"))  # runs of one shape compile once
        patch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        results["only 0"] = sweep(spec, sweep_dir, "--only", 0)
        results["only 1"] = sweep(spec, sweep_dir, "--only", 1)
        results["full"] = sweep(spec, sweep_dir, "--jobs", 2)
    return spec, sweep_dir, results


# ---- the spec: expansion, names, bad input ------------------------------------------------------


def test_grid_expands_to_readable_runs_with_their_commands(tmp_path):
    spec = load_spec(str(write_spec(tmp_path / "s.toml", command="pipeline", seeds=[0, 1],
                                    fixed={"ppo.kl-coef": 0.2, "train.progress": False},
                                    grid={"ppo.kl-coef": [0.05, 0.1], "ppo.optim.lr": [1e-5, 2e-5]})))
    runs = expand(spec)
    assert [r.name for r in runs] == [f"kl-coef={k},lr={lr}/seed={s}" for k in ("0.05", "0.1")
                                      for lr in ("1e-05", "2e-05") for s in (0, 1)]
    first = runs[0]
    assert first.argv("/d") == ["genai-jax", "pipeline", "--preset", "tiny", "--run-dir", "/d/" + first.name,
                                "--ppo.kl-coef", "0.05", "--train.no-progress", "--ppo.optim.lr", "1e-05",
                                "--train.seed", "0"]  # the grid's kl-coef replaces [fixed]'s
    assert first.overrides == {"ppo.kl-coef": 0.05, "ppo.optim.lr": 1e-5}
    # the CLI reads those arguments back into the run's settings, in the right stages
    argv = first.argv("/d")[2:]
    rest, stage_overrides = overrides.parse_pipeline_flags(argv)
    assert rest == ["--preset", "tiny", "--run-dir", "/d/" + first.name]
    assert stage_overrides["ppo"]["ppo"] == {"kl_coef": 0.05} and stage_overrides["ppo"]["optim"] == {"lr": 1e-5}
    assert all(stage_overrides[s]["train"] == {"progress": False, "seed": 0} for s in pipeline.STAGES)


def test_named_cells_and_colliding_names(tmp_path):
    path = write_spec(tmp_path / "s.toml", command="pipeline", seeds=[3], fixed={}, cells=[
        {"name": "no-centering", "reward.objective.reward-centering": 0.0},
        {"sft.optim.lr": 1e-4, "ppo.optim.lr": 1e-5},
        {"name": "a/b", "ppo.kl-coef": 0.1}, {"name": "a_b", "ppo.kl-coef": 0.3}])
    runs = expand(load_spec(str(path)))
    names = [r.name for r in runs]
    assert names[0] == "no-centering/seed=3"
    assert names[1] == "sft.optim.lr=0.0001,ppo.optim.lr=1e-05/seed=3"  # "lr" alone would not say which
    assert names[2] != names[3] and all(n.startswith("a_b-") for n in names[2:])  # made unique by a hash
    assert len(set(names)) == 4 and all("/" not in r.cell for r in runs)


BAD_SPECS = {
    "malformed": ("command = 'pretrain'\nseeds = [0,\n", "not valid TOML"),
    "command": ("command = 'pretrian'\n[grid]\n'optim.lr' = [1e-3]\n", "'command'"),
    "override": ("command = 'pretrain'\n[grid]\n'optim.learning-rate' = [1e-3]\n", "'optim.learning-rate'"),
    "pipeline key": ("command = 'pipeline'\n[fixed]\n'optim.lr' = 1e-3\n[grid]\n'ppo.kl-coef' = [0.1]\n", "'optim.lr'"),
    "cell key": ("command = 'sft'\n[[cells]]\nname = 'x'\n'data.nope' = 1\n", "'data.nope'"),
    "empty grid": ("command = 'pretrain'\n[grid]\n", "'grid'"),
    "empty axis": ("command = 'pretrain'\n[grid]\n'optim.lr' = []\n", "'optim.lr'"),
    "no cells": ("command = 'pretrain'\nseeds = [0]\n", "'grid'"),
    "seeds": ("command = 'pretrain'\nseeds = [0, 'one']\n[grid]\n'optim.lr' = [1e-3]\n", "'seeds'"),
    "metrics": ("command = 'pretrain'\nmetrics = ['loss', 3]\n[grid]\n'optim.lr' = [1e-3]\n", "'metrics'"),
    "frontiers": ("command = 'pretrain'\nfrontiers = [['loss']]\n[grid]\n'optim.lr' = [1e-3]\n", "'frontiers'"),
    "seed override": ("command = 'pretrain'\n[grid]\n'train.seed' = [1, 2]\n", "'train.seed'"),
    "population override": ("command = 'sft'\n[grid]\n'train.population' = [2]\n", "'train.population'"),
    "population kind": ("command = 'pretrain'\npopulation = 'yes'\n[grid]\n'optim.lr' = [1e-3]\n", "'population'"),
    "population seeds": ("command = 'pretrain'\npopulation = true\nseeds = [0, 2]\n[grid]\n'optim.lr' = [1e-3]\n",
                         "consecutive"),
}


@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_bad_spec_is_one_line_naming_file_and_key(tmp_path, capsys, case):
    text, key = BAD_SPECS[case]
    spec = tmp_path / "bad.toml"
    spec.write_text(text)
    code, _, err = run_cli(capsys, "sweep", spec, "--sweep-dir", tmp_path / "sweep")
    assert_one_error(code, err, str(spec), key)
    assert "Traceback" not in err
    assert not (tmp_path / "sweep").exists()


# ---- the pipeline's per-stage flags ---------------------------------------------------------------


def test_pipeline_flags_reach_their_stage_only(tmp_path, capsys, monkeypatch):
    built = {}
    monkeypatch.setattr(pipeline, "run_pipeline", lambda configs, run_dir, gold: built.update(configs, gold=gold))
    code, _, err = run_cli(capsys, "pipeline", "--run-dir", tmp_path / "p", "--ppo.optim.lr", "3e-5",
                           "--reward.objective.reward-centering", "0", "--reward.data.label-noise=0.16",
                           "--ppo.kl-coef", "0.1", "--model.n-layer", "2", "--sft.model.dropout", "0.1",
                           "--train.seed", "7", "--sft.data.no-pack", "--gold-prompts", "16")
    assert code == 0, err
    presets = {stage: config.preset("tiny", name) for stage, name in
               zip(pipeline.STAGES, ("pretrain", "sft", "reward", "ppo"))}
    changed = {stage: set(config.diff(presets[stage], built[stage])) for stage in pipeline.STAGES}
    wiring = {"base": set(), "sft": {"train.init_from"}, "reward": {"train.init_from"},
              "ppo": {"ppo.policy", "ppo.reward"}}
    every = {"model.n_layer", "train.seed"}
    assert changed["base"] == every
    assert changed["sft"] == every | wiring["sft"] | {"model.dropout", "data.pack"}
    assert changed["reward"] - every - wiring["reward"] == {"objective.reward_centering", "data.label_noise"}
    assert changed["ppo"] == every | wiring["ppo"] | {"optim.lr", "ppo.kl_coef"}
    assert built["ppo"].optim.lr == 3e-5 and built["ppo"].ppo.kl_coef == 0.1
    assert built["reward"].data.label_noise == 0.16
    assert built["sft"].data.pack is False and all(built[s].train.seed == 7 for s in pipeline.STAGES)
    assert built["gold"] == 16


@pytest.mark.parametrize("flag, needle", [
    ("--ppo.optim.lrr", "--ppo.optim.lrr"), ("--optim.lr", "--optim.lr"), ("--sft.ppo.kl-coef", "--sft.ppo.kl-coef"),
    ("--critic.optim.lr", "--critic.optim.lr"), ("--sft.model.norm", "'nope'")])
def test_pipeline_unknown_flag_is_one_line(tmp_path, capsys, flag, needle):
    code, _, err = run_cli(capsys, "pipeline", "--run-dir", tmp_path / "p", flag, "nope")
    assert_one_error(code, err, needle)
    assert not (tmp_path / "p").exists()


# ---- dispatch, resume, failures (the shared sweep) ----------------------------------------------


@pytest.mark.slow  # the shared sweep takes about a minute on 2 cores
def test_only_runs_what_list_shows_and_the_rerun_does_only_the_rest(finished_sweep, capsys):
    spec, sweep_dir, results = finished_sweep
    assert results["only 0"][0] == 0 and results["only 1"][0] == 0
    code, out, _ = sweep(spec, sweep_dir, "--list")
    assert code == 0
    listed = {int(words[0]): words[2] for words in map(str.split, out.splitlines()) if words and words[0].isdigit()}
    records = {r["index"]: r for r in map(json.loads, (sweep_dir / "runs.jsonl").read_text().splitlines())}
    assert listed == {i: r["name"] for i, r in records.items()}
    assert listed[0] == "world-docs=200/seed=0" and listed[5] == "world-docs=lots/seed=1"
    # --only 0 made exactly the run the list calls 0, with its saved command
    saved = rundir_config(sweep_dir / listed[0])
    assert (saved["data"]["world_docs"], saved["train"]["seed"]) == (200, 0)
    assert records[0]["argv"][-2:] == ["--train.seed", "0"] and records[0]["run_dir"] == str(sweep_dir / listed[0])
    # the full sweep skipped the runs --only had finished and launched the rest, two at a time
    full_out = results["full"][1]
    assert "2 already done, 4 to run" in full_out
    started = [line.split()[2] for line in full_out.splitlines() if line.startswith("sweep: started")]
    assert sorted(started) == ["[2]", "[3]", "[4]", "[5]"]
    launches = {name: s["launches"] for name, s in statuses(sweep_dir).items()}
    assert [launches[listed[i]] for i in range(4)] == [1, 1, 1, 1]  # (a later test relaunches run 4)
    assert "cpus 0" in statuses(sweep_dir)[listed[2]]["share"] or "cpus 1" in statuses(sweep_dir)[listed[2]]["share"]
    progress = [line for line in full_out.splitlines() if line.startswith("sweep: finished")]
    assert progress and all("done " in line and "failed " in line and "left " in line and "s/run" in line
                            for line in progress)


def rundir_config(run_dir) -> dict:
    return json.loads((run_dir / "config.json").read_text())


@pytest.mark.slow  # the shared sweep takes about a minute on 2 cores
def test_failed_runs_are_recorded_and_counted_in_the_exit_status(finished_sweep):
    spec, sweep_dir, results = finished_sweep
    code, out, _ = results["full"]
    assert code == 2  # two runs failed (world-docs=lots, both seeds)
    state = statuses(sweep_dir)
    assert [name for name, s in state.items() if s["status"] == "failed"] == ["world-docs=lots/seed=0",
                                                                             "world-docs=lots/seed=1"]
    for name in ("world-docs=lots/seed=0", "world-docs=lots/seed=1"):
        assert "--data.world-docs" in state[name]["error"] and "lots" in state[name]["error"]
        assert state[name]["returncode"] == 2
        assert (sweep_dir / (name + ".log")).read_text().count("Error parsing --data.world-docs") == 1
    assert all(state[f"world-docs={n}/seed={s}"]["status"] == "done" for n in (200, 300) for s in (0, 1))
    assert out.count("sweep: FAILED") == 2
    # one failing run alone: exit status 1
    assert sweep(spec, sweep_dir, "--only", 4)[0] == 1


@pytest.mark.slow  # the shared sweep takes about a minute on 2 cores
def test_rerunning_a_finished_sweep_runs_nothing(finished_sweep, tmp_path):
    _, sweep_dir, _ = finished_sweep
    moved = shutil.copytree(sweep_dir, tmp_path / "moved")  # also: a sweep directory that moved
    fixed_spec = write_spec(tmp_path / "spec.toml", grid={"data.world-docs": [200, 300]})  # the failed cell dropped
    before = statuses(moved)
    code, out, err = sweep(fixed_spec, moved)
    assert code == 0, err
    assert "4 already done, 0 to run" in out and "sweep: started" not in out
    after = statuses(moved)
    assert all(after[name] == before[name] for name in after)
    records = [json.loads(line) for line in (moved / "runs.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2, 3]  # the never-started failed runs are forgotten
    assert all(r["run_dir"].startswith(str(moved)) for r in records)


@pytest.mark.slow  # the shared sweep takes about a minute on 2 cores
def test_a_spec_change_to_a_started_run_is_refused_adding_a_seed_is_not(finished_sweep, tmp_path, capsys):
    _, sweep_dir, _ = finished_sweep
    before = (sweep_dir / "runs.jsonl").read_text()
    changed = write_spec(tmp_path / "changed.toml", grid=GRID, fixed=dict(TINY, **{"train.max-steps": 4}))
    code, _, err = run_cli(capsys, "sweep", changed, "--sweep-dir", sweep_dir, "--list")
    assert_one_error(code, err, str(changed), "world-docs=200/seed=0", "train.max-steps 3 -> 4")
    dropped = write_spec(tmp_path / "dropped.toml", grid={"data.world-docs": [200, "lots"]})
    code, _, err = run_cli(capsys, "sweep", dropped, "--sweep-dir", sweep_dir, "--list")
    assert_one_error(code, err, "world-docs=300/seed=0", "no longer makes it")
    more = write_spec(tmp_path / "more.toml", grid=GRID, seeds=[0, 1, 2])
    code, out, err = sweep(more, sweep_dir, "--list")
    assert code == 0 and not error_lines(err)
    rows = {words[2]: (int(words[0]), words[1]) for words in map(str.split, out.splitlines())
            if words and words[0].isdigit()}
    assert rows["world-docs=200/seed=0"] == (0, "done") and rows["world-docs=lots/seed=1"] == (5, "failed")
    assert {rows[f"world-docs={n}/seed=2"] for n in (200, 300, "lots")} == {(i, "pending") for i in (6, 7, 8)}
    assert (sweep_dir / "runs.jsonl").read_text() == before  # --list writes nothing


# ---- the report ---------------------------------------------------------------------------------


def hand_final(run_dir) -> dict:
    """The last step's records of metrics.jsonl merged, computed here from the file."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = max(r["step"] for r in records)
    merged = {}
    for record in records:
        if record["step"] == last:
            merged.update(record)
    return merged


@pytest.mark.slow  # the shared sweep takes about a minute on 2 cores
def test_report_matches_a_hand_computation(finished_sweep):
    spec, sweep_dir, _ = finished_sweep
    code, out, _ = sweep(spec, sweep_dir, "--report")
    assert code == 0 and "sweep report:" in out
    with open(sweep_dir / "results.csv") as file:
        rows = {row["name"]: row for row in csv.DictReader(file)}
    assert len(rows) == 6
    t_975_df1 = math.tan(math.pi * 0.475)  # Student's t with 1 degree of freedom is Cauchy
    summary = (sweep_dir / "summary.md").read_text()
    table = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in summary.splitlines() if line.startswith("| world-docs")}
    for docs in (200, 300):
        finals = [hand_final(sweep_dir / f"world-docs={docs}" / f"seed={s}") for s in (0, 1)]
        for s, final in enumerate(finals):
            row = rows[f"world-docs={docs}/seed={s}"]
            assert row["status"] == "done" and row["data.world-docs"] == str(docs)
            assert float(row["val_loss"]) == final["val_loss"] and float(row["loss"]) == final["loss"]
            assert float(row["grad_norm"]) == final["grad_norm"]  # every final metric is a column
        # summary.md: runs, done, failed, then mean, sd, n, interval per metric (val_loss, loss)
        for offset, metric in ((3, "val_loss"), (7, "loss")):
            a, b = (final[metric] for final in finals)
            mean, sd = (a + b) / 2, abs(a - b) / math.sqrt(2)
            half = t_975_df1 * sd / math.sqrt(2)
            cells = table[f"world-docs={docs}"]
            assert cells[:3] == ["2", "2", "0"]
            interval = f"[{mean - half:.4g}, {mean + half:.4g}]"
            assert cells[offset:offset + 4] == [f"{mean:.4g}", f"{sd:.4g}", "2", interval]
    assert table["world-docs=lots"][:3] == ["2", "0", "2"]
    for s in (0, 1):
        row = rows[f"world-docs=lots/seed={s}"]
        assert row["status"] == "failed" and "lots" in row["error"] and row["val_loss"] == ""
    assert "Student's t" in summary and "FAILED: run 4" in summary


@pytest.mark.slow  # the shared sweep takes about a minute on 2 cores
def test_report_plots_are_written(finished_sweep):
    _, sweep_dir, _ = finished_sweep
    plots = sorted(p.name for p in (sweep_dir / "plots").glob("*.png"))
    assert plots == ["loss-curve.png", "loss-vs-data.world-docs.png", "val_loss-curve.png",
                     "val_loss-vs-data.world-docs.png", "val_loss-vs-loss.png"]
    for name in plots:
        data = (sweep_dir / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


# ---- aggregation and plotting on made-up runs ---------------------------------------------------


T_975_DF2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)
"""Student's t 0.975-quantile with 2 degrees of freedom, closed form: (2p - 1) / sqrt(2 p (1 - p))."""


def test_intervals_against_closed_forms():
    """The 95% t interval's half-width: sd / sqrt(n) times t's quantile, whose closed forms at 1
    and 2 degrees of freedom are tan(pi (p - 1/2)) and T_975_DF2."""
    two = intervals.summarize([1.0, 3.0])  # mean 2, sd sqrt(2)
    assert (two.mean, two.n) == (2.0, 2) and two.sd == pytest.approx(math.sqrt(2))
    assert two.half == pytest.approx(math.tan(math.pi * 0.475) * math.sqrt(2) / math.sqrt(2), rel=1e-6)
    three = intervals.summarize([1.0, 2.0, 3.0])  # mean 2, sd 1
    assert (three.low, three.high) == pytest.approx((2 - T_975_DF2 / math.sqrt(3), 2 + T_975_DF2 / math.sqrt(3)))
    assert math.isnan(intervals.summarize([5.0]).half) and intervals.summarize([]) is None


def made_up_runs(root, values: dict[str, list[list[float]]]):
    """Run directories with metrics.jsonl: cell -> one loss curve per seed (steps 1..n, and an
    eval record at the last step)."""
    records = []
    for cell, curves in values.items():
        for seed, curve in enumerate(curves):
            name = f"{cell}/seed={seed}"
            run_dir = root / name
            run_dir.mkdir(parents=True)
            lines = [{"step": 0, "n_params": 10}] + [{"step": i + 1, "loss": v} for i, v in enumerate(curve)]
            lines.append({"step": len(curve), "val_loss": curve[-1] + 1})
            (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
            records.append({"index": len(records), "name": name, "cell": cell, "seed": seed, "subcommand": "pretrain",
                            "overrides": {"optim.lr": float(cell.split("=")[1])}})
    return records


def test_aggregation_of_made_up_metrics(tmp_path):
    records = made_up_runs(tmp_path, {"lr=0.1": [[3.0, 2.0], [3.0, 1.0], [4.0, 3.0]], "lr=0.2": [[5.0, 4.0]]})
    assert report.final_metrics(str(tmp_path / "lr=0.1/seed=1"), "pretrain") == {"loss": 1.0, "val_loss": 2.0}
    rows = [{"cell": r["cell"], "status": "done", "overrides": r["overrides"],
             "metrics": report.final_metrics(str(tmp_path / r["name"]), "pretrain")} for r in records]
    rows.append({"cell": "lr=0.2", "status": "failed", "overrides": {"optim.lr": 0.2}, "metrics": {}})
    table = report.cell_table(rows, ["loss", "val_loss"])
    first = table[0]["stats"]["loss"]  # 2, 1, 3
    assert (first.mean, first.sd, first.n) == (2.0, 1.0, 3)
    assert first.half == pytest.approx(T_975_DF2 / math.sqrt(3))
    second = table[1]
    assert (second["runs"], second["done"], second["failed"]) == (2, 1, 1)
    assert second["stats"]["loss"].n == 1 and math.isnan(second["stats"]["loss"].half)
    curve = report.curve_stats([report.metric_curve(str(tmp_path / r["name"]), "pretrain", "loss")
                                for r in records if r["cell"] == "lr=0.1"])
    assert [(step, stat.mean, stat.n) for step, stat in curve] == [(1, 10 / 3, 3), (2, 2.0, 3)]
    paths = [tmp_path / "axis.png", tmp_path / "curve.png", tmp_path / "cells.png", tmp_path / "frontier.png"]
    report.plot_axis(table, "optim.lr", [0.1, 0.2], "loss", str(paths[0]))
    report.plot_curves({"lr=0.1": curve}, "loss", str(paths[1]))
    report.plot_cells(table, "loss", str(paths[2]))
    report.plot_frontier(table, rows, "loss", "val_loss", str(paths[3]))
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_report_without_matplotlib_writes_csv_and_md(tmp_path, monkeypatch):
    records = made_up_runs(tmp_path, {"lr=0.1": [[3.0, 2.0], [3.0, 1.0]]})
    for r in records:
        runner.write_status(str(tmp_path), r["name"], {"status": "done"})
    monkeypatch.setattr(runner, "finished", lambda command, run_dir: True)  # made-up runs have no checkpoints
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    said = []
    result = report.write_report(str(tmp_path), records, ["loss"], {"optim.lr": [0.1]}, "made up", said.append)
    assert report.PLOTS_MISSING in said and result["plots"] == []
    assert (tmp_path / "results.csv").exists()
    assert "| lr=0.1 | 2 | 2 | 0 | 1.5 |" in (tmp_path / "summary.md").read_text()
    assert not (tmp_path / "plots").exists()


# ---- device shares for --jobs -------------------------------------------------------------------


def test_device_shares():
    gpus = runner.visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    shares, _ = runner.device_shares(2, {}, gpus, 0, [0, 1])
    assert [s.env for s in shares] == [{"CUDA_VISIBLE_DEVICES": "0,1"}, {"CUDA_VISIBLE_DEVICES": "2,3"}]
    listed = "GPU 0: NVIDIA H100 (UUID: GPU-a)\nGPU 1: NVIDIA H100 (UUID: GPU-b)\n"
    assert runner.visible_gpus({}, nvidia_smi=listed) == ["0", "1"]
    with pytest.raises(config.UserError, match="--jobs 3: only 2 GPU"):
        runner.device_shares(3, {}, ["0", "1"], 0, [0, 1])
    tpu, _ = runner.device_shares(4, {}, [], 8, [0, 1])
    assert [s.env["TPU_VISIBLE_CHIPS"] for s in tpu] == ["0,1", "2,3", "4,5", "6,7"]
    assert {s.env["TPU_CHIPS_PER_PROCESS_BOUNDS"] for s in tpu} == {"1,2,1"}
    assert len({s.env["TPU_MESH_CONTROLLER_PORT"] for s in tpu}) == 4
    cpu, _ = runner.device_shares(2, {"JAX_PLATFORMS": "cpu"}, ["0", "1"], 0, [0, 1, 2, 3])
    assert [s.cpus for s in cpu] == [(0, 1), (2, 3)] and cpu[0].env["OMP_NUM_THREADS"] == "2"
    assert "XLA_FLAGS" not in cpu[0].env  # the caller's XLA_FLAGS (forced devices and all) pass unchanged
    one, _ = runner.device_shares(1, {}, ["0", "1"], 0, [0, 1])
    assert one[0].env == {} and one[0].cpus == ()


def test_the_sweep_knows_the_pipeline_layout():
    """The sweep reads pipeline directories without importing the pipeline (which loads JAX)."""
    assert overrides.PIPELINE_STAGES == pipeline.STAGES and runner.SUMMARY_FILE == pipeline.SUMMARY_FILE


def test_plan_keeps_indices_of_recorded_runs(tmp_path):
    spec = load_spec(str(write_spec(tmp_path / "s.toml", grid={"optim.lr": [0.1, 0.2]})))
    first = plan(spec, [], lambda record: False)
    records = [run.record("/d") for run in first]
    wider = load_spec(str(write_spec(tmp_path / "w.toml", grid={"optim.lr": [0.05, 0.1, 0.2]}, seeds=[0, 1, 2])))
    second = plan(wider, records, lambda record: True)
    by_name = {run.name: run.index for run in second}
    assert all(by_name[r["name"]] == r["index"] for r in records)
    assert sorted(by_name.values()) == list(range(9))


def test_the_experiment_specs_list_and_the_sweep_claims_no_device(tmp_path):
    """experiments/sweeps/*.toml are valid specs; listing them (and a sweep's parent process in
    general) initialises no JAX backend, which would take GPU memory or a TPU from the runs."""
    specs = sorted(str(p) for p in (REPO / "experiments" / "sweeps").glob("*.toml"))
    assert {Path(s).name for s in specs} >= {"example.toml", "pipeline-seeds.toml", "ppo-kl.toml"}
    script = "\n".join([
        "import sys",
        "from jax._src import xla_bridge",
        "from genai_jax import cli",
        "for i, spec in enumerate(sys.argv[2:]):",
        "    cli.main(['sweep', spec, '--sweep-dir', f'{sys.argv[1]}/{i}', '--list'])",
        "print('backends initialised:', xla_bridge.backends_are_initialized())",
    ])
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path), *specs], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count(" run(s) in ") == len(specs) and "pending" in done.stdout
    assert "backends initialised: False" in done.stdout
    assert not any(tmp_path.iterdir())  # --list writes nothing


def test_a_run_another_launcher_took_meanwhile_is_left_alone(tmp_path, monkeypatch):
    """Two launchers on one sweep directory (two hosts, or --only beside a full sweep): a queued
    run is checked again when its turn comes, and one that has started elsewhere is not launched."""
    spec = load_spec(str(write_spec(tmp_path / "s.toml", grid={"optim.lr": [0.1]}, seeds=[0, 1])))
    runs = plan(spec, [], lambda record: False)
    records = {run.index: run.record(str(tmp_path)) for run in runs}
    checks = {run.index: 0 for run in runs}

    def status_now(sweep_dir, record):  # run 1 starts elsewhere after the sweep's first look
        checks[record["index"]] += 1
        return "running" if record["index"] == 1 and checks[1] > 1 else "pending"

    launched = []

    def launch(run, sweep_dir, share, slot):
        launched.append(run.index)
        process = subprocess.Popen([sys.executable, "-c", "pass"])
        return runner.Job(run, process, slot, 0.0, 0, {})

    monkeypatch.setattr(runner, "effective_status", status_now)
    monkeypatch.setattr(runner, "_launch", launch)
    monkeypatch.setattr(runner, "_finish", lambda job, sweep_dir, stopping: "done")
    said = []
    failed = runner.execute(runs, records, str(tmp_path), [runner.Share({}, ())], said.append)
    assert failed == 0 and launched == [0]
    assert any("[1]" in line and "running elsewhere: left alone" in line for line in said)


def test_a_difference_metric_is_per_run_so_its_interval_is_paired():
    runs = [{"ppo.gold": 78.0, "sft.gold": 68.0}, {"ppo.gold": 70.0, "sft.gold": 61.0}, {"ppo.gold": 75.0}]
    name = "ppo.gold - sft.gold"
    rows = [{"cell": "c", "status": "done", "overrides": {}, "metrics": report.with_differences(m, [name, "x"])}
            for m in runs]
    assert [row["metrics"].get(name) for row in rows] == [10.0, 9.0, None]  # the third lacks a side
    stat = report.cell_table(rows, [name])[0]["stats"][name]
    assert (stat.mean, stat.n) == (9.5, 2) and stat.sd == pytest.approx(math.sqrt(0.5))
    # the two sides' own spreads (4.0 and 3.5) are far wider than the difference's
    assert report.cell_table(rows, ["ppo.gold"])[0]["stats"]["ppo.gold"].sd > 3 * stat.sd


def test_many_metrics_give_a_table_per_cell_with_a_row_per_metric():
    metrics = [f"m{i}" for i in range(report.WIDE_METRICS + 1)]
    rows = [{"cell": "c", "status": "done", "overrides": {}, "metrics": {m: float(i + seed) for i, m in enumerate(metrics)}}
            for seed in range(3)]
    text = report.markdown(report.cell_table(rows, metrics), metrics, "t", [])
    assert "## c: 3 run(s), 3 done, 0 failed" in text
    half = T_975_DF2 / math.sqrt(3)  # values i, i + 1, i + 2: mean i + 1, sd 1
    assert f"| `m2` | 3 | 1 | 3 | [{3 - half:.4g}, {3 + half:.4g}] |" in text


# ---- population sweeps: each cell's seeds as one population run -------------------------------------


def test_a_population_sweep_is_one_run_per_cell(tmp_path):
    spec = load_spec(str(write_spec(tmp_path / "s.toml", seeds=[2, 3, 4], grid={"optim.lr": [1e-3, 3e-3]},
                                    top="population = true")))
    runs = plan(spec, [], lambda record: False)
    assert [r.name for r in runs] == ["lr=0.001/seeds=2-4", "lr=0.003/seeds=2-4"]
    assert runs[0].argv("/d")[-4:] == ["--train.seed", "2", "--train.population", "3"]
    assert runs[0].record("/d")["population"] == 3
    # the same spec without `population` is an ordinary sweep, so a started population run is refused
    ordinary = load_spec(str(write_spec(tmp_path / "o.toml", seeds=[2, 3, 4], grid={"optim.lr": [1e-3, 3e-3]})))
    with pytest.raises(config.UserError, match="population 3 -> 1"):
        plan(ordinary, [run.record("/d") for run in runs], lambda record: True)


@pytest.mark.slow  # a population sweep of two 3-step pretraining runs
def test_population_sweep_report_has_a_row_per_replica(tmp_path):
    spec = write_spec(tmp_path / "spec.toml", seeds=[0, 1, 2], grid={"optim.lr": [1e-3, 3e-3]},
                      top="population = true")
    code, _, err = sweep(spec, tmp_path / "sweep")
    assert code == 0, err
    assert sweep(spec, tmp_path / "sweep", "--report")[0] == 0
    with open(tmp_path / "sweep" / "results.csv") as file:
        rows = list(csv.DictReader(file))
    assert [(row["cell"], row["seed"], row["replica"]) for row in rows] == [
        (cell, str(s), str(s)) for cell in ("lr=0.001", "lr=0.003") for s in (0, 1, 2)]
    for row in rows:
        run_dir = tmp_path / "sweep" / row["name"]
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        own = [r for r in records if r.get("replica") == int(row["replica"])]
        last = [r for r in own if r["step"] == max(r["step"] for r in own)]
        assert float(row["loss"]) == [r for r in last if "loss" in r][0]["loss"]
        assert float(row["val_loss"]) == [r for r in last if "val_loss" in r][0]["val_loss"]
    assert len({row["loss"] for row in rows}) == 6  # each replica its own seed, each cell its own rate
    table = [line for line in (tmp_path / "sweep" / "summary.md").read_text().splitlines()
             if line.startswith("| lr=")]
    assert len(table) == 2 and all(line.split("|")[2].strip() == "3" for line in table)  # 3 seeds per cell
