"""Memory levers: bfloat16 Adam moments, and the train step compiled ahead of time with its memory
read from XLA (printed, logged at step 0, and a step too big for the device refused up front)."""

import jax
import jax.numpy as jnp
import optax
import pytest
from conftest import cases, init, lm_batch, random_tokens, tiny_model, tiny_run

from genai_jax import rundir, stages
from genai_jax.config import OptimConfig, UserError
from genai_jax.model import GPT
from genai_jax.objectives.lm import make_lm_objective
from genai_jax.optim import make_optimizer
from genai_jax.parallel import Single, check_fits
from genai_jax.train import TrainState, make_train_step


@pytest.mark.slow  # trains two short runs
@pytest.mark.parametrize("moments, expected", [({}, jnp.float32), ({"moments_dtype": "bfloat16"}, jnp.bfloat16)],
                         ids=["default", "bfloat16"])
def test_first_moment_dtype_and_training_still_learns(moments, expected):
    cfg = tiny_model()
    optimizer = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=1, **moments), max_steps=10)
    state = TrainState.create(init(cfg), optimizer, jax.random.PRNGKey(1))
    mu, nu = optax.tree.get(state.opt_state, "mu"), optax.tree.get(state.opt_state, "nu")
    assert {leaf.dtype for leaf in jax.tree.leaves(mu)} == {jnp.dtype(expected)}
    assert {leaf.dtype for leaf in jax.tree.leaves(nu)} == {jnp.dtype(jnp.float32)}  # optax has no nu dtype

    strategy = Single()
    step = strategy.compile(make_train_step(make_lm_objective(GPT(cfg).apply), optimizer), None)
    batch = strategy.place_batch(lm_batch(random_tokens((8, cfg.context_len + 1))))
    losses = []
    for i in range(5):
        state, metrics = step(state, batch, jax.random.PRNGKey(i))
        losses.append(float(metrics["loss"]))
    assert {leaf.dtype for leaf in jax.tree.leaves(optax.tree.get(state.opt_state, "mu"))} == {jnp.dtype(expected)}
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize("strategy", cases("single", single="single", mesh="mesh"))
def test_step_zero_record_carries_the_compiled_step_memory(tmp_path, capsys, strategy):
    cfg = tiny_run(train={"strategy": strategy, "max_steps": 1, "ckpt_every": 1, "sample_tokens": 0})
    stages.pretrain(cfg, tmp_path / "run")
    first = rundir.read_metrics(tmp_path / "run")[0]
    assert first["step"] == 0 and 0 < first["step_memory_mib"] < 1024
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("train step memory")]
    assert f"peak {first['step_memory_mib']:,.1f} MiB" in line and "temp" in line and "arguments" in line


class FakeDevice:
    device_kind = "Fake GPU"

    def __init__(self, stats):
        self.stats = stats

    def memory_stats(self):
        return self.stats


def test_a_step_bigger_than_the_free_device_memory_is_refused():
    memory = {"arguments": 100.0, "outputs": 100.0, "temp": 500.0, "code": 1.0, "peak": 601.0}  # MiB
    mib = 2**20
    check_fits(memory, FakeDevice(None))  # CPU: no stats, nothing to check
    check_fits(None, FakeDevice({"bytes_limit": 1 * mib, "bytes_in_use": 0}))  # no analysis
    check_fits(memory, FakeDevice({"bytes_limit": 700 * mib, "bytes_in_use": 100 * mib}))  # 501 MiB of 600
    with pytest.raises(UserError, match="501 MiB more per device than the 400 MiB free on Fake GPU"):
        check_fits(memory, FakeDevice({"bytes_limit": 500 * mib, "bytes_in_use": 100 * mib}))
    cpu = FakeDevice(None)
    cpu.platform = "cpu"  # no stats: its share of the host's available memory
    check_fits(memory, cpu)
    huge = dict(memory, temp=1e9, peak=1e9 + 201.0)
    with pytest.raises(UserError, match="more per device than the .* MiB of host memory available to each CPU "
                                        "device; lower train.batch_size or data.seq_len"):
        check_fits(huge, cpu)
    with pytest.raises(UserError, match="^the rollout generate needs 501 MiB .*; lower ppo.max_new_tokens$"):
        check_fits(memory, FakeDevice({"bytes_limit": 500 * mib, "bytes_in_use": 100 * mib}), "the rollout generate",
                   "lower ppo.max_new_tokens")
