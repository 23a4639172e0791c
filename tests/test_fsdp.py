"""FSDP under the `mesh` strategy: a (data=2, fsdp=4) mesh really splits parameters and optimizer
state, trains every objective to the numbers of a single device, and runs PPO rollouts (sampling
and `experience`) on fsdp-sharded params and batch-sharded prompts to the single-device results."""

import dataclasses
from functools import cache

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import NUM_DEVICES, assert_trees_close, cases, lm_batch, random_tokens, tiny_model, tiny_run

from genai_jax import config, rlhf
from genai_jax.config import OptimConfig
from genai_jax.evaluation import left_pad
from genai_jax.metrics import summary
from genai_jax.model import GPT, init_params
from genai_jax.objectives.bradley_terry import make_bradley_terry_objective
from genai_jax.objectives.lm import make_lm_objective
from genai_jax.objectives.masked_lm import make_masked_lm_objective
from genai_jax.objectives.ppo import make_ppo_objective
from genai_jax.optim import make_optimizer, make_ppo_optimizer
from genai_jax.parallel import _MIN_FSDP_SIZE, Mesh, Single, fsdp_spec
from genai_jax.rlhf import _Placement, experience
from genai_jax.runs import make_ppo_init_fn
from genai_jax.sampling import generate
from genai_jax.train import TrainState, make_init_fn, make_train_step

# d_model 64: the MLP kernels (64 x 256 and 256 x 64) reach _MIN_FSDP_SIZE and are split; the
# embeddings, attention kernels and norms stay replicated. Dropout on (the LM test): the step's
# key must give the same masks however the batch is split. init_std 0.2: peaked logits, so greedy
# decoding has no near ties and sampling at temperature 0.7 differs from it. Every model of the
# file (LM, reward and value models, PPO policy) has this trunk, so flax init compiles once.
CFG = tiny_model(d_model=64, n_layer=1, dropout=0.1, init_std=0.2)
BT_CFG = dataclasses.replace(CFG, dropout=0.0, head="scalar")
KEY = jax.random.PRNGKey(0)
MESHES = {"data2-fsdp4": (2, 4), "data1-fsdp8": (1, 8)}
# Adam's step g / (sqrt(v) + eps) magnifies the float32 noise of another reduction order where
# |g| is near eps: there the gradient is mostly rounding error (seen with eps 1e-8: a gradient of
# 2e-8 off by 0.7% moved one param by 1.5e-5 at lr 1e-2, and one step's such params moved the next
# step's metrics by 1e-4). With eps 1e-3 an update's error is at most lr * |dg| / eps: gradients
# agree to ~1e-7 here, so updates to ~1e-7, and params, moments and every metric compare at 1e-5.
OPTIM = OptimConfig(lr=3e-3, min_lr=1e-3, warmup_steps=0, decay_steps=10, eps=1e-3)
STATE_TOL = dict(rtol=1e-5, atol=1e-6)


@cache
def jitted_init():
    return jax.jit(lambda key: init_params(CFG, key, "lm"))


def lm_params(seed: int):
    return jax.device_get(jitted_init()(jax.random.PRNGKey(seed)))


def with_scalar_head(params, seed: int):
    """A scalar-head model's params from an LM's (tied embeddings: no LM head to drop), the head
    drawn as `init_params` draws it, without compiling another flax init."""
    head = {"kernel": np.random.default_rng(seed).normal(0, (CFG.d_model + 1) ** -0.5, (CFG.d_model, 1)),
            "bias": np.zeros(1)}
    params = {"params": params["params"] | {"scalar_head": jax.tree.map(np.float32, head)}}
    expected = jax.eval_shape(lambda: init_params(BT_CFG, KEY))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == jax.tree.map(lambda x: (x.shape, x.dtype), expected)
    return params


def sharded_leaves(tree) -> dict[str, tuple]:
    """{path: global shape} of the leaves whose device shards are smaller than the array."""
    return {jax.tree_util.keystr(path): leaf.shape for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
            if leaf.addressable_shards[0].data.shape != leaf.shape}


