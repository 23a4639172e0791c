"""A sweep's report, from its runs.jsonl and run directories alone (so it works while the sweep
runs, or after jobs on many hosts wrote into one shared directory):

    DIR/results.csv   one row per run (per replica of a population run, `population = true`): cell,
                      overrides, seed, replica, status, error, wall seconds, and every
                      final metric (a stage: the merged records of the last step of metrics.jsonl;
                      the pipeline: summary.json's STAGE.METRIC and each stage's last step as STAGE.METRIC)
    DIR/summary.md    one row per cell: each chosen metric's mean, standard deviation, n and 95%
                      Student's t interval over the finished seeds; failed runs counted apart; a
                      metric `A - B` is the per-run difference (a paired comparison)
    DIR/plots/*.png   each chosen metric against each grid axis (by cell for named cells), and
                      learning curves of the metrics logged per step, with intervals over seeds

Reading and aggregating (pure functions of records) are kept apart from plotting (matplotlib,
imported only when plotting).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Callable
from typing import Any

from genai_jax import replica_log
from genai_jax.intervals import Stat, summarize
from genai_jax.sweeps import runner

METRICS_FILE = "metrics.jsonl"  # genai_jax.rundir.METRICS_FILE (not imported: the report needs no JAX)
INTERVAL = ("95% interval: mean ± t(0.975, n - 1) · sd / √n, Student's t over the finished seeds (its quantile "
            "computed with the standard library: bisection on the t CDF, the density integrated by Simpson's rule); "
            "sd is the sample standard deviation (n - 1); one seed gives no sd and no interval")
PLOTS_MISSING = "plots skipped: matplotlib is not installed (pip install -e '.[experiments]' or '.[test]')"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_records(run_dir: str, replica: int | None = None) -> list[dict]:
    """A run's metrics.jsonl records; of a population run, replica `replica`'s own
    (`replica_log.replica_records`)."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as file:
        records = replica_log.parse_records(file.read(), path)
    return records if replica is None else replica_log.replica_records(records, replica)


def last_step(records: list[dict]) -> dict:
    """The records of the last logged step merged (e.g. its train and eval records), as
    `genai_jax.runs.final_record` gives them, without its JAX process check."""
    if not records:
        return {}
    last = records[-1]["step"]
    return {name: value for record in records if record["step"] == last for name, value in record.items()}


def final_metrics(run_dir: str, command: str, replica: int | None = None) -> dict[str, Any]:
    """A finished run's final metrics (see the module docstring), `step` left out; of a
    population run, replica `replica`'s."""
    if command != "pipeline":
        return {k: v for k, v in last_step(read_records(run_dir, replica)).items() if k != "step"}
    metrics = {}
    for stage in runner.PIPELINE_STAGES:
        metrics |= {f"{stage}.{k}": v
                    for k, v in last_step(read_records(os.path.join(run_dir, stage), replica)).items() if k != "step"}
    summary_path = os.path.join(run_dir, runner.SUMMARY_FILE)
    if os.path.exists(summary_path):
        with open(summary_path) as file:
            summary = json.load(file)
        rows = summary["replicas"][replica] if replica is not None else summary
        metrics |= {f"{stage}.{k}": v for stage, row in rows.items() if stage != "replicas"
                    for k, v in row.items() if v is not None}
    return metrics


DIFFERENCE = re.compile(r"^(\S+) - (\S+)$")


