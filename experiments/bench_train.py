"""Train-step throughput of a preset: ms/step, tokens/s and MFU, compile time excluded.

    python experiments/bench_train.py --preset shakespeare-char-cpu
    python experiments/bench_train.py --preset gpt2-small --batch-size 16 --steps 20   # on a GPU
    python experiments/bench_train.py --preset gpt2-small --breakdown --profile /tmp/prof  # where time goes

Batches are random tokens of the preset's shape, so no data or tokenizer is needed. MFU counts
6N + 12·L·H·Q·T FLOPs per token (N non-embedding parameters) against the device's dense bf16 peak.
Imports only the model and training modules, so it runs where the data stack is not installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from functools import partial

import jax
import numpy as np

from genai_jax.config import preset
from genai_jax.model import GPT, count_params, flops_per_token, init_params
from genai_jax.objectives.lm import make_lm_objective
from genai_jax.optim import make_optimizer
from genai_jax.parallel import make_strategy
from genai_jax.train import make_init_fn, make_train_step

# Dense bf16 peak FLOP/s by device kind substring (what jax's device_kind reports).
PEAK_FLOPS = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6": 918e12,
}


def peak_flops(device) -> float | None:
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in device.device_kind.lower():
            return flops
    return None


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="shakespeare-char-cpu")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1, help="timed rounds; each is printed")
    parser.add_argument("--batch-size", type=int, help="override train.batch_size")
    parser.add_argument("--vocab-size", type=int, help="default: 65 for char presets, else 50304")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"])
    parser.add_argument("--remat", choices=["none", "full", "dots"])
    parser.add_argument("--attention", choices=["auto", "xla", "cudnn", "einsum"])
    parser.add_argument("--strategy", choices=["single", "mesh", "pmap"])
    parser.add_argument("--grad-accum", type=int)
    parser.add_argument("--moments-dtype", choices=["float32", "bfloat16"], help="AdamW's first moment")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time the forward pass and forward+backward alone (the rest is the update)")
    parser.add_argument("--profile", metavar="DIR", help="write a jax.profiler trace of 3 steps to DIR")
    return parser.parse_args()


def configure(args):
    cfg = preset(args.preset)
    vocab = args.vocab_size or (65 if cfg.data.tokenizer == "char" else 50304)
    model_updates = {"vocab_size": vocab}
    for name in ("dtype", "remat", "attention"):
        if getattr(args, name):
            model_updates[name] = getattr(args, name)
    train_updates = {k: v for k, v in {"batch_size": args.batch_size, "strategy": args.strategy}.items() if v}
    optim_updates = {k: v for k, v in {"grad_accum": args.grad_accum, "moments_dtype": args.moments_dtype}.items() if v}
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, **model_updates),
        train=dataclasses.replace(cfg.train, **train_updates),
        optim=dataclasses.replace(cfg.optim, **optim_updates),
    )


def seconds_per_call(call, n: int) -> float:
    """Mean wall seconds of `call()` (which returns device arrays) over n calls, after the last has run."""
    start = time.perf_counter()
    for _ in range(n):
        out = call()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / n


def main():
    args = parse_args()
    cfg = configure(args)
    strategy = make_strategy(cfg.train)
    optimizer = make_optimizer(cfg.optim, cfg.train.max_steps)
    init_fn = make_init_fn(partial(init_params, cfg.model), optimizer, cfg.train.seed)
    abstract_state = jax.eval_shape(init_fn)
    state = strategy.compile_init(init_fn, abstract_state)()
    objective = make_lm_objective(GPT(cfg.model).apply)
    step_fn = strategy.compile(
        make_train_step(objective, optimizer, strategy.reduce, cfg.optim.grad_accum), abstract_state)

    batch_size, length = cfg.train.batch_size, cfg.model.context_len
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(4):
        tokens = rng.integers(0, cfg.model.vocab_size, size=(batch_size, length + 1), dtype=np.int32)
        batches.append(strategy.place_batch(
            {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((batch_size, length), np.float32)}
        ))
    key = jax.random.PRNGKey(0)
    step_count = 0

    def train_step():
        nonlocal state, step_count
        state, metrics = step_fn(state, batches[step_count % len(batches)], key)
        step_count += 1
        return metrics

    start = time.perf_counter()
    seconds_per_call(train_step, args.warmup)
    compile_s = time.perf_counter() - start

    n_non_embedding = count_params(abstract_state.params, embeddings=False)
    flops = flops_per_token(cfg.model, n_non_embedding, length)
    # nanoGPT's estimate also counts the (tied) LM head's matmul, which is real work: report both.
    flops_with_head = flops_per_token(cfg.model, n_non_embedding + cfg.model.vocab_size * cfg.model.d_model, length)
    device = jax.devices()[0]
    peak = peak_flops(device)
    print(f"preset={args.preset} device={device.device_kind} x{jax.device_count()} strategy={strategy.name} "
          f"dtype={cfg.model.dtype} batch={batch_size} seq={length} params={count_params(abstract_state.params):,} "
          f"non_embedding={n_non_embedding:,} warmup+compile={compile_s:.1f}s")
    for _ in range(args.repeats):
        seconds = seconds_per_call(train_step, args.steps)
        tokens_per_s = batch_size * length / seconds
        if peak:
            mfu = f"MFU={100 * flops * tokens_per_s / peak:.1f}% (with LM head {100 * flops_with_head * tokens_per_s / peak:.1f}%)"
        else:
            mfu = "MFU=n/a (no bf16 peak known for this device)"
        print(f"ms/step={1000 * seconds:.2f} tokens/s={tokens_per_s:,.0f} TFLOP/s={flops * tokens_per_s / 1e12:.3f} {mfu}")
    if args.breakdown:
        step_seconds = seconds_per_call(train_step, args.steps)  # before reading `state`, which steps donate
        print_breakdown(objective, state.params, dict(batches[0], loss_denominator=batch_size * length), key,
                        step_seconds, args.steps)
    if args.profile:
        with jax.profiler.trace(args.profile):
            seconds_per_call(train_step, 3)
        print(f"profile of 3 steps written to {args.profile}: python experiments/profile_summary.py {args.profile}")


def print_breakdown(objective, params, batch, key, step_seconds: float, steps: int) -> None:
    """ms of the forward pass, of forward + backward, and of a whole step; the differences are the
    backward pass and the update (gradient reduction, clipping, AdamW)."""
    forward = jax.jit(objective)
    gradients = jax.jit(jax.value_and_grad(objective, has_aux=True))
    times = {}
    for name, fn in (("forward", forward), ("forward+backward", gradients)):
        jax.block_until_ready(fn(params, batch, key))
        times[name] = seconds_per_call(lambda: fn(params, batch, key), steps)
    rows = {"forward": times["forward"], "backward": times["forward+backward"] - times["forward"],
            "update": step_seconds - times["forward+backward"], "step": step_seconds}
    print("breakdown: " + " ".join(f"{name}={1000 * seconds:.2f}ms" for name, seconds in rows.items()))


if __name__ == "__main__":
    main()
