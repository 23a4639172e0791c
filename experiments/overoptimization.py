"""Over-optimisation made visible: PPO against the reward model with and without the KL penalty.

    python experiments/overoptimization.py --pipeline runs/tiny-pipeline [--iterations 150]

Starts two PPO runs from the pipeline's sft/ and reward/ runs, one with the preset's KL
coefficient and one with beta = 0, into <pipeline>/overopt-beta<coef>/ (a finished run is reused,
an unfinished one resumes). Then it prints, per stretch of iterations, the proxy reward (the
reward model's normalised score), the gold score of the same sampled responses and the KL to the
reference, and plots proxy and gold against KL for both runs (PNG). The curve to look for: with
beta = 0 the proxy keeps rising while gold stalls or falls.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro

from genai_jax import config as config_lib
from genai_jax import rlhf, rundir


@dataclass(frozen=True)
class Args:
    pipeline: str
    """A finished `genai-jax pipeline` directory (holding sft/ and reward/)."""
    preset: str = "tiny"
    iterations: int = 150
    betas: tuple[float, ...] = ()
    """KL coefficients to compare (default: the preset's and 0)."""
    smooth: int = 10
    """Iterations per point of the table and the plot (a running mean: one iteration is 64 samples)."""
    out: str = ""
    """PNG path (default <pipeline>/overoptimization.png)."""


def run(args: Args, beta: float) -> list[dict]:
    pipeline = Path(args.pipeline)
    cfg = config_lib.replace(
        config_lib.preset(args.preset, "ppo"),
        ppo={"policy": str(pipeline / "sft"), "reward": str(pipeline / "reward"), "kl_coef": beta},
        train={"max_steps": args.iterations, "eval_every": args.iterations, "ckpt_every": args.iterations},
    )
    run_dir = pipeline / f"overopt-beta{beta:g}"
    records = rundir.read_metrics(run_dir) if (run_dir / rundir.CONFIG_FILE).exists() else []
    if not any(r.get("step") == args.iterations and "proxy_reward" in r for r in records):
        rlhf.ppo(cfg, run_dir)
    return [r for r in rundir.read_metrics(run_dir) if "proxy_reward" in r]


def smoothed(records: list[dict], name: str, window: int) -> np.ndarray:
    """Means over consecutive windows of iterations."""
    values = np.array([r[name] for r in records])
    usable = len(values) // window * window
    return values[:usable].reshape(-1, window).mean(axis=1)


def main(args: Args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    betas = args.betas or (config_lib.preset(args.preset, "ppo").ppo.kl_coef, 0.0)
    figure, (proxy_axis, gold_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for beta in betas:
        records = run(args, beta)
        kl, proxy, gold = (smoothed(records, name, args.smooth) for name in ("kl", "proxy_reward", "gold_score"))
        print(f"\nbeta = {beta:g}: iterations, KL (nats/response), proxy reward, gold score (0-100) of the rollouts")
        for i, (k, p, g) in enumerate(zip(kl, proxy, gold)):
            print(f"  {i * args.smooth + 1:4d}-{(i + 1) * args.smooth:<4d} kl {k:7.3f}  proxy {p:+.3f}  gold {100 * g:5.1f}")
        proxy_axis.plot(kl, proxy, marker="o", label=f"beta = {beta:g}")
        gold_axis.plot(kl, 100 * gold, marker="o", label=f"beta = {beta:g}")
    proxy_axis.set(xlabel="KL(policy || SFT), nats per response", ylabel="proxy reward (reward model, normalised)",
                   title="proxy reward")
    gold_axis.set(xlabel="KL(policy || SFT), nats per response", ylabel="gold score of the same samples (0-100)",
                  title="gold score")
    for axis in (proxy_axis, gold_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    out = Path(args.out or Path(args.pipeline) / "overoptimization.png")
    figure.savefig(out, dpi=120)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
