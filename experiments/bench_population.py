"""A population's one program against sequential runs, on whatever device JAX finds: a tiny SFT
train step (the `tiny` sft preset's model and batch) and a tiny PPO iteration, for N = 1, 2, 4, 8.

    python experiments/bench_population.py                  # both, N = 1 2 4 8
    python experiments/bench_population.py --sizes 1 4 --steps 50 --no-ppo
    python experiments/bench_population.py --map loop       # train.population_map=loop (jax.lax.map)

SFT: for each N it builds the step `genai_jax.stages.train_stage` trains with (`stages.stage_steps`:
the ordinary step under `jax.vmap`, every replica its own seed, batch and key), compiles it ahead
of time and times steady-state steps (compilation excluded). Batches are random tokens, every
token a response token. PPO: a throwaway pretrain -> SFT lineage (a few steps each: only shapes
matter here), then `rlhf.ppo` against the gold checker for `--iterations` iterations at each N;
an iteration is every replica's rollout (generation and scoring, one replica after another) plus
the updates (one vmapped step per minibatch), timed from the logged phases, the first iteration
(compilation) left out.

`ratio` is the population's wall time over N times the N = 1 time (N sequential runs of the same
length): below 1 the population is faster. `MiB/replica` is the compiled train step's peak memory
(XLA's buffer assignment) over N.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from genai_jax import config as config_lib
from genai_jax import rlhf, rundir, stages
from genai_jax.objectives.masked_lm import make_masked_lm_objective
from genai_jax.parallel import Single, memory_mib
from genai_jax.population import Population
from genai_jax.runs import make_stage_init_fn

ROLLOUT = ("generate_s", "experience_s")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per size; the fastest counts")
    parser.add_argument("--batch-size", type=int, help="SFT: override the preset's train.batch_size")
    parser.add_argument("--no-ppo", dest="ppo", action="store_false", help="time the SFT step only")
    parser.add_argument("--iterations", type=int, default=4, help="PPO iterations per size (the first compiles)")
    parser.add_argument("--prompts", type=int, default=16, help="PPO: prompts per iteration (train.batch_size)")
    parser.add_argument("--map", default="vmap", choices=["vmap", "loop"], help="train.population_map")
    return parser.parse_args()


def sft_config(size: int, batch_size: int | None, population_map: str) -> config_lib.RunConfig:
    cfg = config_lib.preset("tiny", "sft")
    return config_lib.replace(cfg, model={"vocab_size": 65},
                              train={"strategy": "single", "population": size, "population_map": population_map,
                                     "batch_size": batch_size or cfg.train.batch_size})


def time_step(cfg: config_lib.RunConfig, steps: int, repeats: int) -> tuple[float, dict | None]:
    """(fastest mean seconds per step over `repeats` rounds of `steps`, the compiled step's memory)."""
    population, strategy = Population(cfg), Single()
    init_fn = make_stage_init_fn(cfg)
    abstract_state = jax.eval_shape(init_fn)
    state = strategy.compile_init(init_fn, abstract_state)()
    train_step, _ = stages.stage_steps(cfg, population, make_masked_lm_objective, strategy.reduce)
    rng = np.random.default_rng(0)
    length, rows = cfg.model.context_len, cfg.train.batch_size
    tokens = rng.integers(0, cfg.model.vocab_size, size=(population.size, rows, length + 1), dtype=np.int32)
    batch = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:],
             "weights": np.ones((population.size, rows, length), np.float32)}
    batch = strategy.place_batch(batch if population.stacked else jax.tree.map(lambda x: x[0], batch))
    keys = population.keys(np.asarray(state.rng), 0)
    step_fn = strategy.compile(train_step, abstract_state, example=(state, batch, keys))
    state, metrics = step_fn(state, batch, keys)
    jax.block_until_ready(metrics)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = step_fn(state, batch, keys)
        jax.block_until_ready(metrics)
        best = min(best, (time.perf_counter() - start) / steps)
    return best, memory_mib(step_fn)