def with_differences(metrics: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """`metrics` plus each of `names` of the form `A - B` (spaces around the minus) that the run
    has both sides of: a per-run difference such as `ppo.gold_sampled - sft.gold_sampled`, whose
    interval over seeds is the paired one."""
    derived = {}
    for name in names:
        match = DIFFERENCE.match(name)
        if match and all(_number(metrics.get(side)) for side in match.groups()):
            derived[name] = metrics[match[1]] - metrics[match[2]]
    return metrics | derived


def metric_curve(run_dir: str, command: str, metric: str, replica: int | None = None) -> dict[int, float]:
    """{step: value} of a metric in a run's metrics.jsonl (a pipeline's STAGE.METRIC: in STAGE/;
    a population's replica `replica`)."""
    if command == "pipeline":
        stage, _, metric = metric.partition(".")
        if stage not in runner.PIPELINE_STAGES:
            return {}
        run_dir = os.path.join(run_dir, stage)
    return {record["step"]: record[metric] for record in read_records(run_dir, replica) if _number(record.get(metric))}


def result_rows(sweep_dir: str, records: list[dict]) -> list[dict]:
    """One row per recorded run, one per replica of a population run (seed `seed + replica`): its
    status (see runner.effective_status) and final metrics (done runs)."""
    rows = []
    for record in sorted(records, key=lambda r: r["index"]):
        status = runner.read_status(sweep_dir, record["name"])
        state = runner.effective_status(sweep_dir, record)
        run_dir = os.path.join(sweep_dir, record["name"])
        size = record.get("population", 1)
        for replica in range(size) if size > 1 else (None,):
            rows.append({"index": record["index"], "name": record["name"], "cell": record["cell"],
                         "seed": record["seed"] + (replica or 0), "replica": replica, "status": state,
                         "error": status.get("error", "") if state == "failed" else "",
                         "wall_s": status.get("wall_s"), "overrides": record["overrides"],
                         "metrics": final_metrics(run_dir, record["subcommand"], replica) if state == "done" else {}})
    return rows


def cell_table(rows: list[dict], metrics: list[str]) -> list[dict]:
    """One entry per cell (in run order): its overrides, run counts and each metric's Stat over its
    done runs (failed ones are counted, never averaged)."""
    cells: dict[str, list[dict]] = {}
    for row in rows:
        cells.setdefault(row["cell"], []).append(row)
    table = []
    for cell, members in cells.items():
        done = [row for row in members if row["status"] == "done"]
        table.append({
            "cell": cell, "overrides": members[0]["overrides"], "runs": len(members), "done": len(done),
            "failed": sum(row["status"] == "failed" for row in members),
            "stats": {m: summarize([row["metrics"][m] for row in done if _number(row["metrics"].get(m))])
                      for m in metrics},
        })
    return table


def curve_stats(curves: list[dict[int, float]]) -> list[tuple[int, Stat]]:
    """Per step, the Stat over the runs that logged it."""
    steps = sorted({step for curve in curves for step in curve})
    return [(step, summarize([curve[step] for curve in curves if step in curve])) for step in steps]


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return value


def write_csv(rows: list[dict], path: str, metrics: list[str]) -> None:
    override_keys = list(dict.fromkeys(k for row in rows for k in row["overrides"]))
    found = sorted({k for row in rows for k in row["metrics"]} - set(metrics))
    columns = ["index", "name", "cell", "seed", "replica", "status", "error", "wall_s", *override_keys, *metrics, *found]
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(columns)
        for row in rows:
            values = {**{k: row[k] for k in columns[:7]}, **row["overrides"], **row["metrics"]}
            writer.writerow([_csv_value(values.get(column)) for column in columns])


def _g(value: float) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.4g}"


WIDE_METRICS = 4  # more chosen metrics than this: one table per cell, a row per metric


def _stat_cells(stat: Stat | None) -> list[str]:
    """A metric's mean, sd, n and interval as table cells (n 0 and blanks for no finished run)."""
    if stat is None:
        return ["", "", "0", ""]
    interval = "" if math.isnan(stat.half) else f"[{_g(stat.low)}, {_g(stat.high)}]"
    return [_g(stat.mean), _g(stat.sd), str(stat.n), interval]


def _bar(stat: Stat) -> float:
    """An interval's half-width for an error bar (0 where one seed gives none)."""
    return 0.0 if math.isnan(stat.half) else stat.half


