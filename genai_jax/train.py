"""The one train step and the fit loop. Nothing here knows an objective by name."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.experimental import multihost_utils
from tqdm import tqdm

from genai_jax.metrics import is_maximum
from genai_jax.parallel import Reduction, to_host


class TrainState(struct.PyTreeNode):
    """Everything a step changes, as one pytree: what a checkpoint holds."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array

    @classmethod
    def create(cls, params, optimizer: optax.GradientTransformation, rng: jax.Array) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params), rng=rng)


def make_init_fn(init_params: Callable[[jax.Array], Any], optimizer: optax.GradientTransformation, seed: int):
    """A function making the initial TrainState from `seed`: params from one half of the key, the
    train PRNG key (dropout, sampling) from the other. Suits `jax.jit` and `jax.eval_shape`."""

    def init() -> TrainState:
        init_key, train_key = jax.random.split(jax.random.PRNGKey(seed))
        return TrainState.create(init_params(init_key), optimizer, train_key)

    return init


class Preempted(Exception):
    """A training loop stopped on SIGTERM at `step`, its checkpoint saved in `checkpoint_dir`:
    relaunching the same command resumes there."""

    def __init__(self, step: int, checkpoint_dir: str):
        super().__init__(f"preempted at step {step}: checkpoint saved in {checkpoint_dir}")
        self.step, self.checkpoint_dir = step, checkpoint_dir


class PreemptionGuard:
    """While active, SIGTERM (what a Cloud TPU maintenance event or a scheduler sends) sets a flag
    instead of killing the process, so a training loop can save at its next step boundary and raise
    `Preempted`. The previous handler comes back on exit. Signal handlers live in the main thread
    only: elsewhere the guard does nothing and `requested` stays False.

        with PreemptionGuard() as guard:
            for step in ...:
                ...
                if guard.requested:
                    save(step)
                    raise Preempted(step, directory)
    """

    def __init__(self):
        self._received = False
        self._installed = False
        self._previous = None

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._receive)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:  # None: a handler set outside Python, which Python cannot reinstall
            signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)
            self._installed = False

    def _receive(self, signum, frame) -> None:
        self._received = True

    @property
    def requested(self) -> bool:
        """Whether any process got SIGTERM. With several processes this is a collective, one tiny
        all-gather that waits for the step in flight (they must all stop at the same step, or the
        checkpoint save hangs): read it on every process at each step."""
        if jax.process_count() == 1:
            return self._received
        return bool(np.any(multihost_utils.process_allgather(np.asarray(self._received))))


def _with_denominator(batch: dict, reduce: Reduction, num_micro: int) -> dict:
    """Add `loss_denominator`: weighted items per shard, so shard means give the global mean.

    `reduce.mean` averages over devices, so it makes a local sum the global sum / devices; dividing by the
    micro-batch count makes it the global count per (device, micro-batch) shard.
    """
    local_total = jnp.sum(batch["weights"].astype(jnp.float32))
    denominator = jnp.maximum(reduce.mean(local_total) / num_micro, 1e-6)
    return dict(batch, loss_denominator=denominator)


