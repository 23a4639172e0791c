"""LoRA against full fine-tuning at real shapes: SFT step time, trainable parameters, optimizer
state, the compiled step's memory, and the RL stage's parameter memory.

    python experiments/bench_lora.py [--model gpt2 smollm2-135m] [--rank 8] [--batch-size 4] [--seq 256]

Models are random-weight GPT-2 124M and SmolLM2-135M shapes (their config.json fields read by
`hf.model_config`, as `import-hf` reads them); batches are random tokens under the SFT loss, every
token weighted. Both modes build their state, optimizer and objective through the stages' own
code (`runs.make_stage_init_fn`, `optim.make_stage_optimizer`, `lora.objective`), on one device
(`train.strategy=single`). Memory figures are exact byte counts of the abstract states
(`jax.eval_shape`) and XLA's buffer assignment of the compiled step (`parallel.memory_mib`).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import numpy as np

from genai_jax import hf, lora
from genai_jax.config import LoRAConfig, RunConfig, TrainConfig
from genai_jax.model import GPT, count_params
from genai_jax.objectives.masked_lm import make_masked_lm_objective
from genai_jax.optim import make_stage_optimizer
from genai_jax.parallel import Single, memory_mib
from genai_jax.runs import make_ppo_init_fn, make_stage_init_fn
from genai_jax.train import make_train_step

CONFIGS = {
    # GPT-2 124M as on the Hub (openai-community/gpt2)
    "gpt2": dict(model_type="gpt2", n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257),
    # SmolLM2-135M's config.json (HuggingFaceTB/SmolLM2-135M)
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, vocab_size=49152),
}
MIB = 2**20


def tree_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def run_config(name: str, rank: int) -> RunConfig:
    _, model = hf.model_config(CONFIGS[name], name)
    return RunConfig(model=model, train=TrainConfig(strategy="single", max_steps=1000), lora=LoRAConfig(rank=rank))


def sft_step(cfg: RunConfig, batch: dict, steps: int) -> dict:
    """Seconds per SFT train step (after one warm-up step), and the state's sizes."""
    strategy = Single()
    init_fn = make_stage_init_fn(cfg)
    abstract = jax.eval_shape(init_fn)
    state = strategy.compile_init(init_fn, abstract)()
    objective = lora.objective(make_masked_lm_objective(GPT(cfg.model).apply), cfg.lora)
    step = strategy.compile(make_train_step(objective, make_stage_optimizer(cfg)), abstract,
                            example=(state, batch, jax.random.PRNGKey(0)))
    key = jax.random.PRNGKey(0)
    state, metrics = step(state, batch, key)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch, key)
    jax.block_until_ready(metrics)
    return {"s_per_step": (time.perf_counter() - start) / steps,
            "trainable": count_params(lora.trainable(abstract.params, cfg.lora)),
            "param_mib": tree_bytes(abstract.params) / MIB, "opt_mib": tree_bytes(abstract.opt_state) / MIB,
            "step_peak_mib": (memory_mib(step) or {}).get("peak", float("nan"))}


def rl_memory(cfg: RunConfig) -> dict:
    """PPO's parameter memory: the train state ({"policy", "value"} and its optimizer state) and
    the frozen reference and reward model a full fine-tuning run holds beside it (with LoRA
    both are the state's base, `rlhf.frozen_models`)."""
    abstract = jax.eval_shape(make_ppo_init_fn(cfg))
    models = abstract.params["base"] if cfg.lora.rank else abstract.params
    frozen = 0 if cfg.lora.rank else tree_bytes(models["policy"]) + tree_bytes(models["value"])
    return {"state_mib": tree_bytes(abstract.params) / MIB + tree_bytes(abstract.opt_state) / MIB,
            "frozen_mib": frozen / MIB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode")
    args = parser.parse_args()
    print(f"device={jax.devices()[0].device_kind} batch={args.batch_size}x{args.seq} rank={args.rank} alpha=16 "
          "targets=every attention and MLP kernel; float32")
    for name in args.model:
        rng = np.random.default_rng(0)
        for rank in (0, args.rank):
            cfg = run_config(name, rank)
            tokens = rng.integers(0, cfg.model.vocab_size, (args.batch_size, args.seq + 1), dtype=np.int32)
            batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                     "weights": np.ones((args.batch_size, args.seq), np.float32)}
            sft = sft_step(cfg, batch, args.steps)
            rl = rl_memory(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, head="lm")))
            mode = f"lora r={rank}" if rank else "full"
            print(f"{name} {mode}: sft {1000 * sft['s_per_step']:,.0f} ms/step, trainable {sft['trainable']:,} params, "
                  f"params {sft['param_mib']:,.1f} MiB, optimizer state {sft['opt_mib']:,.1f} MiB, "
                  f"compiled step peak {sft['step_peak_mib']:,.0f} MiB; ppo state {rl['state_mib']:,.1f} MiB "
                  f"+ frozen reference and reward model {rl['frozen_mib']:,.1f} MiB "
                  f"= {rl['state_mib'] + rl['frozen_mib']:,.1f} MiB", flush=True)


if __name__ == "__main__":
    main()