def adam_moments(opt_state) -> list:
    """The (mu, nu) trees of every Adam state in an optax state."""
    states = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
              if isinstance(s, optax.ScaleByAdamState)]
    assert states
    return [(s.mu, s.nu) for s in states]


def assert_fsdp_layout(leaf, mesh: Mesh, where: str) -> bool:
    """The leaf lies as `fsdp_spec` says: large ones split in `fsdp` slices along one axis (the same
    slice on every device of a `data` row), small ones whole on every device. True if split."""
    assert isinstance(leaf, jax.Array), where
    assert leaf.sharding.mesh.shape == mesh.mesh.shape, where
    assert leaf.sharding.device_set == set(jax.devices()), where
    full = np.asarray(leaf)
    shards = leaf.addressable_shards
    assert len(shards) == NUM_DEVICES, where
    for shard in shards:  # each device holds exactly its slice of the global array
        np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index], err_msg=where)
    spec = leaf.sharding.spec
    if leaf.size < _MIN_FSDP_SIZE or all(n % mesh.fsdp for n in leaf.shape):
        assert all(axis is None for axis in spec), (where, spec)
        assert leaf.sharding.is_fully_replicated, where
        assert all(shard.data.shape == leaf.shape for shard in shards), where
        return False
    axis = max((a for a in range(leaf.ndim) if leaf.shape[a] % mesh.fsdp == 0), key=lambda a: leaf.shape[a])
    assert tuple(spec) + (None,) * (leaf.ndim - len(spec)) == tuple("fsdp" if a == axis else None
                                                                     for a in range(leaf.ndim)), (where, spec)
    expected = tuple(n // mesh.fsdp if a == axis else n for a, n in enumerate(leaf.shape))
    assert all(shard.data.shape == expected for shard in shards), (where, [s.data.shape for s in shards])
    # fsdp distinct slices, each held by the `data` devices of one fsdp column, tiling the axis
    starts = sorted({shard.index[axis].start or 0 for shard in shards})
    assert starts == list(range(0, leaf.shape[axis], leaf.shape[axis] // mesh.fsdp)), where
    for start in starts:
        holders = [s.device for s in shards if (s.index[axis].start or 0) == start]
        assert len(holders) == NUM_DEVICES // mesh.fsdp, where
    return True


def assert_state_layout(state: TrainState, mesh: Mesh) -> dict[str, tuple]:
    """Params, Adam moments (laid out as their params) and the rest of the state as `fsdp_spec`
    says; returns the split params."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        assert_fsdp_layout(leaf, mesh, jax.tree_util.keystr(path))
    for mu, nu in adam_moments(state.opt_state):
        # under optax.masked / multi_transform the moments may hold a subset of the params' leaves
        for moment in (mu, nu):
            for path, leaf in jax.tree_util.tree_flatten_with_path(moment)[0]:
                param = params_at(state.params, path)
                assert leaf.shape == param.shape, jax.tree_util.keystr(path)
                assert leaf.sharding.is_equivalent_to(param.sharding, leaf.ndim), jax.tree_util.keystr(path)
    return sharded_leaves(state.params)


def params_at(params, path):
    for key in path:
        params = params[key.key]
    return params


# ---------------------------------------------------------------------------------------------
# 1. The layout of a placed TrainState


def init_fn():
    return make_init_fn(lambda key: jitted_init()(key), make_optimizer(OPTIM, max_steps=10), seed=0)


@cache
def initial_state() -> TrainState:
    """The initial TrainState of CFG in host memory."""
    return jax.device_get(init_fn()())


def initial_bt_state() -> TrainState:
    return jax.device_get(TrainState.create(with_scalar_head(lm_params(1), 1), make_optimizer(OPTIM, 10), KEY))


@pytest.mark.parametrize("mesh_shape", cases("data2-fsdp4", **{name: (shape,) for name, shape in MESHES.items()}))
def test_fsdp_splits_params_and_adam_moments(mesh_shape):
    assert jax.device_count() == NUM_DEVICES
    strategy = Mesh(*mesh_shape)
    host_state = initial_state()
    states = [strategy.place_state(host_state)]
    if mesh_shape == MESHES["data2-fsdp4"]:  # compiling init once more costs seconds: one mesh
        states.append(strategy.compile_init(init_fn(), jax.eval_shape(init_fn()))())
    for state in states:
        split = assert_state_layout(state, strategy)
        # exactly the two MLP kernels of the one block reach the size threshold
        assert split == {"['params']['h_0']['mlp']['fc']['kernel']": (64, 256),
                         "['params']['h_0']['mlp']['proj']['kernel']": (256, 64)}
        assert_trees_close(jax.device_get(state), jax.device_get(host_state), rtol=0, atol=0)
        # the moments of a split kernel are split too (and so take 1/fsdp of its memory per device)
        mu, nu = adam_moments(state.opt_state)[0]
        for moment in (mu, nu):
            kernel = moment["params"]["h_0"]["mlp"]["fc"]["kernel"]
            assert kernel.addressable_shards[0].data.shape == (64, 256 // strategy.fsdp)
    # `fsdp_spec` itself: the largest divisible axis from _MIN_FSDP_SIZE elements up, else replicated
    P = jax.sharding.PartitionSpec
    assert fsdp_spec((64, 256), 4) == P(None, "fsdp") and fsdp_spec((256, 64), 4) == P("fsdp")
    assert fsdp_spec((4, 129, 128), 4) == P(None, None, "fsdp")  # 129 does not divide
    assert fsdp_spec((129, 127), 4) == P()
    assert fsdp_spec((_MIN_FSDP_SIZE,), 8) == P("fsdp") and fsdp_spec((_MIN_FSDP_SIZE - 8,), 8) == P()
    assert fsdp_spec((64, 256), 1) == P()


# ---------------------------------------------------------------------------------------------
# 2. Every objective: steps under Mesh(data=2, fsdp=4) give the single device's numbers


def run_steps(strategy, host_state, objective, optimizer, batches) -> tuple[list[dict], TrainState]:
    """(host metrics per step, final state) of one step per batch under `strategy`, from
    `host_state` placed by it (which also commits it to the device under `single`: a step
    compiled for an uncommitted state compiles again for the committed state it returns)."""
    abstract_state = jax.eval_shape(lambda: host_state)
    state = strategy.place_state(host_state)
    step = strategy.compile(make_train_step(objective, optimizer, strategy.reduce), abstract_state)
    records = []
    for i, batch in enumerate(batches):
        state, metrics = step(state, strategy.place_batch(batch), jax.random.PRNGKey(100 + i))
        records.append(summary([strategy.metrics_to_host(metrics)]))
    return records, state


def assert_same_training(mesh_shape, host_state, objective, optimizer, batches):
    """Steps under Mesh(*mesh_shape) give the metrics, params and optimizer state of Single, and
    keep the FSDP layout."""
    single_records, single_state = run_steps(Single(), host_state, objective, optimizer, batches)
    strategy = Mesh(*mesh_shape)
    records, state = run_steps(strategy, host_state, objective, optimizer, batches)
    assert assert_state_layout(state, strategy), "no parameter is split over fsdp: the test has no teeth"
    for step, (got, expected) in enumerate(zip(records, single_records)):
        assert set(got) == set(expected)
        for name in got:
            np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=f"step {step} {name}")
    assert_trees_close(jax.device_get(state.params), jax.device_get(single_state.params), **STATE_TOL)
    assert_trees_close(jax.device_get(state.opt_state), jax.device_get(single_state.opt_state), **STATE_TOL)
    moved = jax.tree.map(lambda new, old: float(np.abs(np.asarray(new) - old).max()), state.params, host_state.params)
    assert min(jax.tree.leaves(moved)) > 1e-5  # every parameter trained
    return records


def lm_batches(masked: bool) -> list[dict]:
    """Two 16-row batches; `masked`: weights on a response span of each row (some rows none)."""
    rng = np.random.default_rng(0)
    batches = []
    for i in range(2):
        tokens = random_tokens((16, CFG.context_len + 1), seed=30 + i)
        if masked:
            start = rng.integers(0, CFG.context_len, size=16)
            stop = np.minimum(start + rng.integers(0, 8, size=16), CFG.context_len)
            positions = np.arange(CFG.context_len)[None]
            weights = (positions >= start[:, None]) & (positions < stop[:, None])
            weights[3] = False
        else:
            weights = None
        batches.append(lm_batch(tokens, weights))
    if masked:
        assert 0 < batches[0]["weights"].mean() < 0.5
    return batches


@pytest.mark.slow  # the fast tier's case of this family: test_strategies.py[mesh-fsdp2]
def test_lm_steps_match_single_device():
    records = assert_same_training(MESHES["data2-fsdp4"], initial_state(), make_lm_objective(GPT(CFG).apply),
                                   make_optimizer(OPTIM, 10), lm_batches(masked=False))
    assert set(records[0]) == {"loss", "accuracy", "grad_norm"}
    assert records[1]["loss"] != records[0]["loss"]


@pytest.mark.slow  # the fast tier's case of this family: test_sft.py[mesh-accum2] (a data mesh)
def test_masked_lm_steps_match_single_device():
    objective = make_masked_lm_objective(GPT(CFG).apply, deterministic=True)
    records = assert_same_training(MESHES["data2-fsdp4"], initial_state(), objective,
                                   make_optimizer(OPTIM, 10), lm_batches(masked=True))
    assert set(records[0]) == {"loss", "response_accuracy", "grad_norm"}


def bt_rows() -> dict:
    """8 prompts with K = 3 responses, right padded; rows 0, 3, 6 rank all three, the others two
    (the third invalid); the last row has weight 0."""
    batch, k, length = 8, 3, CFG.context_len
    rng = np.random.default_rng(1)
    tokens = random_tokens((batch, k, length), seed=40)
    lengths = rng.integers(3, length + 1, size=(batch, k))
    mask = np.arange(length)[None, None] < lengths[..., None]
    tokens = np.where(mask, tokens, 0)
    rank = np.stack([rng.permutation(k) for _ in range(batch)]).astype(np.int32)
    valid = np.ones((batch, k), bool)
    valid[np.arange(batch) % 3 != 0, 2] = False
    weights = np.ones(batch, np.float32)
    weights[-1] = 0.0
    return {"tokens": tokens.astype(np.int32), "mask": mask, "rank": rank, "valid": valid, "weights": weights,
            "margin": rng.uniform(0, 0.5, batch).astype(np.float32)}


@pytest.mark.slow  # the fast tier has the Bradley-Terry step under FSDP in test_reward.py
def test_bradley_terry_steps_match_single_device():
    objective = make_bradley_terry_objective(GPT(BT_CFG).apply, deterministic=True, centering=0.01)
    records = assert_same_training(MESHES["data2-fsdp4"], initial_bt_state(), objective, make_optimizer(OPTIM, 10),
                                   [bt_rows(), bt_rows()])
    assert {"accuracy", "margin", "chosen_reward_std"} <= set(records[0])


# ---------------------------------------------------------------------------------------------
# PPO: a tiny policy, value, reference and reward model; rollouts (3.); PPO steps (2.)

PAD, PROMPT_LEN, NEW_TOKENS, ROWS = 0, 8, 8, NUM_DEVICES
assert PROMPT_LEN + NEW_TOKENS <= CFG.context_len
PPO_RUN = config.replace(
    tiny_run(),
    model=dataclasses.replace(CFG, dropout=0.0),
    optim=dict(lr=1e-3, min_lr=1e-3, warmup_steps=0, weight_decay=0.0, eps=OPTIM.eps),
    train=dict(batch_size=ROWS, max_steps=4),
    ppo=dict(temperature=0.7, max_new_tokens=NEW_TOKENS, no_end_penalty=1.5, value_lr=3e-3, epochs=1,
             minibatches=1, kl_coef=0.1),
)


@pytest.fixture(scope="module")
def models():
    """Policy, value model, reference (another policy: the KL is not 0) and reward model."""
    return {"policy": lm_params(10), "ref": lm_params(11), "value": with_scalar_head(lm_params(12), 12),
            "reward": with_scalar_head(lm_params(13), 13)}


def prompts() -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompts of 1 to PROMPT_LEN tokens."""
    return left_pad([random_tokens(1 + row % PROMPT_LEN, seed=50 + row) for row in range(ROWS)], PROMPT_LEN, PAD)


@pytest.fixture(scope="module")
def ppo_state(models) -> TrainState:
    """The PPO TrainState ({"policy", "value"} params, make_ppo_optimizer's state) in host memory."""
    return jax.device_get(make_ppo_init_fn(PPO_RUN, lambda index: models["policy"], lambda index, seed: models["value"])())


def rollout(strategy, models, host_state, temperatures, end_id=None):
    """As `rlhf.ppo` does it: the TrainState placed by `strategy`, rollout inputs by `_Placement`,
    sampling and `experience` under its context. Returns (responses per temperature, batch, stats,
    end id, the state's policy params); `experience` scores the first response; the end id is, if
    not given, a token row 0 samples mid-response."""
    cfg = PPO_RUN
    state = strategy.place_state(host_state)
    placement = _Placement(strategy)
    ref_params, reward_params = placement.params(models["ref"]), placement.params(models["reward"])
    normalization = {"gain": jnp.float32(0.5), "bias": jnp.float32(0.1)}
    with placement.context():
        params = strategy.state_to_host(state).params
        prompt, prompt_mask = placement.rows(prompts())
        responses = [generate(params["policy"], prompt, prompt_mask, jax.random.PRNGKey(7), cfg=cfg.model,
                              max_new_tokens=NEW_TOKENS, temperature=t, top_k=cfg.ppo.top_k, top_p=cfg.ppo.top_p)
                     for t in temperatures]
        if end_id is None:
            end_id = int(np.asarray(responses[0])[0, NEW_TOKENS // 2])
        batch, stats = experience(params, ref_params, reward_params, normalization, prompt, prompt_mask,
                                  responses[0], jnp.float32(cfg.ppo.kl_coef), cfg=cfg, end_ids=(end_id,), pad_id=PAD)
    return responses, batch, stats, end_id, params


TEMPERATURES = (PPO_RUN.ppo.temperature, 0.0)


@pytest.fixture(scope="module")
def single_rollout(models, ppo_state):
    return rollout(Single(), models, ppo_state, TEMPERATURES)


def assert_rows_sharded(x: jax.Array, strategy: Mesh, what: str):
    """Split by rows over all 8 devices, one row block per device, like the placed prompts."""
    assert x.sharding.device_set == set(strategy.mesh.devices.flat), what
    assert not x.sharding.is_fully_replicated, what
    assert x.sharding.is_equivalent_to(strategy.batch_sharding, x.ndim), (what, x.sharding)
    rows = sorted(shard.index[0].start or 0 for shard in x.addressable_shards)
    assert rows == list(range(0, x.shape[0], x.shape[0] // NUM_DEVICES)), what
    assert all(shard.data.shape == (x.shape[0] // NUM_DEVICES, *x.shape[1:]) for shard in x.addressable_shards)


# ---------------------------------------------------------------------------------------------
# 3. PPO rollouts on fsdp-sharded params and batch-sharded prompts


@pytest.mark.slow  # the fast tier's case of this family: the loop variant below
def test_ppo_rollout_under_mesh_matches_single_device(models, ppo_state, single_rollout):
    strategy = Mesh(2, 4)
    expected_responses, expected_batch, expected_stats, end_id, _ = single_rollout
    responses, batch, stats, _, params = rollout(strategy, models, ppo_state, TEMPERATURES, end_id=end_id)

    # the rollout really ran on split params: the policy's MLP kernels are fsdp slices
    assert sharded_leaves(params["policy"]) and sharded_leaves(params["value"])
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        assert_fsdp_layout(leaf, strategy, jax.tree_util.keystr(path))

    sampled, greedy = (np.asarray(r) for r in expected_responses)
    assert np.mean(sampled != greedy) > 0.2  # temperature 0.7 does sample
    lengths = np.asarray(expected_batch["weights"]).sum(1)
    assert (lengths < NEW_TOKENS).any() and (lengths == NEW_TOKENS).any()  # the end id cuts some rows
    for temperature, response, expected in zip(TEMPERATURES, responses, expected_responses):
        assert_rows_sharded(response, strategy, f"response at temperature {temperature}")
        np.testing.assert_array_equal(np.asarray(response), np.asarray(expected), err_msg=f"T={temperature}")

    assert set(batch) == set(expected_batch)
    for name, value in batch.items():
        assert_rows_sharded(value, strategy, name)
        np.testing.assert_allclose(np.asarray(value), np.asarray(expected_batch[name]), rtol=1e-5, atol=1e-5,
                                   err_msg=name)
    assert set(stats) == set(expected_stats)
    assert abs(float(expected_stats["kl"])) > 1e-2  # the reference differs from the policy
    for name, value in stats.items():
        assert value.shape == ()
        np.testing.assert_allclose(float(value), float(expected_stats[name]), rtol=1e-5, atol=1e-6, err_msg=name)


def test_ppo_loop_rollout_under_mesh_matches_single_device(models, ppo_state, single_rollout):
    """`rlhf.rollout`, the loop's own sampling + scoring, on the mesh-placed state inside the
    placement's context, gives the single device's responses, batch and stats."""
    strategy = Mesh(2, 4)
    expected_responses, expected_batch, expected_stats, end_id, _ = single_rollout
    state = strategy.place_state(ppo_state)
    placement = _Placement(strategy)
    frozen = {"reference": placement.params(models["ref"]), "reward": placement.params(models["reward"]),
              "normalization": {"gain": jnp.float32(0.5), "bias": jnp.float32(0.1)}}
    tokens, mask = prompts()
    with placement.context():
        response, batch, stats, _ = rlhf.rollout(
            PPO_RUN, strategy.state_to_host(state).params, frozen, rlhf.Prompts(tokens, mask, None),
            np.arange(ROWS), PPO_RUN.ppo.kl_coef, jax.random.PRNGKey(7), placement, end_ids=(end_id,), pad_id=PAD)
    np.testing.assert_array_equal(response, np.asarray(expected_responses[0]))
    assert set(batch) == set(expected_batch)
    for name, value in batch.items():
        np.testing.assert_allclose(value, np.asarray(expected_batch[name]), rtol=1e-5, atol=1e-5, err_msg=name)
    assert set(stats) == set(expected_stats)
    for name, value in stats.items():
        np.testing.assert_allclose(value, float(expected_stats[name]), rtol=1e-5, atol=1e-6, err_msg=name)


def ppo_step_batch(batch: dict) -> dict:
    """The rollout's experience with old log-probs and values moved off the current model's, so
    that ratios spread across the clip range and value clipping happens."""
    batch = jax.tree.map(np.asarray, batch)
    rng = np.random.default_rng(0)
    weights = batch["weights"]
    return dict(batch, old_logprobs=batch["old_logprobs"] + 0.3 * rng.standard_normal(weights.shape) * weights,
                old_values=batch["old_values"] + 0.3 * rng.standard_normal(weights.shape) * weights)


@pytest.mark.slow  # the fast tier's case of this family: test_ppo.py[mesh-accum2] (a data mesh)
def test_ppo_steps_match_single_device(ppo_state, single_rollout):
    cfg = PPO_RUN
    batch = ppo_step_batch(single_rollout[1])
    objective = make_ppo_objective(GPT(cfg.model).apply, temperature=cfg.ppo.temperature)
    records = assert_same_training(MESHES["data2-fsdp4"], ppo_state, objective, make_ppo_optimizer(cfg), [batch, batch])
    assert 0 < records[0]["clip_fraction"] < 1 and 0 < records[0]["value_clip_fraction"] < 1
    assert records[0]["ratio_max"] > 1 + cfg.ppo.clip_ratio
