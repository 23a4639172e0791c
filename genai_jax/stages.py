"""Stage runners: each builds its data, model, objective and strategy, then calls `train.fit`.

They take a config and a run directory and touch nothing else, so scripts and tests drive them
without the CLI. Running a stage again on the same directory resumes it.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

import jax
import numpy as np

from genai_jax import rundir
from genai_jax.checkpoint import Checkpointer
from genai_jax.config import RunConfig, UserError
from genai_jax.data import loader, sources
from genai_jax.model import GPT, count_params, init_params
from genai_jax.objectives.lm import make_lm_objective
from genai_jax.optim import make_optimizer, schedule
from genai_jax.parallel import Mesh, make_strategy, to_host
from genai_jax.sampling import check_length, generate
from genai_jax.tokenizer import Tokenizer, build_tokenizer, load_tokenizer
from genai_jax.train import fit, make_eval_step, make_init_fn, make_train_step


def seq_len(cfg: RunConfig) -> int:
    length = cfg.data.seq_len or cfg.model.context_len
    if length > cfg.model.context_len:
        raise UserError(f"data.seq_len={length} is longer than model.context_len={cfg.model.context_len}")
    return length


def with_vocab(cfg: RunConfig, tokenizer: Tokenizer) -> RunConfig:
    """Fill model.vocab_size from the tokenizer (rounded up to model.vocab_multiple)."""
    vocab = cfg.model.vocab_size
    if vocab == 0:
        multiple = cfg.model.vocab_multiple
        vocab = -(-tokenizer.vocab_size // multiple) * multiple
    elif vocab < tokenizer.vocab_size:
        raise UserError(f"model.vocab_size={vocab} is smaller than the tokenizer's {tokenizer.vocab_size}")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))


def restore_target(abstract_state, strategy):
    """Shapes, dtypes and shardings to restore a checkpoint into (sharded under `mesh`)."""
    if isinstance(strategy, Mesh):
        shardings = strategy.state_sharding(abstract_state)
    else:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract_state)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings
    )


def open_run(cfg: RunConfig, run_dir: Path, text: str) -> tuple[RunConfig, Tokenizer]:
    """A new run directory (tokenizer built, config written), or an existing one checked for
    compatibility. A refused run directory is left exactly as it was."""
    if (run_dir / rundir.CONFIG_FILE).exists():
        tokenizer = load_tokenizer(run_dir)
        cfg = with_vocab(cfg, tokenizer)
        rundir.check_resumable(run_dir, cfg)
        return cfg, tokenizer
    if run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"{run_dir} is not empty and holds no {rundir.CONFIG_FILE}; choose another --run-dir")
    tokenizer = build_tokenizer(cfg.data, text, run_dir)
    cfg = with_vocab(cfg, tokenizer)
    rundir.write_config(run_dir, cfg)
    return cfg, tokenizer


def pretrain(cfg: RunConfig, run_dir: str | Path) -> dict:
    """Stage 1: train a GPT with the LM loss on the configured corpus. Returns the final metrics."""
    run_dir = Path(run_dir)
    length = seq_len(cfg)
    strategy = make_strategy(cfg.train)
    batch_size = loader.per_process_batch(cfg.train.batch_size, strategy.batch_divisor * cfg.optim.grad_accum)
    text = sources.load_text(cfg.data)
    cfg, tokenizer = open_run(cfg, run_dir, text)

    train_tokens, val_tokens = loader.split_tokens(tokenizer.encode(text), cfg.data.val_fraction, length)
    train_windows = loader.TokenWindows(train_tokens, length)
    val_batches = []
    if cfg.data.val_fraction > 0:
        val_windows = loader.TokenWindows(val_tokens, length)
        val_batches = loader.fixed_batches(val_windows, batch_size, cfg.train.eval_batches, seed=cfg.data.seed + 1)
    train_iter = loader.train_iterator(train_windows, batch_size, seed=cfg.data.seed)

    model = GPT(cfg.model)
    optimizer = make_optimizer(cfg.optim, cfg.train.max_steps)
    init_fn = make_init_fn(partial(init_params, cfg.model), optimizer, cfg.train.seed)
    abstract_state = jax.eval_shape(init_fn)
    checkpointer = Checkpointer(run_dir / "checkpoints", keep=cfg.train.keep_checkpoints)
    if checkpointer.latest_step() is not None:
        state, data_state = checkpointer.restore(restore_target(abstract_state, strategy))
        state = strategy.place_state(state)
        train_iter.set_state(data_state)
    else:
        state = strategy.compile_init(init_fn, abstract_state)()
    start_step = int(to_host(strategy.state_to_host(state).step))

    objective = make_lm_objective(model.apply, deterministic=False)
    step_fn = strategy.compile(
        make_train_step(objective, optimizer, strategy.reduce, cfg.optim.grad_accum), abstract_state
    )
    eval_fn = strategy.compile_eval(
        make_eval_step(make_lm_objective(model.apply, deterministic=True), strategy.reduce), abstract_state
    )
    writer = rundir.MetricsWriter(run_dir, start_step)
    if start_step == 0:
        n_params = count_params(abstract_state.params)
        writer.write({"step": 0, "n_params": n_params, "n_params_non_embedding":
                      count_params(abstract_state.params, embeddings=False), "train_tokens": len(train_tokens)})
    lr = schedule(cfg.optim, cfg.train.max_steps)
    state = fit(
        state,
        step_fn=step_fn,
        eval_fn=eval_fn,
        strategy=strategy,
        train_iter=train_iter,
        val_batches=val_batches,
        checkpointer=checkpointer,
        writer=writer,
        cfg=cfg.train,
        tokens_per_step=cfg.train.batch_size * length,
        lr_fn=lr,
    )
    writer.close()
    checkpointer.close()
    if cfg.train.sample_tokens and jax.process_index() == 0:
        prompt = val_tokens[:1] if len(val_tokens) else train_tokens[:1]
        new = min(cfg.train.sample_tokens, cfg.model.context_len - 1)
        sample = sample_text(cfg, strategy.state_to_host(state).params, tokenizer, prompt, new, seed=cfg.train.seed)
        (run_dir / "samples.txt").write_text(sample + "\n")
    return rundir.read_metrics(run_dir)[-1] if jax.process_index() == 0 else {}


def sample_text(cfg: RunConfig, params, tokenizer: Tokenizer, prompt: np.ndarray, max_new_tokens: int,
                seed: int = 0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> str:
    """The prompt and its continuation as text."""
    check_length(cfg.model, len(prompt), max_new_tokens)
    tokens = generate(
        params, prompt[None].astype(np.int32), np.ones((1, len(prompt)), bool), jax.random.PRNGKey(seed),
        cfg=cfg.model, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
    )
    return tokenizer.decode(np.concatenate([prompt, np.asarray(tokens[0])]))


def load_trained(run_dir: str | Path) -> tuple[RunConfig, Tokenizer, dict]:
    """(config, tokenizer, params) of a run's latest checkpoint, on the default device."""
    run_dir = Path(run_dir)
    cfg = rundir.read_config(run_dir)
    tokenizer = load_tokenizer(run_dir)
    checkpointer = Checkpointer(run_dir / "checkpoints")
    if checkpointer.latest_step() is None:
        raise UserError(f"{run_dir}: no checkpoint yet")
    abstract_state = jax.eval_shape(make_init_fn(partial(init_params, cfg.model), make_optimizer(cfg.optim, cfg.train.max_steps), cfg.train.seed))
    state, _ = checkpointer.restore(restore_target(abstract_state, make_strategy(dataclasses.replace(
        cfg.train, strategy="single"))))
    checkpointer.close()
    return cfg, tokenizer, state.params