def _split_micro(batch: dict, num_micro: int) -> dict:
    """[B, ...] -> [num_micro, B / num_micro, ...], taking every num_micro-th row so that each
    device's contiguous block of rows splits locally (no resharding under `mesh`)."""

    def split(x):
        return jnp.swapaxes(x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def _add_micro(total, new):
    """((loss, metrics), grads) of two micro-batches summed, their maxima (`is_maximum`) maxed."""
    (loss, metrics), grads = total
    (new_loss, new_metrics), new_grads = new
    metrics = {name: jax.tree.map(jnp.maximum if is_maximum(name) else jnp.add, value, new_metrics[name])
               for name, value in metrics.items()}
    return (loss + new_loss, metrics), jax.tree.map(jnp.add, grads, new_grads)


def make_train_step(objective: Callable, optimizer: optax.GradientTransformation, reduce: Reduction = Reduction(),
                    accum_steps: int = 1):
    """The train step for any objective: grads of the (token-normalised) loss, reduced, applied.

    With `accum_steps` > 1 the batch is split into micro-batches scanned inside the step; their
    losses share one global denominator, so accumulation changes nothing but memory. Metrics are
    the whole batch's, as `genai_jax.metrics` describes.
    """
    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def train_step(state: TrainState, batch: dict, rng: jax.Array):
        batch = _with_denominator(batch, reduce, accum_steps)
        if accum_steps == 1:
            (loss, metrics), grads = grad_fn(state.params, batch, rng)
        else:
            denominator = batch.pop("loss_denominator")
            micro = (_split_micro(batch, accum_steps), jax.random.split(rng, accum_steps))

            def micro_grads(micro_batch, key):
                return grad_fn(state.params, dict(micro_batch, loss_denominator=denominator), key)

            def accumulate(total, micro_step):
                return _add_micro(total, micro_grads(*micro_step)), None

            first = micro_grads(*jax.tree.map(lambda x: x[0], micro))
            (loss, metrics), grads = jax.lax.scan(accumulate, first, jax.tree.map(lambda x: x[1:], micro))[0]
            loss, grads = loss / accum_steps, jax.tree.map(lambda x: x / accum_steps, grads)
            metrics = {name: value if is_maximum(name) else jax.tree.map(lambda x: x / accum_steps, value)
                       for name, value in metrics.items()}
        grads, metrics = reduce.mean(grads), reduce.metrics(metrics | {"loss": loss})
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        new_state = state.replace(
            step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state
        )
        return new_state, metrics | {"grad_norm": optax.tree.norm(grads)}

    return train_step


def make_eval_step(objective: Callable, reduce: Reduction = Reduction()):
    """Loss and metrics of one batch, normalised by its global weight."""

    def eval_step(state: TrainState, batch: dict, rng: jax.Array):
        loss, metrics = objective(state.params, _with_denominator(batch, reduce, 1), rng)
        return reduce.metrics(metrics | {"loss": loss})

    return eval_step


def evaluate(eval_fn: Callable, state, batches: list[dict], strategy, rng: jax.Array) -> list[dict]:
    """The eval metrics of each fixed batch on the host, prefixed `val_` (equal-weight batches:
    `metrics.summary` averages them)."""
    host = [strategy.metrics_to_host(eval_fn(state, strategy.place_batch(batch), rng)) for batch in batches]
    return [{f"val_{name}": value for name, value in metrics.items()} for metrics in host]


def fit(
    state,
    *,
    step_fn: Callable,
    eval_fn: Callable,
    strategy,
    train_iter: Iterator[dict],
    val_batches: list[dict],
    checkpointer,
    writer,
    cfg,
    tokens_per_step: int,
    lr_fn: Callable[[int], float],
    population,
):
    """Train from `state.step` to `cfg.max_steps`, logging, evaluating and checkpointing.

    `train_iter` must offer `get_state()` (saved with each checkpoint). Step k's dropout key is
    `fold_in(rng, k)`, so a resumed run sees the same keys as an uninterrupted one. `population`
    (a `population.Population`) gives each replica's keys and splits metrics into its records;
    `tokens_per_step` and the logged `tokens_per_s` are one replica's. Ctrl-C saves
    a checkpoint before stopping; SIGTERM (see `PreemptionGuard`) finishes the step, saves a
    checkpoint there and raises `Preempted`.
    """
    host_state = strategy.state_to_host(state)
    step = int(to_host(host_state.step).flat[0])  # a population's replicas share it
    base_rng = to_host(host_state.rng)
    last_saved = step
    show = cfg.progress and jax.process_index() == 0
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not show, dynamic_ncols=True)
    tick, tick_step = time.perf_counter(), step

    def save():
        checkpointer.save(step, strategy.state_to_host(state), train_iter.get_state())
        writer.flush()

    if step == 0 and val_batches:  # the starting point, for fine-tuning stages above all
        writer.write_all(population.records(0, evaluate(eval_fn, state, val_batches, strategy, base_rng)))
    with PreemptionGuard() as guard:
        try:
            while step < cfg.max_steps:
                batch = strategy.place_batch(next(train_iter))
                state, metrics = step_fn(state, batch, population.keys(base_rng, step))
                step += 1
                bar.update(1)
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    now = time.perf_counter()
                    tokens_per_s = tokens_per_step * (step - tick_step) / (now - tick)
                    tick, tick_step = now, step
                    lr = float(lr_fn(step - 1))
                    shown = writer.write_all(population.records(
                        step, [strategy.metrics_to_host(metrics)],
                        lambda replica: {"lr": lr * population.lr_scale(replica), "tokens_per_s": tokens_per_s}))
                    bar.set_postfix(loss=f"{shown['loss']:.4f}", tok_s=f"{tokens_per_s:,.0f}")
                if val_batches and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                    evaluated = evaluate(eval_fn, state, val_batches, strategy, base_rng)
                    record = writer.write_all(population.records(step, evaluated))
                    if show:
                        bar.write(f"step {step}: val_loss {record['val_loss']:.4f}")
                    tick = time.perf_counter()
                if step % cfg.ckpt_every == 0 or step == cfg.max_steps:
                    save()
                    last_saved = step
                if step < cfg.max_steps and guard.requested:
                    raise Preempted(step, str(checkpointer.manager.directory))
        except (KeyboardInterrupt, Preempted):
            if step > last_saved:
                save()
            checkpointer.wait()
            bar.close()
            raise
    checkpointer.wait()
    bar.close()
    return state