def markdown(table: list[dict], metrics: list[str], title: str, notes: list[str]) -> str:
    """summary.md: a row per cell and four columns per metric, or (more than WIDE_METRICS metrics)
    a table per cell with a row per metric."""
    lines = [f"# {title}", "", *(f"{note}" for note in notes), "", INTERVAL + ".", ""]
    if len(metrics) > WIDE_METRICS:
        for entry in table:
            lines += [f"## {entry['cell']}: {entry['runs']} run(s), {entry['done']} done, {entry['failed']} failed",
                      "", "| metric | mean | sd | n | 95% interval |", "|---|---|---|---|---|"]
            for metric in metrics:
                lines.append(f"| `{metric}` | " + " | ".join(_stat_cells(entry["stats"][metric])) + " |")
            lines.append("")
        return "\n".join(lines)
    header = ["cell", "runs", "done", "failed"]
    for metric in metrics:
        header += [f"`{metric}` mean", "sd", "n", "95% interval"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in table:
        cells = [entry["cell"], str(entry["runs"]), str(entry["done"]), str(entry["failed"])]
        for metric in metrics:
            cells += _stat_cells(entry["stats"][metric])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _file_name(*parts: str) -> str:
    return "-".join(re.sub(r"[^A-Za-z0-9._+=-]", "_", part) for part in parts) + ".png"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, figure, ax, xlabel: str | None, ylabel: str, title: str, path: str, legend: bool) -> None:
    """Label, title and write a plot to `path` (PNG), then free it."""
    if xlabel is not None:
        ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if legend:
        ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_axis(table: list[dict], axis: str, values: list, metric: str, path: str) -> None:
    """`metric` against grid axis `axis` (its values in grid order), one line per setting of the
    other overrides, with 95% interval bars."""
    plt = _pyplot()
    numeric = all(_number(v) for v in values)
    positions = {json.dumps(v): (v if numeric else i) for i, v in enumerate(values)}
    lines: dict[str, list[tuple[float, Stat]]] = {}
    for entry in table:
        stat, value = entry["stats"].get(metric), entry["overrides"].get(axis)
        if stat is None or json.dumps(value) not in positions:
            continue
        others = ", ".join(f"{k}={v}" for k, v in entry["overrides"].items() if k != axis) or metric
        lines.setdefault(others, []).append((positions[json.dumps(value)], stat))
    figure, ax = plt.subplots(figsize=(6.4, 4.4))
    for label, points in lines.items():
        points.sort(key=lambda p: p[0])
        ax.errorbar([x for x, _ in points], [s.mean for _, s in points],
                    yerr=[_bar(s) for _, s in points], marker="o", capsize=3, label=label)
    if numeric and all(v > 0 for v in values) and max(values) >= 10 * min(values):
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(range(len(values)), [str(v) for v in values])
    _save(plt, figure, ax, axis, metric, f"{metric} against {axis} (mean, 95% t interval over seeds)", path,
          legend=len(lines) > 1)


def plot_cells(table: list[dict], metric: str, path: str) -> None:
    """`metric` of each named cell, with 95% interval bars."""
    plt = _pyplot()
    entries = [entry for entry in table if entry["stats"].get(metric) is not None]
    figure, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(entries) + 2), 4.4))
    stats = [entry["stats"][metric] for entry in entries]
    ax.errorbar(range(len(entries)), [s.mean for s in stats],
                yerr=[_bar(s) for s in stats], fmt="o", capsize=4)
    ax.set_xticks(range(len(entries)), [entry["cell"] for entry in entries], rotation=20, ha="right", fontsize=8)
    _save(plt, figure, ax, None, metric, f"{metric} by cell (mean, 95% t interval over seeds)", path, legend=False)


def plot_frontier(table: list[dict], rows: list[dict], x: str, y: str, path: str) -> None:
    """Metric `y` against metric `x`: each cell's mean with its 95% interval in both directions,
    and each of its runs as a faint dot (a frontier, e.g. held-out gold against KL)."""
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(6.4, 4.4))
    for entry in table:
        sx, sy = entry["stats"].get(x), entry["stats"].get(y)
        if sx is None or sy is None:
            continue
        runs = [row["metrics"] for row in rows if row["cell"] == entry["cell"] and row["status"] == "done"
                and _number(row["metrics"].get(x)) and _number(row["metrics"].get(y))]
        (points,) = ax.plot([m[x] for m in runs], [m[y] for m in runs], ".", alpha=0.35)
        ax.errorbar([sx.mean], [sy.mean], xerr=[_bar(sx)],
                    yerr=[_bar(sy)], fmt="o", capsize=3,
                    color=points.get_color(), label=entry["cell"])
    _save(plt, figure, ax, x, y, f"{y} against {x} (cell mean, 95% t intervals; dots: runs)", path, legend=True)


