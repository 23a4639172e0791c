"""The LM objective and the train step: hand-computed cross-entropy, masking, gradient accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_trees_close, init, lm_batch, random_tokens, tiny_model

from genai_jax.model import GPT
from genai_jax.objectives.lm import make_lm_objective, nll_and_hits, token_nll
from genai_jax.train import TrainState, make_train_step

LOGITS = np.array(
    [[[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, 0.4], [-3.0, 1.0, 1.0, 5.0]],
     [[0.0, 0.0, 0.0, 0.0], [10.0, -10.0, 0.0, 1.0], [1.5, 2.5, -0.5, 0.0]]],
    np.float32,
)
TARGETS = np.array([[0, 3, 1], [2, 0, 1]], np.int32)


def numpy_nll(logits, targets):
    """-log softmax(logits)[target], in float64."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return -np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def test_token_nll_matches_numpy_log_softmax():
    np.testing.assert_allclose(token_nll(jnp.asarray(LOGITS), TARGETS), numpy_nll(LOGITS, TARGETS), atol=1e-6)
    # A uniform distribution over 4 tokens costs log 4 whatever the target.
    np.testing.assert_allclose(token_nll(jnp.zeros((1, 4)), jnp.array([2])), [np.log(4.0)], rtol=1e-6)


def reference_nll(logits, targets):
    """-log softmax by plain autodiff-able jax ops, in float32."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_nll_gradient_rule_matches_autodiff(dtype):
    logits_key, target_key, weight_key = jax.random.split(jax.random.PRNGKey(0), 3)
    logits = (3 * jax.random.normal(logits_key, (3, 5, 37))).astype(dtype)
    targets = jax.random.randint(target_key, (3, 5), 0, 37)
    weights = jax.random.uniform(weight_key, (3, 5))

    def weighted(nll_fn):
        return jax.jit(jax.value_and_grad(lambda x: jnp.sum(nll_fn(x, targets) * weights)))(logits)

    loss, grads = weighted(lambda x, t: nll_and_hits(x, t)[0])
    expected_loss, expected_grads = weighted(reference_nll)
    assert grads.dtype == dtype  # written once, in the logits' own dtype
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
    tolerance = 1e-6 if dtype == jnp.float32 else 1e-2  # the bfloat16 rounding of each gradient
    np.testing.assert_allclose(np.asarray(grads, np.float32), np.asarray(expected_grads, np.float32),
                               atol=tolerance)
    # Hits are the argmax's (random logits have no ties) and carry no gradient.
    np.testing.assert_array_equal(nll_and_hits(logits, targets)[1], jnp.argmax(logits, -1) == targets)
    hits_grads = jax.grad(lambda x: jnp.sum(nll_and_hits(x, targets)[1]))(logits)
    assert not np.any(np.asarray(hits_grads, np.float32))


def test_lm_objective_is_weighted_mean_nll_with_stub_model():
    weights = np.array([[1.0, 0.0, 1.0], [0.5, 1.0, 0.0]], np.float32)
    seen = {}

    def stub_apply(params, tokens, **kwargs):
        seen["tokens"] = tokens
        return jnp.asarray(LOGITS) * params

    objective = make_lm_objective(stub_apply)
    inputs = np.arange(6, dtype=np.int32).reshape(2, 3)
    batch = {"inputs": inputs, "targets": TARGETS, "weights": weights, "loss_denominator": 2.5}
    loss, metrics = objective(1.0, batch, jax.random.PRNGKey(0))

    expected = (numpy_nll(LOGITS, TARGETS) * weights).sum() / 2.5
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    # The target has the largest logit everywhere but row 0, position 2. At row 1, position 0 all
    # logits tie: that counts as a hit.
    correct = np.array([[True, True, False], [True, True, True]])
    assert np.array_equal(correct[:, 1:], (LOGITS.argmax(-1) == TARGETS)[:, 1:])
    np.testing.assert_allclose(metrics["accuracy"], (correct * weights).sum() / 2.5, rtol=1e-6)
    np.testing.assert_array_equal(seen["tokens"], inputs)


def loss_and_grads(cfg, params, batch):
    objective = make_lm_objective(GPT(cfg).apply, deterministic=True)
    batch = dict(batch, loss_denominator=np.sum(batch["weights"]))
    return jax.jit(jax.value_and_grad(lambda p: objective(p, batch, jax.random.PRNGKey(0))[0]))(params)


def test_masked_tokens_change_neither_loss_nor_grads():
    cfg = tiny_model()
    params = init(cfg)
    tokens = random_tokens((3, cfg.context_len + 1), seed=1)
    real_lengths = np.array([16, 9, 4])  # right padding: weights 0 after each row's real tokens
    weights = (np.arange(cfg.context_len)[None] < real_lengths[:, None]).astype(np.float32)
    batch = lm_batch(tokens, weights)

    masked = weights == 0
    changed = dict(batch)
    changed["inputs"] = np.where(masked, random_tokens(masked.shape, seed=2), batch["inputs"])
    changed["targets"] = np.where(masked, random_tokens(masked.shape, seed=3), batch["targets"])
    assert np.any(changed["inputs"] != batch["inputs"]) and np.any(changed["targets"] != batch["targets"])

    loss, grads = loss_and_grads(cfg, params, batch)
    loss_changed, grads_changed = loss_and_grads(cfg, params, changed)
    np.testing.assert_allclose(loss_changed, loss, rtol=1e-6)
    assert_trees_close(grads_changed, grads, rtol=1e-5, atol=1e-7)

    # The check has teeth: changing a weighted target does change the loss.
    real_change = dict(batch, targets=batch["targets"].copy())
    real_change["targets"][1, 0] = (real_change["targets"][1, 0] % (cfg.vocab_size - 1)) + 1
    assert abs(float(loss_and_grads(cfg, params, real_change)[0]) - float(loss)) > 1e-4


@pytest.mark.slow  # the fast tier accumulates in test_sft.py and test_ppo.py ([mesh-accum2])
@pytest.mark.parametrize("accum_steps", [2, 4])
def test_gradient_accumulation_matches_one_big_batch(accum_steps):
    cfg = tiny_model()
    tokens = random_tokens((8, cfg.context_len + 1), seed=4)
    # Uneven weights across micro-batches (which take rows i, i + k, ...): row 0's micro-batch
    # has far fewer weighted tokens, so only a global-token normalisation matches.
    real_lengths = np.array([1, 16, 12, 16, 2, 16, 7, 16])
    weights = (np.arange(cfg.context_len)[None] < real_lengths[:, None]).astype(np.float32)
    batch = lm_batch(tokens, weights)

    def two_steps(accum):
        objective = make_lm_objective(GPT(cfg).apply, deterministic=True)
        optimizer = optax.sgd(0.5)
        step = jax.jit(make_train_step(objective, optimizer, accum_steps=accum))
        state = TrainState.create(init(cfg), optimizer, jax.random.PRNGKey(1))
        history = []
        for i in range(2):
            state, metrics = step(state, batch, jax.random.PRNGKey(i))
            history.append(metrics)
        return state.params, history

    params, history = two_steps(1)
    params_accum, history_accum = two_steps(accum_steps)
    expected_first_loss = loss_and_grads(cfg, init(cfg), batch)[0]
    np.testing.assert_allclose(history[0]["loss"], expected_first_loss, rtol=1e-6)
    for metrics, metrics_accum in zip(history, history_accum):
        for name in ("loss", "accuracy", "grad_norm"):
            np.testing.assert_allclose(metrics_accum[name], metrics[name], rtol=1e-5, err_msg=name)
    assert_trees_close(params_accum, params, rtol=1e-5, atol=1e-6)
