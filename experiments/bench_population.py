"""A population's one program against sequential runs: a tiny SFT train step (the `tiny` sft
preset's model and batch) for populations of N = 1, 2, 4, 8, on whatever device JAX finds.

    python experiments/bench_population.py                  # N = 1 2 4 8, 20 timed steps each
    python experiments/bench_population.py --sizes 1 4 --steps 50 --batch-size 8

For each N it builds the step `genai_jax.stages.train_stage` trains with (`stages.stage_steps`:
the ordinary step under `jax.vmap`, every replica its own seed, batch and key), compiles it ahead
of time and times steady-state steps (compilation excluded). `ratio` is the population step's wall
time over N times the N = 1 step's (N sequential runs of the same length): below 1 the population
is faster. `MiB/replica` is the compiled step's peak memory (XLA's buffer assignment) over N.
Batches are random tokens, every token a response token, so no data or tokenizer is needed.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from genai_jax import config as config_lib
from genai_jax.objectives.masked_lm import make_masked_lm_objective
from genai_jax.parallel import Single, memory_mib
from genai_jax.population import Population
from genai_jax.runs import make_stage_init_fn
from genai_jax.stages import stage_steps


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per size; the fastest counts")
    parser.add_argument("--batch-size", type=int, help="override the preset's train.batch_size")
    return parser.parse_args()


def sft_config(size: int, batch_size: int | None) -> config_lib.RunConfig:
    cfg = config_lib.preset("tiny", "sft")
    return config_lib.replace(cfg, model={"vocab_size": 65},
                              train={"strategy": "single", "population": size,
                                     "batch_size": batch_size or cfg.train.batch_size})


def time_step(cfg: config_lib.RunConfig, steps: int, repeats: int) -> tuple[float, dict | None]:
    """(fastest mean seconds per step over `repeats` rounds of `steps`, the compiled step's memory)."""
    population, strategy = Population(cfg), Single()
    init_fn = make_stage_init_fn(cfg)
    abstract_state = jax.eval_shape(init_fn)
    state = strategy.compile_init(init_fn, abstract_state)()
    train_step, _ = stage_steps(cfg, population, make_masked_lm_objective, strategy.reduce)
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


def main():
    args = parse_args()
    results = {size: time_step(sft_config(size, args.batch_size), args.steps, args.repeats) for size in args.sizes}
    cfg = sft_config(1, args.batch_size)
    print(f"tiny sft step: device={jax.devices()[0].device_kind} model n_layer={cfg.model.n_layer} "
          f"d_model={cfg.model.d_model} seq={cfg.model.context_len} batch={cfg.train.batch_size} per replica, "
          f"{args.steps} steps x {args.repeats} rounds (fastest)")
    single = results[1][0] if 1 in results else None
    print(f"{'N':>3} {'ms/step':>9} {'ms/replica':>11} {'ratio':>7} {'MiB/replica':>12}")
    for size, (seconds, memory) in results.items():
        ratio = f"{seconds / (size * single):.2f}" if single else "n/a"
        per_replica = f"{memory['peak'] / size:.1f}" if memory else "n/a"
        print(f"{size:>3} {1000 * seconds:>9.1f} {1000 * seconds / size:>11.1f} {ratio:>7} {per_replica:>12}")


if __name__ == "__main__":
    main()