def plot_curves(curves: dict[str, list[tuple[int, Stat]]], metric: str, path: str) -> None:
    """`metric` against step: one line per cell (the mean over its seeds), a band for the 95% interval."""
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(6.4, 4.4))
    for cell, points in curves.items():
        steps = [step for step, _ in points]
        means = [stat.mean for _, stat in points]
        (line,) = ax.plot(steps, means, label=cell)
        banded = [(step, stat) for step, stat in points if not math.isnan(stat.half)]
        if banded:
            ax.fill_between([s for s, _ in banded], [st.low for _, st in banded], [st.high for _, st in banded],
                            color=line.get_color(), alpha=0.2, linewidth=0)
    _save(plt, figure, ax, "step", metric, f"{metric} (mean over seeds, 95% t interval band)", path, legend=True)


def plots_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_report(sweep_dir: str, records: list[dict], metrics: list[str], axes: dict[str, list], title: str,
                 say: Callable[[str], None] = print, frontiers: tuple[tuple[str, str], ...] = ()) -> dict[str, Any]:
    """Write results.csv, summary.md and the plots (`frontiers`: (x, y) metric pairs plotted
    against each other); print summary.md and where the files are. Returns {"rows", "table", "plots"}."""
    chosen = list(dict.fromkeys([*metrics, *(m for pair in frontiers for m in pair)]))
    rows = [row | {"metrics": with_differences(row["metrics"], chosen)} for row in result_rows(sweep_dir, records)]
    table = cell_table(rows, chosen)
    write_csv(rows, os.path.join(sweep_dir, "results.csv"), metrics)
    counts = {state: sum(row["status"] == state for row in rows) for state in ("done", "failed")}
    unfinished = len(rows) - counts["done"] - counts["failed"]
    notes = [(f"{len(table)} cell(s), {len(rows)} run(s): {counts['done']} done, {counts['failed']} failed, "
              f"{unfinished} not finished. Every final metric of every run: results.csv.")]
    found = {k for row in rows for k in row["metrics"]}
    for metric in metrics:
        if counts["done"] and metric not in found:
            known = ", ".join(sorted(found)[:12]) + (", ..." if len(found) > 12 else "")
            notes.append(f"Metric `{metric}` is in no finished run (they have: {known}).")
    failures = [row for row in rows if row["status"] == "failed"]
    notes += [f"FAILED: run {row['index']} {row['name']}: {row['error']}" for row in failures]
    text = markdown(table, metrics, f"Sweep {title}", notes)
    with open(os.path.join(sweep_dir, "summary.md"), "w") as file:
        file.write(text)
    plots = []
    if not plots_available():
        say(PLOTS_MISSING)
    else:
        plot_dir = os.path.join(sweep_dir, "plots")
        os.makedirs(plot_dir, exist_ok=True)
        for metric in metrics:
            if not any(entry["stats"][metric] for entry in table):
                continue
            if axes:
                for axis, values in axes.items():
                    plots.append(os.path.join(plot_dir, _file_name(metric, "vs", axis)))
                    plot_axis(table, axis, values, metric, plots[-1])
            else:
                plots.append(os.path.join(plot_dir, _file_name(metric, "by-cell")))
                plot_cells(table, metric, plots[-1])
        for x, y in frontiers:
            if any(entry["stats"][x] and entry["stats"][y] for entry in table):
                plots.append(os.path.join(plot_dir, _file_name(y, "vs", x)))
                plot_frontier(table, rows, x, y, plots[-1])
        done = [row for row in rows if row["status"] == "done"]
        commands = {record["index"]: record["subcommand"] for record in records}
        for metric in metrics:
            curves = {}
            for cell in dict.fromkeys(row["cell"] for row in done):
                per_run = [metric_curve(os.path.join(sweep_dir, row["name"]), commands[row["index"]], metric,
                                        row["replica"]) for row in done if row["cell"] == cell]
                if any(len(curve) > 1 for curve in per_run):
                    curves[cell] = curve_stats(per_run)
            if curves:
                plots.append(os.path.join(plot_dir, _file_name(metric, "curve")))
                plot_curves(curves, metric, plots[-1])
    say(text.rstrip())
    say(f"sweep report: {os.path.join(sweep_dir, 'results.csv')}, {os.path.join(sweep_dir, 'summary.md')}"
        + (f", {len(plots)} plot(s) in {os.path.join(sweep_dir, 'plots')}" if plots else ""))
    return {"rows": rows, "table": table, "plots": plots}
