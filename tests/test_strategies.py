"""single, mesh (data and FSDP axes) and pmap run the same train step to the same numbers."""

import jax
import numpy as np
import pytest
from conftest import (
    NUM_DEVICES,
    assert_trees_close,
    cases,
    cli_flags,
    lm_batch,
    random_tokens,
    run_cli_subprocess,
    tiny_model,
    tiny_run,
    train_losses,
)

from genai_jax import stages
from genai_jax.runs import final_record
from genai_jax.config import OptimConfig
from genai_jax.model import GPT, init_params
from genai_jax.objectives.lm import make_lm_objective
from genai_jax.optim import make_optimizer
from genai_jax.parallel import Mesh, Pmap, Single
from genai_jax.train import TrainState, make_train_step

# d_model=64 makes the MLP kernels 64 x 256 = 2**14 elements: big enough for FSDP to split them.
CFG = tiny_model(d_model=64)
STEPS = 3
STRATEGIES = {
    "mesh": lambda: Mesh(data=-1, fsdp=1),
    "mesh-fsdp2": lambda: Mesh(data=-1, fsdp=2),
    "mesh-fsdp4": lambda: Mesh(data=2, fsdp=4),
    "pmap": Pmap,
}


def batches() -> list[dict]:
    """16-row batches with uneven real lengths, so devices hold different numbers of tokens."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(STEPS):
        lengths = rng.integers(1, CFG.context_len + 1, size=16)
        weights = np.arange(CFG.context_len)[None] < lengths[:, None]
        out.append(lm_batch(random_tokens((16, CFG.context_len + 1), seed=10 + i), weights))
    return out


def train(strategy) -> tuple[list[float], dict, TrainState]:
    """(losses, final params on the host, final device state) of STEPS steps under `strategy`."""
    optimizer = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=1), max_steps=10)

    def init_fn():
        return TrainState.create(init_params(CFG, jax.random.PRNGKey(0)), optimizer, jax.random.PRNGKey(1))

    abstract_state = jax.eval_shape(init_fn)
    state = strategy.compile_init(init_fn, abstract_state)()
    objective = make_lm_objective(GPT(CFG).apply)
    step = strategy.compile(make_train_step(objective, optimizer, strategy.reduce), abstract_state)
    losses = []
    for i, batch in enumerate(batches()):
        state, metrics = step(state, strategy.place_batch(batch), jax.random.PRNGKey(i))
        per_device = np.ravel(jax.device_get(metrics["loss"]))  # pmap: one (equal) value per device
        np.testing.assert_array_equal(per_device, per_device[0])
        losses.append(float(per_device[0]))
    params = jax.tree.map(np.asarray, jax.device_get(strategy.state_to_host(state).params))
    return losses, params, state


@pytest.fixture(scope="module")
def single_run():
    return train(Single())


@pytest.mark.parametrize("name", cases("mesh-fsdp2", **{name: name for name in STRATEGIES}))
def test_strategy_matches_single_device(name, single_run):
    assert jax.device_count() == NUM_DEVICES
    losses, params, _ = train(STRATEGIES[name]())
    expected_losses, expected_params, _ = single_run
    np.testing.assert_allclose(losses, expected_losses, rtol=2e-5)
    assert_trees_close(params, expected_params, rtol=1e-4, atol=2e-5)


def test_fsdp_really_splits_parameters():
    fsdp = 2
    _, _, state = train(Mesh(data=-1, fsdp=fsdp))
    split = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]:
        shard_shape = leaf.addressable_shards[0].data.shape
        if shard_shape != leaf.shape:
            split[jax.tree_util.keystr(path)] = (leaf.shape, shard_shape)
    assert split, "no parameter is sharded over the fsdp axis"
    for full, shard in split.values():
        assert np.prod(shard) * fsdp == np.prod(full)
    # Adam's moments follow the parameters' layout.
    mu_leaves = [leaf for leaf in jax.tree.leaves(state.opt_state) if leaf.ndim == 2]
    assert any(leaf.addressable_shards[0].data.shape != leaf.shape for leaf in mu_leaves)


@pytest.mark.slow
def test_mesh_on_one_device_matches_eight(tmp_path, trained_run):
    """The CLI on a 1-device mesh (subprocess) logs the losses of the 8-device mesh run."""
    run_dir = tmp_path / "one-device"
    result = run_cli_subprocess("pretrain", *cli_flags(tiny_run()), "--run-dir", run_dir, devices=1)
    assert result.returncode == 0, result.stderr
    one, eight = train_losses(run_dir), train_losses(trained_run)
    assert sorted(one) == sorted(eight) == list(range(1, tiny_run().train.max_steps + 1))
    np.testing.assert_allclose([one[s] for s in sorted(one)], [eight[s] for s in sorted(eight)], rtol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["single", "pmap"])
def test_pretrain_stage_matches_mesh_under_other_strategies(tmp_path, trained_run, strategy):
    """`train.strategy` changes nothing in the logged losses of a pretraining run (mesh: `trained_run`)."""
    stages.pretrain(tiny_run(train={"strategy": strategy}), tmp_path / "run")
    losses, expected = train_losses(tmp_path / "run"), train_losses(trained_run)
    assert sorted(losses) == sorted(expected)
    np.testing.assert_allclose([losses[s] for s in sorted(losses)], [expected[s] for s in sorted(expected)],
                               rtol=2e-5)
    np.testing.assert_allclose(final_record(tmp_path / "run")["val_loss"], final_record(trained_run)["val_loss"],
                               rtol=2e-5)

