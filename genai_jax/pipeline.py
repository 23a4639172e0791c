"""The whole recipe in one call: pretrain -> sft -> reward -> ppo into one directory.

Each stage gets its own sub-directory (base/, sft/, reward/, ppo/) and its preset's per-stage
config; a finished stage (`completion.finished`: its last step reached, a reward model's
normalisation written) is skipped, an unfinished one resumes.
At the end every policy (base, SFT, PPO) is scored on the same held-out prompts, sampled and
greedy, and a summary table is printed and saved as summary.json.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from etils import epath

from genai_jax import config as config_lib
from genai_jax import population as population_lib
from genai_jax import rlhf, rundir, stages
from genai_jax.completion import finished
from genai_jax.config import GOLD_PROMPTS, RunConfig
from genai_jax.distributed import say
from genai_jax.evaluation import gold_eval
from genai_jax.runs import final_record, load_population, load_trained

STAGES = ("base", "sft", "reward", "ppo")
SUMMARY_FILE = "summary.json"


def pipeline_configs(preset_name: str, run_dir: str | os.PathLike, overrides: dict | None = None,
                     stage_overrides: dict[str, dict] | None = None) -> dict[str, RunConfig]:
    """Each stage's config: the preset for that stage, wired to the earlier stages' directories,
    with `overrides` ({"model": {...}, ...}) applied to every stage, then `stage_overrides`
    ({"ppo": {"optim": {"lr": 3e-5}}, ...}: what `overrides.parse_pipeline_flags` returns) to
    their stage alone. With train.population N the ppo stage runs under train.strategy=single
    (its population's only one) unless its strategy is given."""
    run_dir = epath.Path(run_dir)
    configs = {
        "base": config_lib.preset(preset_name, "pretrain"),
        "sft": config_lib.replace(config_lib.preset(preset_name, "sft"), train={"init_from": str(run_dir / "base")}),
        "reward": config_lib.replace(config_lib.preset(preset_name, "reward"),
                                     train={"init_from": str(run_dir / "sft")}),
        "ppo": config_lib.replace(config_lib.preset(preset_name, "ppo"),
                                  ppo={"policy": str(run_dir / "sft"), "reward": str(run_dir / "reward")}),
    }
    configs = {stage: config_lib.replace(cfg, **(overrides or {})) for stage, cfg in configs.items()}
    configs = {stage: config_lib.replace(cfg, **(stage_overrides or {}).get(stage, {})) for stage, cfg in configs.items()}
    ppo_strategy_given = "strategy" in (stage_overrides or {}).get("ppo", {}).get("train", {})
    if configs["ppo"].train.population > 1 and not ppo_strategy_given:
        # the RL stage's population runs on one device (docs/population.md)
        configs["ppo"] = config_lib.replace(configs["ppo"], train={"strategy": "single"})
    return configs


def run_pipeline(configs: dict[str, RunConfig], run_dir: str | os.PathLike, gold_prompts: int = GOLD_PROMPTS) -> dict:
    """Run (or resume, or skip) every stage, then evaluate and summarise. Returns the summary (with
    several processes, process 0 alone writes and returns it; the others return {})."""
    runners = {"base": stages.pretrain, "sft": stages.sft, "reward": stages.reward, "ppo": rlhf.ppo}
    for stage, name in (("base", "pretrain"), ("sft", "sft"), ("reward", "reward"), ("ppo", "ppo")):
        population_lib.check(configs[stage], name)  # before the first stage trains
    run_dir = epath.Path(run_dir)
    for stage in STAGES:
        stage_dir = run_dir / stage
        if finished(stage_dir, configs[stage].train.max_steps):
            say(f"pipeline: {stage} already finished in {stage_dir}, skipping")
            continue
        say(f"pipeline: {stage} -> {stage_dir}")
        rundir.print_final(stage, stage_dir, runners[stage](configs[stage], stage_dir))
    summary = summarize(run_dir, gold_prompts)  # on every process: orbax restores are collective
    if jax.process_index() != 0:
        return {}
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    print(format_summary(summary))
    return summary


SUMMARY_METRICS = {
    "base": ("val_loss",),
    "sft": ("val_loss",),
    "reward": ("val_label_accuracy", "val_gold_accuracy", "val_label_gold_agreement"),
    "ppo": ("kl", "proxy_reward", "beta"),
}


def summarize(run_dir: epath.Path, gold_prompts: int) -> dict:
    """Per stage: its final metrics of interest, and each policy's held-out gold score (0-100),
    sampled at temperature 1 (the policy PPO trains) and greedy. Of a population pipeline (the
    ppo stage a population of N replicas), each replica's summary under "replicas" and, per stage,
    their means; an earlier stage that is no population (e.g. with `--ppo.train.population N`
    alone) is every replica's."""
    population = population_lib.Population(rundir.read_config(run_dir / "ppo"))
    if not population.stacked:
        return {stage: stage_summary(run_dir, stage, None, gold_prompts) for stage in STAGES}
    shared = {stage: stage_summary(run_dir, stage, None, gold_prompts) for stage in STAGES
              if not population_lib.is_population(rundir.read_config(run_dir / stage))}
    replicas = [{stage: shared[stage] if stage in shared else stage_summary(run_dir, stage, replica.index, gold_prompts)
                 for stage in STAGES} for replica in population.replicas]

    def mean(values: list) -> float | None:
        return None if None in values else float(np.mean(values))

    means = {stage: {name: mean([summary[stage][name] for summary in replicas]) for name in replicas[0][stage]}
             for stage in STAGES}
    return means | {"replicas": replicas}


def stage_summary(run_dir: epath.Path, stage: str, replica: int | None, gold_prompts: int) -> dict:
    """`summarize`'s row of one stage's run: of an ordinary run (`replica` None), or of replica
    `replica` of a population run."""
    row = {name: final_record(run_dir / stage, replica).get(name) for name in SUMMARY_METRICS[stage]}
    if stage == "reward":
        return row
    if replica is None:
        cfg, tokenizer, params = load_trained(run_dir / stage)
    else:
        cfg, tokenizer, stacked = load_population(run_dir / stage)
        params = population_lib.take(stacked, replica)
    if cfg.data.resolved_source == "world":
        for name, temperature in (("gold_sampled", 1.0), ("gold_greedy", 0.0)):
            result = gold_eval(cfg, params, tokenizer, gold_prompts, max_new_tokens=32, temperature=temperature)
            row[name] = 100 * result["gold_score"]
    return row


def format_summary(summary: dict) -> str:
    """The summary as an aligned text table, one row per stage (a population's means), then one
    per stage and replica (`ppo/1`: replica 1's)."""
    stage_rows = {stage: row for stage, row in summary.items() if stage != "replicas"}
    for index, replica in enumerate(summary.get("replicas", [])):
        stage_rows |= {f"{stage}/{index}": row for stage, row in replica.items()}
    columns = sorted({name for row in stage_rows.values() for name in row})
    rows = [["stage", *columns]] + [
        [stage, *("" if row.get(c) is None else f"{row[c]:.4g}" for c in columns)]
        for stage, row in stage_rows.items()
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns) + 1)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows)
