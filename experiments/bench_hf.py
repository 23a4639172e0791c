"""Import and export of Hugging Face checkpoints at real shapes: time and peak host memory.

    python experiments/bench_hf.py --model gpt2 smollm2-135m [qwen2.5-0.5b] [--dtype bfloat16]

Each model is built with random weights by `transformers` (no download) and saved with a small
BPE tokenizer; `genai-jax import-hf` and `export-hf` then run as fresh processes, so each peak
(the process's maximum resident memory, JAX's own start-up included) is that of the command a
user runs. Needs the `hf` extra (torch, transformers).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SHAPES = {
    # GPT-2 124M as on the Hub (openai-community/gpt2)
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel,
             dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257)),
    # SmolLM2-135M's config.json (HuggingFaceTB/SmolLM2-135M)
    "smollm2-135m": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                     dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
                          rms_norm_eps=1e-5, tie_word_embeddings=True, vocab_size=49152)),
    # Qwen2.5-0.5B's config.json (Qwen/Qwen2.5-0.5B): grouped-query attention, q/k/v biases, tied
    "qwen2.5-0.5b": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
                     dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                          num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0,
                          rms_norm_eps=1e-6, tie_word_embeddings=True, vocab_size=151936)),
}


def save_random(name: str, folder: Path, dtype: str) -> None:
    config_cls, model_cls, shape = SHAPES[name]
    model = model_cls(config_cls(**shape)).to(getattr(torch, dtype))
    model.save_pretrained(folder)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(["a small corpus for a small tokenizer"],
                                  trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>").save_pretrained(folder)


def timed(*argv: str) -> tuple[float, float]:
    """(seconds, peak resident MiB) of `python -m genai_jax.cli ARGV` in a fresh process."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "genai_jax.cli", *argv], env=dict(os.environ, JAX_PLATFORMS="cpu"))
    _, status, usage = os.wait4(child.pid, 0)  # this child's own resource usage
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"genai-jax {argv[0]} failed")
    return time.perf_counter() - start, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", nargs="+", default=["gpt2", "smollm2-135m"], choices=list(SHAPES))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="the dtype the checkpoint is saved in (imports are float32 either way)")
    args = parser.parse_args()
    for name in args.model:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            save_random(name, tmp / "hf", args.dtype)
            size = sum(f.stat().st_size for f in (tmp / "hf").glob("*.safetensors")) / 2**20
            import_s, import_mib = timed("import-hf", "--from", str(tmp / "hf"), "--run-dir", str(tmp / "run"))
            export_s, export_mib = timed("export-hf", "--run", str(tmp / "run"), "--out", str(tmp / "out"))
            print(f"{name} ({args.dtype} checkpoint, {size:.0f} MiB): import {import_s:.1f} s, peak {import_mib:.0f} MiB; "
                  f"export {export_s:.1f} s, peak {export_mib:.0f} MiB", flush=True)


if __name__ == "__main__":
    main()
