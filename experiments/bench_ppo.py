"""Where an RL iteration's time goes: rollout generation (tokens/s) vs scoring vs training.

    python experiments/bench_ppo.py --pipeline runs/tiny-pipeline [--iterations 12]
    python experiments/bench_ppo.py --pipeline runs/tiny-pipeline --algorithm grpo --group-size 4 --batch-size 16

Runs a few PPO iterations from the pipeline's sft/ and reward/ runs in a temporary directory and
prints, over the iterations after the first (which compiles), the generation throughput and the
share of each phase: generation (KV-cache sampling), experience (log-probs of policy and
reference, values, reward: one forward pass each) and training (epochs x minibatches updates).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro

from genai_jax import config as config_lib
from genai_jax import rlhf, rundir

PHASES = ("generate_s", "experience_s", "train_s")


@dataclass(frozen=True)
class Args:
    pipeline: str
    """A finished `genai-jax pipeline` directory (holding sft/ and reward/)."""
    preset: str = "tiny"
    iterations: int = 12
    batch_size: int = 0
    """Prompts per iteration (0: the preset's)."""
    pack_rows: int = 0
    """ppo.pack_rows: rows of a packed minibatch (0: the default estimate, -1: no packing)."""
    algorithm: str = "ppo"
    """ppo.algorithm: ppo, grpo or rloo."""
    group_size: int = 1
    """ppo.group_size: samples per prompt (grpo and rloo need 2 or more)."""
    reward: str = ""
    """ppo.reward: the pipeline's reward model (default), gold, or python:MODULE:FUNCTION."""


def main(args: Args) -> None:
    pipeline = Path(args.pipeline)
    base = config_lib.preset(args.preset, "ppo")
    cfg = config_lib.replace(
        base, ppo={"policy": str(pipeline / "sft"), "reward": args.reward or str(pipeline / "reward"),
                   "pack_rows": args.pack_rows, "algorithm": args.algorithm, "group_size": args.group_size},
        train={"max_steps": args.iterations, "eval_every": 10**9, "ckpt_every": 10**9, "progress": False,
               "batch_size": args.batch_size or base.train.batch_size},
    )
    with tempfile.TemporaryDirectory() as run_dir:
        rlhf.ppo(cfg, Path(run_dir) / "ppo")
        records = rundir.read_metrics(Path(run_dir) / "ppo")
    packed_rows = records[0].get("packed_rows", 0)
    records = [r for r in records if "generate_s" in r][1:]
    seconds = {phase: np.mean([r[phase] for r in records]) for phase in PHASES}
    total = sum(seconds.values())
    print(f"{cfg.ppo.algorithm}: {len(records)} iterations of {cfg.train.batch_size} prompts x {cfg.ppo.group_size} "
          f"samples x {cfg.ppo.max_new_tokens} new tokens, {cfg.ppo.epochs} epochs x {cfg.ppo.minibatches} minibatches")
    print(f"packed minibatches: {packed_rows} rows of {records[0]['packed_width']} tokens, "
          f"{100 * np.mean([r['packed_updates'] for r in records]):.0f}% of the updates" if packed_rows else "no packing")
    print(f"generation: {np.mean([r['generate_tokens_per_s'] for r in records]):,.0f} tokens/s")
    print(f"per iteration: {total * 1000:.0f} ms = " + ", ".join(
        f"{phase[:-2]} {seconds[phase] * 1000:.0f} ms ({100 * seconds[phase] / total:.0f}%)" for phase in PHASES))
    per_iteration = [sum(r[phase] for phase in PHASES) for r in records]
    print(f"seconds_per_iteration: median={np.median(per_iteration):.3f} mean={np.mean(per_iteration):.3f}")


if __name__ == "__main__":
    main(tyro.cli(Args))
