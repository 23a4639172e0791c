"""`genai-jax <command>`: every stage takes the same shape of flags.

    genai-jax pretrain --preset NAME --run-dir DIR [--data.path FILE] [--<section>.<field> VALUE]
    genai-jax generate --run DIR --prompt TEXT [--temperature T --top-k K --top-p P ...]

The preset supplies the defaults and tyro maps the remaining flags onto the frozen config
dataclasses. This module is the only place that wires stages together.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Callable

import tyro

from genai_jax.config import DataConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig, UserError, preset


@dataclass(frozen=True)
class StageArgs:
    """Train one stage. Running it again on the same --run-dir resumes from the latest checkpoint."""

    preset: str = "tiny"
    """Named preset supplying every default (tiny, shakespeare-char-cpu, shakespeare-char, gpt2-small)."""
    run_dir: str = ""
    """Run directory (default runs/<preset>)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def run_config(self) -> RunConfig:
        return RunConfig(model=self.model, optim=self.optim, data=self.data, train=self.train)


@dataclass(frozen=True)
class GenerateArgs:
    """Sample a continuation of a prompt from a run's latest checkpoint (KV cache, jit-compiled)."""

    run: str
    """Run directory to load."""
    prompt: str = "\n"
    max_new_tokens: int = 200
    temperature: float = 0.8
    """0 means greedy decoding."""
    top_k: int = 0
    """Keep only the k most likely tokens (0: off)."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches p (1: off)."""
    num_samples: int = 1
    seed: int = 0


def _preset_name(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
        if arg == "--preset" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--preset="):
            return arg.split("=", 1)[1]
    return StageArgs.preset


def parse_stage(argv: list[str], prog: str) -> tuple[RunConfig, str]:
    """(config, run_dir) from `--preset NAME` defaults overridden by the other flags."""
    name = _preset_name(argv)
    base = preset(name)
    defaults = StageArgs(preset=name, model=base.model, optim=base.optim, data=base.data, train=base.train)
    args = tyro.cli(StageArgs, default=defaults, args=argv, prog=f"genai-jax {prog}")
    if args.preset != name:
        raise UserError("--preset was given twice with different values")
    return args.run_config(), args.run_dir or f"runs/{name}"


def cmd_pretrain(argv: list[str]) -> None:
    from genai_jax import stages

    cfg, run_dir = parse_stage(argv, "pretrain")
    final = stages.pretrain(cfg, run_dir)
    print(f"pretrain finished in {run_dir}: " + ", ".join(f"{k} {v:.4g}" for k, v in final.items() if k != "step"))


def cmd_generate(argv: list[str]) -> None:
    from genai_jax import stages

    args = tyro.cli(GenerateArgs, args=argv, prog="genai-jax generate")
    cfg, tokenizer, params = stages.load_trained(args.run)
    prompt = tokenizer.encode(args.prompt)
    if len(prompt) == 0:
        raise UserError("--prompt is empty after tokenization")
    for i in range(args.num_samples):
        text = stages.sample_text(cfg, params, tokenizer, prompt, args.max_new_tokens, seed=args.seed + i,
                                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
        print(text)
        if i + 1 < args.num_samples:
            print("-" * 40)


COMMANDS: dict[str, Callable[[list[str]], None]] = {
    "pretrain": cmd_pretrain,
    "generate": cmd_generate,
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        known = ", ".join(COMMANDS)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"genai-jax: error: unknown command {argv[0]!r} (commands: {known})", file=sys.stderr)
            sys.exit(2)
        print(f"usage: genai-jax <command> [flags]   commands: {known}\n"
              "       genai-jax <command> --help   shows a command's flags")
        return
    try:
        COMMANDS[argv[0]](argv[1:])
    except UserError as err:
        print(f"genai-jax: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
