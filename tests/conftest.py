"""Shared helpers: 8 forced CPU devices, tiny model and run configs, LM batches, CLI runner.

XLA_FLAGS must be set before JAX initialises its backend, so this module sets it before
anything imports jax.
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from genai_jax import cli, config, rundir  # noqa: E402
from genai_jax.config import ModelConfig  # noqa: E402
from genai_jax.model import init_params  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VOCAB = 48
NUM_DEVICES = 8

CORPUS = (
    "To be, or not to be, that is the question:\n"
    "Whether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune,\n"
    "Or to take arms against a sea of troubles\n"
    "And by opposing end them.\n"
) * 20


def cases(fast: str, **params) -> list:
    """`parametrize` values by id, every one but `fast` marked slow: the fast tier runs one
    representative of a family of equivalent cases (e.g. strategies against one device), the full
    suite all of them. A value that is a tuple fills several arguments."""
    return [pytest.param(*(value if isinstance(value, tuple) else (value,)), id=name,
                         marks=() if name == fast else pytest.mark.slow)
            for name, value in params.items()]


def tiny_model(**overrides) -> ModelConfig:
    """A 2-layer, 2-head, 32-wide model over a small fixed vocabulary."""
    base = dict(vocab_size=VOCAB, n_layer=2, n_head=2, d_model=32, context_len=16)
    return ModelConfig(**(base | overrides))


def init(cfg: ModelConfig, seed: int = 0, **kwargs):
    return init_params(cfg, jax.random.PRNGKey(seed), **kwargs)


def random_tokens(shape, seed: int = 0, vocab: int = VOCAB) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, vocab, size=shape).astype(np.int32)


def lm_batch(tokens: np.ndarray, weights: np.ndarray | None = None) -> dict:
    """An LM batch from token rows [B, T + 1]: inputs, next-token targets and weights."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    weights = np.ones(inputs.shape, np.float32) if weights is None else weights.astype(np.float32)
    return {"inputs": inputs, "targets": targets, "weights": weights}


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    paths_a = jax.tree_util.tree_flatten_with_path(a)[0]
    leaves_b = jax.tree.leaves(b)
    assert len(paths_a) == len(leaves_b)
    for (path, x), y in zip(paths_a, leaves_b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))


def tiny_run(**sections) -> config.RunConfig:
    """The `tiny` preset shrunk to seconds on CPU (batch 8 fits the 8-device mesh); `sections`
    are overrides per section, as for `config.replace`."""
    cfg = config.replace(
        config.preset("tiny"),
        model=dict(n_layer=2, n_head=2, d_model=32, context_len=32),
        optim=dict(warmup_steps=2, decay_steps=100),
        data=dict(world_docs=300),
        train=dict(batch_size=8, max_steps=4, log_every=1, eval_every=1000, eval_batches=2,
                   ckpt_every=4, sample_tokens=8, progress=False),
    )
    return config.replace(cfg, **sections)


def train_losses(run_dir) -> dict[int, float]:
    """{step: loss} of the training records in metrics.jsonl."""
    return {r["step"]: r["loss"] for r in rundir.read_metrics(run_dir) if "loss" in r}


def cli_flags(cfg: config.RunConfig, base: str = "tiny", stage: str = "pretrain") -> list[str]:
    """`--section.field VALUE` flags that turn preset `base` (for `stage`) into `cfg` on the command line."""
    flags = []
    for name in config.diff(config.preset(base, stage), cfg):
        section, field = name.split(".")
        value = getattr(getattr(cfg, section), field)
        flag = f"{section}.{field.replace('_', '-')}"
        if isinstance(value, bool):
            flags.append(f"--{flag}" if value else f"--{section}.no-{field.replace('_', '-')}")
        else:
            flags += [f"--{flag}", str(value)]
    return flags


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """`genai_jax.cli.main(argv)` in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        cli.main([str(a) for a in argv])
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def run_cli_subprocess(*argv, devices: int = NUM_DEVICES) -> subprocess.CompletedProcess:
    """`python -m genai_jax.cli ARGV` with `devices` forced CPU devices."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "genai_jax.cli", *map(str, argv)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("genai-jax: error:")]


def assert_one_error(code: int, stderr: str, *needles: str) -> None:
    """Exit code 2 and exactly one `genai-jax: error:` line, holding every needle."""
    assert code == 2
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `directory` with its bytes and mtime, to check nothing changed."""
    return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


# context_len 64 leaves room to answer the world's longest prompts (29 tokens, bucketed to 32).
BASE_RUN = tiny_run(model=dict(context_len=64), data=dict(world_docs=200))


@pytest.fixture(scope="session")
def base_run(tmp_path_factory) -> Path:
    """A finished tiny pretraining run of BASE_RUN (char tokenizer, world corpus), what
    fine-tuning tests start from; read-only."""
    from genai_jax import stages

    run_dir = tmp_path_factory.mktemp("base") / "run"
    stages.pretrain(BASE_RUN, run_dir)
    return run_dir


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A finished tiny pretraining run (char tokenizer, world corpus). Treat as read-only:
    copy it before launching anything that might write into it."""
    from genai_jax import stages

    assert jax.device_count() == NUM_DEVICES  # the mesh strategy spans all 8 forced devices
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    stages.pretrain(tiny_run(), run_dir)
    return run_dir