def ppo_lineage(root: Path) -> Path:
    """A tiny SFT run (from a tiny pretraining run) for PPO to start from: a few steps each."""
    short = {"max_steps": 4, "ckpt_every": 4, "eval_every": 4, "eval_batches": 1, "progress": False,
             "strategy": "single", "sample_tokens": 0}
    stages.pretrain(config_lib.replace(config_lib.preset("tiny"), data={"world_docs": 300}, train=short),
                    root / "base")
    stages.sft(config_lib.replace(config_lib.preset("tiny", "sft"), data={"world_chats": 256},
                                  train=short | {"init_from": str(root / "base")}), root / "sft")
    return root / "sft"


def time_ppo(sft_run: Path, run_dir: Path, size: int, args) -> tuple[float, float, float, float | None]:
    """(seconds per iteration, of which rollouts, of which updates, the train step's peak MiB) of
    a PPO population of `size` against the gold checker, the first iteration left out."""
    cfg = config_lib.replace(
        config_lib.preset("tiny", "ppo"), ppo={"policy": str(sft_run), "reward": "gold", "gold_prompts": 16},
        train={"population": size, "population_map": args.map, "strategy": "single", "batch_size": args.prompts, "max_steps": args.iterations,
               "eval_every": 10**9, "ckpt_every": 10**9, "progress": False},
    )
    rlhf.ppo(cfg, run_dir)
    records = rundir.read_metrics(run_dir)
    replicas = [r for r in records if "generate_s" in r and "population" not in r and r["step"] > 1]
    iterations = sorted({r["step"] for r in replicas})
    rollout = np.mean([sum(r[p] for r in replicas if r["step"] == step for p in ROLLOUT) for step in iterations])
    update = np.mean([next(r["train_s"] for r in replicas if r["step"] == step) for step in iterations])
    return rollout + update, rollout, update, records[0].get("step_memory_mib")


def print_table(rows: dict[int, tuple[float, ...]], memory: dict[int, float | None], columns: list[str]) -> None:
    """One line per N: ms of each timed part, the first part's ratio to N sequential runs, MiB per replica."""
    print(f"{'N':>3} " + " ".join(f"{name:>14}" for name in columns) + f" {'ratio':>7} {'MiB/replica':>12}")
    single = rows.get(1)
    for size, seconds in rows.items():
        ratio = f"{seconds[0] / (size * single[0]):.2f}" if single else "n/a"
        per_replica = f"{memory[size] / size:.1f}" if memory[size] else "n/a"
        print(f"{size:>3} " + " ".join(f"{1000 * s:>14.1f}" for s in seconds) + f" {ratio:>7} {per_replica:>12}")


def main():
    args = parse_args()
    sft = {size: time_step(sft_config(size, args.batch_size, args.map), args.steps, args.repeats) for size in args.sizes}
    cfg = sft_config(1, args.batch_size, args.map)
    print(f"device={jax.devices()[0].device_kind}\n"
          f"tiny sft step: n_layer={cfg.model.n_layer} d_model={cfg.model.d_model} seq={cfg.model.context_len} "
          f"batch={cfg.train.batch_size} per replica, {args.steps} steps x {args.repeats} rounds (fastest)")
    print_table({size: (seconds,) for size, (seconds, _) in sft.items()},
                {size: memory and memory["peak"] for size, (_, memory) in sft.items()}, ["ms/step"])
    if not args.ppo:
        return
    with tempfile.TemporaryDirectory() as root:
        sft_run = ppo_lineage(Path(root))
        ppo = {size: time_ppo(sft_run, Path(root) / f"ppo-{size}", size, args) for size in args.sizes}
    ppo_cfg = config_lib.preset("tiny", "ppo")
    print(f"tiny ppo iteration (gold reward): {args.prompts} prompts x {ppo_cfg.ppo.max_new_tokens} new tokens, "
          f"{ppo_cfg.ppo.epochs} epochs x {ppo_cfg.ppo.minibatches} minibatches per replica, "
          f"mean of iterations 2-{args.iterations}")
    print_table({size: times[:3] for size, times in ppo.items()}, {size: times[3] for size, times in ppo.items()},
                ["ms/iteration", "ms rollouts", "ms updates"])
    single = ppo.get(1)
    if single:
        print("updates alone: " + ", ".join(f"N={size} ratio {times[2] / (size * single[2]):.2f}"
                                            for size, times in ppo.items()))


if __name__ == "__main__":
    main()
