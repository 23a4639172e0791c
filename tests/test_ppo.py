"""PPO (RLHF): GAE, whitening, the KL controller and estimators, and the clipped objective against
hand computations; the rollout's `experience` against the sampler; one PPO train step under every
strategy; the order prompts are drawn in. GRPO and RLOO: their advantages, objective, experience,
groups and one step under every strategy."""

import math
import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import NUM_DEVICES, VOCAB, assert_trees_close, cases, random_tokens, tiny_run

from genai_jax import config
from genai_jax.config import UserError
from genai_jax.evaluation import left_pad
from genai_jax.metrics import summary
from genai_jax.model import GPT, init_params
from genai_jax.objectives.critic_free import group_advantages, leave_one_out_advantages, make_critic_free_objective
from genai_jax.objectives.ppo import adaptive_kl_update, gae, kl_estimate, make_ppo_objective, masked_whiten
from genai_jax.parallel import Mesh, Pmap, Single
from genai_jax.optim import make_ppo_optimizer
from genai_jax.rlhf import (Prompts, check_algorithm, check_batches, experience, load_prompts, pack_minibatch,
                            packed_rows, packed_width, prompt_rows, response_mask, rl_objective, update_order)
from genai_jax.runs import make_ppo_init_fn
from genai_jax.sampling import generate
from genai_jax.tokenizer import CharTokenizer
from genai_jax.train import make_train_step

# ---------------------------------------------------------------------------------------------
# GAE against a plain loop over each episode, in float64


def random_episodes(seed: int, batch: int = 6, length: int = 12):
    """(rewards, values, mask): each row's mask is one span that may start late (a prompt) and end
    early (right padding); outside it rewards and values hold junk that must not leak in."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((batch, length), bool)
    for row in range(batch):
        start = 0 if row == 0 else rng.integers(0, length - 1)
        stop = length if row in (0, 1) else rng.integers(start + 1, length + 1)
        mask[row, start:stop] = True
    mask[-1] = False
    mask[-1, length // 2] = True  # a one-action episode
    return 10 * rng.standard_normal((batch, length)), rng.standard_normal((batch, length)), mask


def hand_gae(rewards, values, mask, gamma, lam):
    """Textbook GAE on each row's episode (its masked span), the value after its last action 0."""
    advantages = np.zeros_like(rewards)
    for row in range(rewards.shape[0]):
        (steps,) = np.nonzero(mask[row])
        r, v = rewards[row, steps], values[row, steps]
        next_v = np.append(v[1:], 0.0)
        running = 0.0
        for t in reversed(range(len(steps))):
            running = r[t] + gamma * next_v[t] - v[t] + gamma * lam * running
            advantages[row, steps[t]] = running
    returns = np.where(mask, advantages + values, 0.0)
    return advantages, returns


@pytest.mark.parametrize("seed", [0, 1])
def test_gae_matches_a_python_loop(seed):
    rewards, values, mask = random_episodes(seed)
    assert mask[:, 0].sum() < len(mask) and mask[:, -1].sum() < len(mask)  # late starts, early ends
    gamma, lam = 0.97, 0.9
    with jax.enable_x64(True):
        advantages, returns = gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma, lam)
        assert advantages.dtype == jnp.float64
        advantages, returns = np.asarray(advantages), np.asarray(returns)
    expected_advantages, expected_returns = hand_gae(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(advantages, expected_advantages, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(returns, expected_returns, rtol=1e-12, atol=1e-12)
    assert (advantages[~mask] == 0).all() and (returns[~mask] == 0).all()


# ---------------------------------------------------------------------------------------------
# Whitening, the KL controller, the KL estimators


def test_masked_whiten():
    rng = np.random.default_rng(0)
    x = 3 * rng.standard_normal((4, 10)) + 5
    mask = rng.random((4, 10)) < 0.6
    assert 10 < mask.sum() < 40
    real = x[mask]
    expected = (real - real.mean()) / real.std()

    whitened = np.asarray(masked_whiten(jnp.asarray(x, jnp.float32), jnp.asarray(mask)))
    np.testing.assert_allclose(whitened[mask], expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(whitened[mask].mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(whitened[mask].std(), 1.0, rtol=1e-5)
    assert (whitened[~mask] == 0).all()

    kept = np.asarray(masked_whiten(jnp.asarray(x, jnp.float32), jnp.asarray(mask), shift_mean=False))
    np.testing.assert_allclose(kept[mask], expected + real.mean(), rtol=1e-5)
    np.testing.assert_allclose(kept[mask].mean(), real.mean(), rtol=1e-5)
    np.testing.assert_allclose(kept[mask].std(), 1.0, rtol=1e-5)
    assert (kept[~mask] == 0).all()


def test_adaptive_kl_update_follows_its_rule():
    """beta * (1 + clip(kl / target - 1, -0.2, 0.2) * batch / horizon)."""
    beta, target, horizon, batch = 0.1, 3.0, 1000, 64
    step = batch / horizon

    def update(kl):
        return adaptive_kl_update(beta, kl, target, horizon, batch)

    assert update(2 * target) == pytest.approx(beta * (1 + 0.2 * step))  # error 1 clipped to 0.2
    assert update(100 * target) == pytest.approx(beta * (1 + 0.2 * step))
    assert update(target) == pytest.approx(beta)
    assert update(0.0) == pytest.approx(beta * (1 - 0.2 * step))  # error -1 clipped to -0.2
    assert update(1.1 * target) == pytest.approx(beta * (1 + 0.1 * step))  # inside the clip
    assert update(0.95 * target) == pytest.approx(beta * (1 - 0.05 * step))


def test_kl_estimators_on_two_categoricals():
    """Per outcome x: k1 = log p/q, k3 = (q/p - 1) - log(q/p) >= 0; weighted by p, both sum to KL(p || q)."""
    p = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    q = np.array([0.1, 0.3, 0.2, 0.25, 0.15])
    true_kl = float(np.sum(p * np.log(p / q)))
    assert true_kl > 0.3
    logp, logq = jnp.asarray(np.log(p), jnp.float32), jnp.asarray(np.log(q), jnp.float32)

    k1 = np.asarray(kl_estimate(logp, logq, "k1"), np.float64)
    np.testing.assert_allclose(k1, np.log(p) - np.log(q), rtol=1e-5, atol=1e-6)
    assert (k1 < 0).any()  # k1 is unbiased but not positive per sample
    k3 = np.asarray(kl_estimate(logp, logq, "k3"), np.float64)
    np.testing.assert_allclose(k3, (q / p - 1) - np.log(q / p), rtol=1e-5, atol=1e-6)
    assert (k3 >= 0).all()
    np.testing.assert_allclose(np.sum(p * k1), true_kl, rtol=1e-5)
    np.testing.assert_allclose(np.sum(p * k3), true_kl, rtol=1e-5)
    assert kl_estimate(logp, logp, "k3").tolist() == [0.0] * 5
    with pytest.raises(ValueError, match="k2"):
        kl_estimate(logp, logq, "k2")


# ---------------------------------------------------------------------------------------------
# The clipped objective by hand, with a stub model whose logits and values are its params

CLIP, CLIP_VALUE, TEMPERATURE = 0.2, 0.2, 0.8
# (ratio, advantage) covering each case of the clipped surrogate; the weight-0 action at [1, 2]
# has an outlying ratio that no metric may see.
RATIOS = np.array([[0.9, 1.1, 1.5, 1.5], [0.5, 0.5, 3.0, 1.0]])
ADVANTAGES = np.array([[1.0, -2.0, 0.7, -0.4], [0.6, -1.2, 5.0, 0.3]])
WEIGHTS = np.array([[1, 1, 1, 1], [1, 1, 0, 1]], np.float32)
# Values: inside the clip range [0, 0], clipped and worse [0, 1], clipped and better [0, 3], ...
VALUES = np.array([[0.5, 1.0, -0.3, 2.0], [0.0, 0.4, 7.0, -1.0]])
OLD_VALUES = np.array([[0.45, 0.0, -0.3, 1.0], [0.5, 0.1, 0.0, -1.1]])
RETURNS = np.array([[1.0, 3.0, 0.0, 0.0], [1.0, -2.0, 0.0, 0.5]])


def stub_apply(params, inputs, *, head, positions, segment_ids, deterministic):
    assert params.ndim == (3 if head == "lm" else 2) and head in ("lm", "scalar")
    return params


def stub_problem():
    """(params, batch, new log-probs in float64): old log-probs are set so the ratios are RATIOS."""
    rng = np.random.default_rng(0)
    logits = 2 * rng.standard_normal((2, 4, 5))
    targets = rng.integers(0, 5, (2, 4)).astype(np.int32)
    tempered = logits / TEMPERATURE
    log_probs = tempered - np.log(np.exp(tempered).sum(-1, keepdims=True))
    new_logprobs = np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    zeros = np.zeros((2, 4), np.int32)
    batch = dict(inputs=zeros, targets=targets, positions=zeros, segment_ids=zeros + 1, weights=WEIGHTS,
                 old_logprobs=(new_logprobs - np.log(RATIOS)).astype(np.float32),
                 advantages=ADVANTAGES.astype(np.float32), old_values=OLD_VALUES.astype(np.float32),
                 returns=RETURNS.astype(np.float32), loss_denominator=np.float32(WEIGHTS.sum()))
    params = {"policy": jnp.asarray(logits, jnp.float32), "value": jnp.asarray(VALUES, jnp.float32)}
    return params, batch, log_probs


def hand_ppo(log_probs, value_coef, entropy_coef) -> dict[str, float]:
    """The PPO terms case by case: with A > 0 the ratio counts up to 1 + clip, with A < 0 down to
    1 - clip; the value loss takes the clipped value only when it is further from the return."""
    policy, value, clipped, value_clipped, approx_kl = [], [], [], [], []
    for ratio, advantage in zip(RATIOS.ravel(), ADVANTAGES.ravel()):
        bounded = min(ratio, 1 + CLIP) if advantage > 0 else max(ratio, 1 - CLIP)
        policy.append(-bounded * advantage)
        clipped.append(not 1 - CLIP <= ratio <= 1 + CLIP)
        approx_kl.append(ratio - 1 - np.log(ratio))
    for v, old, ret in zip(VALUES.ravel(), OLD_VALUES.ravel(), RETURNS.ravel()):
        nearest = min(max(v, old - CLIP_VALUE), old + CLIP_VALUE)
        value.append(0.5 * max((v - ret) ** 2, (nearest - ret) ** 2))
        value_clipped.append(nearest != v)
    probs = np.exp(log_probs)
    token_entropy = -(probs * log_probs).sum(-1).ravel()
    w = WEIGHTS.ravel().astype(np.float64)

    def mean(x):
        return float(np.sum(w * np.asarray(x, np.float64)) / w.sum())

    out = dict(policy_loss=mean(policy), value_loss=mean(value), entropy=mean(token_entropy),
               clip_fraction=mean(clipped), value_clip_fraction=mean(value_clipped), approx_kl=mean(approx_kl),
               ratio_mean=mean(RATIOS.ravel()), ratio_max=float(RATIOS.ravel()[w > 0].max()))
    out["loss"] = out["policy_loss"] + value_coef * out["value_loss"] - entropy_coef * out["entropy"]
    return out


@pytest.mark.parametrize("value_coef,entropy_coef", [(0.1, 0.0), (0.5, 0.01)])
def test_ppo_objective_matches_hand_computation(value_coef, entropy_coef):
    params, batch, log_probs = stub_problem()
    objective = make_ppo_objective(stub_apply, clip_ratio=CLIP, clip_value=CLIP_VALUE, value_coef=value_coef,
                                   entropy_coef=entropy_coef, temperature=TEMPERATURE)
    loss, metrics = jax.jit(objective)(params, batch, None)
    expected = hand_ppo(log_probs, value_coef, entropy_coef)
    assert 0 < expected["clip_fraction"] < 1 and 0 < expected["value_clip_fraction"] < 1
    np.testing.assert_allclose(float(loss), expected["loss"], rtol=1e-5)
    for name, value in metrics.items():
        np.testing.assert_allclose(float(value), expected[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_ppo_policy_gradient_vanishes_where_clipped():
    """No policy gradient flows from clipped actions (ratio beyond the range the advantage favours)
    nor from weight-0 ones; every other action gets one."""
    params, batch, _ = stub_problem()
    objective = make_ppo_objective(stub_apply, clip_ratio=CLIP, temperature=TEMPERATURE)
    grads = jax.jit(jax.grad(lambda p: objective(p, batch, None)[0]))(params)["policy"]
    moved = np.abs(np.asarray(grads)).max(-1) > 0
    favoured_clip = np.where(ADVANTAGES > 0, RATIOS > 1 + CLIP, RATIOS < 1 - CLIP)
    np.testing.assert_array_equal(moved, ~favoured_clip & (WEIGHTS > 0))


# ---------------------------------------------------------------------------------------------
# Rollout experience on a tiny random model

PAD = 0
PROMPT_LEN, NEW_TOKENS, ROWS = 8, 12, NUM_DEVICES
PPO_RUN = config.replace(
    tiny_run(),
    model=dict(vocab_size=VOCAB, n_layer=1, context_len=32, init_std=0.2),
    optim=dict(lr=1e-3, min_lr=1e-3, warmup_steps=0, weight_decay=0.0),
    train=dict(batch_size=ROWS, max_steps=4),
    # gamma = lam = 1: a return is the sum of the rewards still to come.
    ppo=dict(temperature=0.7, max_new_tokens=NEW_TOKENS, gamma=1.0, lam=1.0, no_end_penalty=1.5, value_lr=3e-3,
             epochs=1, minibatches=1),
)


def ppo_run(**ppo) -> config.RunConfig:
    return config.replace(PPO_RUN, ppo=ppo)


@pytest.fixture(scope="module")
def models():
    """Policy, value model, a second policy (another reference) and the reward model."""
    cfg = PPO_RUN.model

    def make():  # jitted: much faster than flax's eager init on CPU
        heads = dict(policy="lm", value="scalar", other="lm", reward="scalar")
        return {name: init_params(cfg, jax.random.PRNGKey(seed), head)
                for seed, (name, head) in enumerate(heads.items())}

    return jax.jit(make)()


def prompts() -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompts of 1 to PROMPT_LEN tokens."""
    lengths = [1 + row % PROMPT_LEN for row in range(ROWS)]
    return left_pad([random_tokens(n, seed=20 + n) for n in lengths], PROMPT_LEN, PAD)


def run_experience(models, response, *, cfg=PPO_RUN, end_id, policy="policy", ref="policy", gain=1.0, bias=0.0,
                   beta=0.1):
    prompt, prompt_mask = prompts()
    params = {"policy": models[policy], "value": models["value"]}
    normalization = {"gain": jnp.float32(gain), "bias": jnp.float32(bias)}
    batch, stats = experience(params, models[ref], models["reward"], normalization, prompt, prompt_mask,
                              jnp.asarray(response), jnp.float32(beta), cfg=cfg, end_ids=(end_id,), pad_id=PAD)
    return jax.tree.map(np.asarray, batch), {name: float(value) for name, value in stats.items()}


def response_lengths(response: np.ndarray, end_id: int) -> np.ndarray:
    """Tokens up to and including the first end-of-turn (all of them if none)."""
    return np.array([list(row).index(end_id) + 1 if end_id in row else len(row) for row in response])


def expected_weights(lengths: np.ndarray) -> np.ndarray:
    """1 on the actions that produced response tokens [0, length), which start at PROMPT_LEN - 1."""
    actions = np.arange(PROMPT_LEN + NEW_TOKENS - 1) - (PROMPT_LEN - 1)
    return ((actions >= 0) & (actions < lengths[:, None])).astype(np.float32)


def test_response_mask():
    end = 3
    response = np.array([[5, 3, 7, 3, 9], [5, 6, 7, 8, 9], [3, 1, 1, 1, 1], [1, 2, 4, 4, 3]])
    expected = [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    np.testing.assert_array_equal(np.asarray(response_mask(jnp.asarray(response), end)), np.array(expected, bool))


@pytest.fixture(scope="module")
def sampled(models):
    """(response, its log-probs from the KV-cache sampler, end id, experience batch) for the
    policy's own samples at temperature 0.7; the end id is a token row 0 samples mid-response."""
    prompt, prompt_mask = prompts()
    response, logprobs = generate(models["policy"], prompt, prompt_mask, jax.random.PRNGKey(7), cfg=PPO_RUN.model,
                                  max_new_tokens=NEW_TOKENS, temperature=PPO_RUN.ppo.temperature,
                                  with_logprobs=True)
    response, logprobs = np.asarray(response), np.asarray(logprobs)
    end_id = int(response[0, NEW_TOKENS // 2])
    assert end_id != PAD
    batch, _ = run_experience(models, response, end_id=end_id)
    return response, logprobs, end_id, batch


# Where the crafted responses put their end-of-turn (None: they never end).
CRAFTED_ENDS = [2, None, 0, NEW_TOKENS - 1, None, 5, None, 7]


def crafted_response(end_id: int) -> np.ndarray:
    rng = np.random.default_rng(5)
    response = rng.choice([t for t in range(1, VOCAB) if t != end_id], (ROWS, NEW_TOKENS)).astype(np.int32)
    for row, end in enumerate(CRAFTED_ENDS):
        if end is not None:
            response[row, end] = end_id
            response[row, end + 1 :: 2] = end_id  # later end tokens change nothing
    return response


def hand_raw_rewards(models, response, lengths) -> np.ndarray:
    """The reward model's scalar at the last real token of prompt + response (cut after its first
    end-of-turn), each sequence alone and right padded, under plain causal attention."""
    prompt, prompt_mask = prompts()
    rows = np.full((ROWS, PPO_RUN.model.context_len), PAD, np.int32)
    ends = []
    for row in range(ROWS):
        sequence = np.concatenate([prompt[row][prompt_mask[row]], response[row, : lengths[row]]])
        rows[row, : len(sequence)] = sequence
        ends.append(len(sequence) - 1)
    values = np.asarray(jax.jit(partial(GPT(PPO_RUN.model).apply, head="scalar"))(models["reward"], rows))
    return values[np.arange(ROWS), ends].astype(np.float64)


def test_experience_scores_weights_and_end_penalty(models, sampled):
    end_id = sampled[2]  # the sampled rollout's end id: experience compiles once for both
    response = crafted_response(end_id)
    lengths = response_lengths(response, end_id)
    ended = np.array([end is not None for end in CRAFTED_ENDS])
    np.testing.assert_array_equal(lengths, [e + 1 if e is not None else NEW_TOKENS for e in CRAFTED_ENDS])
    weights = expected_weights(lengths)
    raw = hand_raw_rewards(models, response, lengths)
    assert np.ptp(raw) > 1e-3

    # With the reference equal to the policy the KL is 0, so every return on the response is its score.
    penalty, gain, bias = PPO_RUN.ppo.no_end_penalty, 0.5, 0.1
    plain_batch, plain = run_experience(models, response, cfg=ppo_run(no_end_penalty=0.0), end_id=end_id,
                                        gain=gain, bias=bias)
    batch, stats = run_experience(models, response, end_id=end_id, gain=gain, bias=bias)
    for b in (plain_batch, batch):
        np.testing.assert_array_equal(b["weights"], weights)
        # The response's tokens after its first end-of-turn become padding.
        kept = np.where(weights[:, PROMPT_LEN - 1 : -1] > 0, response[:, :-1], PAD)
        np.testing.assert_array_equal(b["inputs"][:, PROMPT_LEN:], kept)
    assert plain["kl"] == 0 and stats["kl"] == 0
    proxy = gain * raw + bias
    np.testing.assert_allclose(plain_batch["returns"], proxy[:, None] * weights, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(batch["returns"], (proxy - penalty * ~ended)[:, None] * weights, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["score"] - plain["score"], -penalty * (1 - ended.mean()), rtol=1e-5)
    np.testing.assert_allclose(plain["score"], proxy.mean(), rtol=1e-5, atol=1e-6)
    for name in ("proxy_reward", "ended", "response_tokens"):
        assert stats[name] == plain[name]
    np.testing.assert_allclose(stats["proxy_reward"], proxy.mean(), rtol=1e-5, atol=1e-6)
    assert stats["rl_reward"] == pytest.approx(stats["score"])
    assert stats["ended"] == pytest.approx(ended.mean())
    assert stats["response_tokens"] == pytest.approx(lengths.mean())

    # The normalised score is clipped to +-reward_clip before the penalty comes off.
    clip = PPO_RUN.ppo.reward_clip
    gain = clip / np.median(np.abs(raw))  # about half the scores clip
    assert (np.abs(gain * raw) > clip).any() and (np.abs(gain * raw) < clip).any()
    batch, _ = run_experience(models, response, end_id=end_id, gain=gain)
    score = np.clip(gain * raw, -clip, clip) - penalty * ~ended
    np.testing.assert_allclose(batch["returns"], score[:, None] * weights, rtol=1e-4, atol=1e-4)


def test_experience_logprobs_match_the_sampler(sampled):
    response, logprobs, end_id, batch = sampled
    lengths = response_lengths(response, end_id)
    assert (lengths < NEW_TOKENS).any() and (lengths == NEW_TOKENS).any()
    np.testing.assert_array_equal(batch["weights"], expected_weights(lengths))
    assert np.ptp(logprobs) > 0.5  # a spread of log-probabilities: the check has teeth
    for row, length in enumerate(lengths):
        actions = slice(PROMPT_LEN - 1, PROMPT_LEN - 1 + length)
        np.testing.assert_array_equal(batch["targets"][row, actions], response[row, :length])
        np.testing.assert_allclose(batch["old_logprobs"][row, actions], logprobs[row, :length], rtol=1e-4,
                                   atol=1e-4, err_msg=f"row {row}")
        assert (batch["old_logprobs"][row, PROMPT_LEN - 1 + length :] == 0).all()


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_experience_kl(models, sampled, estimator):
    """0 against the policy itself; against another reference, the per-sequence sum of the
    estimator over the response's actions, from the two models' log-probs of the sampled tokens.
    Each action's reward is -beta times its KL (plus the score at the last), so with gamma = lam = 1
    a return is the score less beta times the KL still to come."""
    response, _, end_id, batch = sampled
    cfg = ppo_run(kl_estimator=estimator)
    same_batch, same = run_experience(models, response, cfg=cfg, end_id=end_id)
    assert same["kl"] == 0 and same["rl_reward"] == pytest.approx(same["score"])

    beta = 0.1
    other_batch, stats = run_experience(models, response, cfg=cfg, end_id=end_id, ref="other", beta=beta)
    reference, _ = run_experience(models, response, cfg=cfg, end_id=end_id, policy="other")
    log_ratio = np.float64(batch["old_logprobs"]) - reference["old_logprobs"]
    assert (log_ratio[batch["weights"] == 0] == 0).all()
    per_token = log_ratio if estimator == "k1" else np.expm1(-log_ratio) + log_ratio
    kl = per_token.sum(1).mean()
    assert abs(kl) > 1e-2  # the check has teeth
    np.testing.assert_allclose(stats["kl"], kl, rtol=1e-4)
    np.testing.assert_allclose(stats["rl_reward"], stats["score"] - beta * kl, rtol=1e-4, atol=1e-6)
    kl_to_come = np.cumsum(per_token[:, ::-1], axis=1)[:, ::-1]
    np.testing.assert_allclose(other_batch["returns"], same_batch["returns"] - beta * kl_to_come * batch["weights"],
                               rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# One PPO train step under every strategy


def step_batch(batch: dict) -> dict:
    """The sampled experience with old log-probs and values moved off the current model's, so
    that ratios spread across the clip range and value clipping happens."""
    rng = np.random.default_rng(0)
    weights = batch["weights"]
    return dict(batch, old_logprobs=batch["old_logprobs"] + 0.3 * rng.standard_normal(weights.shape) * weights,
                old_values=batch["old_values"] + 0.3 * rng.standard_normal(weights.shape) * weights)


def one_ppo_step(strategy, models, batch, accum_steps: int = 1) -> tuple[dict, dict]:
    """(metrics, params) on the host after one step of make_ppo_optimizer from the rollout's models."""
    cfg = PPO_RUN
    init_fn = make_ppo_init_fn(cfg, lambda index: models["policy"], lambda index, seed: models["value"])
    abstract_state = jax.eval_shape(init_fn)
    state = strategy.compile_init(init_fn, abstract_state)()
    objective = make_ppo_objective(GPT(cfg.model).apply, temperature=cfg.ppo.temperature)
    step = strategy.compile(make_train_step(objective, make_ppo_optimizer(cfg), strategy.reduce, accum_steps),
                            abstract_state)
    state, metrics = step(state, strategy.place_batch(batch), jax.random.PRNGKey(2))
    metrics = summary([strategy.metrics_to_host(metrics)])
    return metrics, jax.tree.map(np.asarray, jax.device_get(strategy.state_to_host(state).params))


@pytest.fixture(scope="module")
def single_ppo_step(models, sampled):
    return one_ppo_step(Single(), models, step_batch(sampled[3]))


def max_change(new, old) -> float:
    return max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - np.asarray(b)).max()), new, old)))


def test_ppo_step_on_one_device(models, sampled, single_ppo_step):
    metrics, new_params = single_ppo_step
    batch = step_batch(sampled[3])
    objective = make_ppo_objective(GPT(PPO_RUN.model).apply, temperature=PPO_RUN.ppo.temperature)
    params = {"policy": models["policy"], "value": models["value"]}
    loss, direct = jax.jit(objective)(params, dict(batch, loss_denominator=np.float32(batch["weights"].sum())), None)
    np.testing.assert_allclose(metrics["loss"], float(loss), rtol=1e-5)
    for name, value in direct.items():
        np.testing.assert_allclose(metrics[name], float(value), rtol=1e-5, atol=1e-7, err_msg=name)
    assert 0 < metrics["clip_fraction"] < 1 and 0 < metrics["value_clip_fraction"] < 1
    # Adam's first step moves each parameter by about its learning rate: the policy at optim.lr,
    # the value model at ppo.value_lr.
    np.testing.assert_allclose(max_change(new_params["policy"], models["policy"]), PPO_RUN.optim.lr, rtol=0.02)
    np.testing.assert_allclose(max_change(new_params["value"], models["value"]), PPO_RUN.ppo.value_lr, rtol=0.02)


@pytest.mark.parametrize("make_strategy, accum_steps", cases(
    "mesh-accum2", mesh=(Mesh, 1), pmap=(Pmap, 1), **{"single-accum2": (Single, 2), "mesh-accum2": (Mesh, 2)}))
def test_ppo_step_matches_single_device(make_strategy, accum_steps, models, sampled, single_ppo_step):
    """Every metric, the maximum `ratio_max` too, is the whole batch's, however it is split over
    devices and micro-batches."""
    assert jax.device_count() == NUM_DEVICES
    strategy = make_strategy()
    response_tokens = sampled[3]["weights"].sum(1)
    assert np.ptp(response_tokens) > 0  # devices hold different numbers of actions
    metrics, new_params = one_ppo_step(strategy, models, step_batch(sampled[3]), accum_steps)
    expected_metrics, expected_params = single_ppo_step
    assert set(metrics) == set(expected_metrics)
    for name in metrics:
        np.testing.assert_allclose(metrics[name], expected_metrics[name], rtol=1e-5, atol=1e-7, err_msg=name)
    assert_trees_close(new_params, expected_params, rtol=1e-5, atol=1e-6)


def test_a_packed_minibatch_trains_exactly_as_unpacked(models, sampled, single_ppo_step):
    """Several sequences to a row (segment ids apart, positions their own): the step's metrics and
    the updated parameters are those of the unpacked minibatch, from fewer tokens."""
    batch = step_batch(sampled[3])
    width = PPO_RUN.model.context_len
    rows = next(r for r in range(1, ROWS + 1) if pack_minibatch(batch, r, width) is not None)
    packed = pack_minibatch(batch, rows, width)
    assert rows * width < batch["inputs"].size and pack_minibatch(batch, rows - 1, width) is None
    assert packed["segment_ids"].max() > 1  # some row holds several sequences
    np.testing.assert_array_equal(np.sort(packed["inputs"][packed["segment_ids"] > 0]),
                                  np.sort(batch["inputs"][batch["segment_ids"] > 0]))
    assert packed["weights"].sum() == batch["weights"].sum()
    metrics, new_params = one_ppo_step(Single(), models, packed)
    expected_metrics, expected_params = single_ppo_step
    for name in expected_metrics:
        np.testing.assert_allclose(metrics[name], expected_metrics[name], rtol=1e-5, atol=1e-7, err_msg=name)
    assert_trees_close(new_params, expected_params, rtol=1e-5, atol=1e-6)


def test_packed_rows_default_and_refusals():
    """Room for the minibatch's prompts and half the response slots, one more row, a multiple of
    the devices; no packing where it would not save tokens, or with ppo.pack_rows -1."""
    tokens, mask = left_pad([np.ones(n, np.int32) for n in (10, 20, 30)], 32, PAD)
    prompts = Prompts(tokens, mask, None)
    cfg = config.replace(PPO_RUN, model=dict(context_len=96), ppo=dict(max_new_tokens=16))
    # 16 sequences of 20 + 8 expected tokens in rows of 96: 5 rows, and one more; unpacked, 16 x 47 tokens.
    assert packed_rows(cfg, prompts, 16, divisor=1) == 6
    assert packed_rows(cfg, prompts, 16, divisor=3) == 6
    assert packed_rows(cfg, prompts, 16, divisor=4) == 0  # 8 x 96 > 16 x 47
    assert packed_rows(config.replace(cfg, ppo=dict(pack_rows=-1)), prompts, 16, divisor=1) == 0
    assert packed_rows(config.replace(cfg, ppo=dict(pack_rows=3)), prompts, 16, divisor=1) == 3
    assert packed_rows(config.replace(cfg, ppo=dict(pack_rows=8)), prompts, 16, divisor=1) == 0  # 768 > 16 x 47
    assert packed_width(cfg, prompts) == 96  # two sequences of 47 need 94: the context, 96
    # A pretrained model's context (8192) would make rows of 8192: two sequences of 47, to a multiple of 64.
    long_context = config.replace(cfg, model=dict(context_len=8192))
    assert packed_width(long_context, prompts) == 128
    assert packed_rows(long_context, prompts, 16, divisor=1) == math.ceil(16 * 28 / 128) + 1


def test_ppo_optimizer_with_a_frozen_policy(models):
    """optim.lr 0 (and min_lr 0) leaves the policy where it is and trains the value model alone."""
    cfg = config.replace(PPO_RUN, optim=dict(lr=0.0, min_lr=0.0))
    optimizer = make_ppo_optimizer(cfg)
    params = {"policy": models["policy"], "value": models["value"]}
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    assert not any(np.any(update) for update in jax.tree.leaves(updates["policy"]))
    np.testing.assert_allclose(max_change(updates["value"], jax.tree.map(jnp.zeros_like, params["value"])),
                               cfg.ppo.value_lr, rtol=0.02)


def test_check_batches():
    cfg = config.replace(PPO_RUN, train=dict(batch_size=32), ppo=dict(minibatches=2))
    assert check_batches(cfg, 8) == 16
    with pytest.raises(UserError, match="ppo.minibatches=3"):
        check_batches(config.replace(cfg, ppo=dict(minibatches=3)), 1)
    with pytest.raises(UserError, match="4 rows .* 8 device"):
        check_batches(config.replace(cfg, ppo=dict(minibatches=8)), 8)
    with pytest.raises(UserError, match="grad_accum=4"):
        check_batches(config.replace(cfg, optim=dict(grad_accum=4)), 8)


# ---------------------------------------------------------------------------------------------
# The prompts of each iteration


@pytest.mark.parametrize("batch_size", [4, 25])
def test_prompt_rows_visit_every_prompt_once_per_epoch(batch_size):
    prompts_n, seed, epochs = 10, 3, 5
    iterations = -(-epochs * prompts_n // batch_size)
    stream = np.concatenate([prompt_rows(prompts_n, batch_size, i, seed) for i in range(iterations)])
    assert all(len(prompt_rows(prompts_n, batch_size, i, seed)) == batch_size for i in range(iterations))
    orders = [stream[e * prompts_n : (e + 1) * prompts_n] for e in range(epochs)]
    for order in orders:
        assert sorted(order) == list(range(prompts_n))
    assert len({tuple(order) for order in orders}) == epochs  # a fresh order each epoch
    # A resumed run draws the same rows for an iteration; another seed draws others.
    for i in (0, iterations - 1):
        np.testing.assert_array_equal(prompt_rows(prompts_n, batch_size, i, seed),
                                      stream[i * batch_size : (i + 1) * batch_size])
    other = np.concatenate([prompt_rows(prompts_n, batch_size, i, seed + 1) for i in range(iterations)])
    assert not np.array_equal(other, stream)


# ---------------------------------------------------------------------------------------------
# Critic-free RL: GRPO and RLOO


def test_group_advantages_of_known_groups():
    scores = jnp.array([1.0, 2.0, 3.0, 6.0, 0.5, 0.5, 0.5, 0.5])
    first = np.array([1.0, 2.0, 3.0, 6.0])
    centred = first - first.mean()
    np.testing.assert_allclose(np.asarray(group_advantages(scores, 4))[:4], centred / (first.std() + 1e-4), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(group_advantages(scores, 4, scale=False))[:4], centred, rtol=1e-6)
    for scale in (True, False):  # an all-equal group: nothing to learn, and no NaN
        assert np.all(np.asarray(group_advantages(scores, 4, scale=scale))[4:] == 0)


def test_leave_one_out_advantages():
    rewards = jnp.array([1.0, 2.0, 6.0, 3.0, 3.0, 3.0])
    expected = [1 - 4, 2 - 3.5, 6 - 1.5, 0, 0, 0]  # each minus the mean of its group's others
    np.testing.assert_allclose(np.asarray(leave_one_out_advantages(rewards, 3)), expected, rtol=1e-6)
    # = G / (G - 1) times the reward less the group mean
    np.testing.assert_allclose(np.asarray(leave_one_out_advantages(rewards, 3))[:3], 1.5 * (np.array([1, 2, 6]) - 3),
                               rtol=1e-6)


@pytest.mark.parametrize("kl_coef", [0.0, 0.3])
def test_critic_free_objective_matches_hand_computation(kl_coef):
    params, batch, log_probs = stub_problem()
    expected = hand_ppo(log_probs, value_coef=0.0, entropy_coef=0.01)
    new_logprobs = batch["old_logprobs"] + np.log(RATIOS)
    ref_logprobs = (new_logprobs - 0.5 * np.random.default_rng(1).standard_normal(RATIOS.shape)).astype(np.float32)
    batch = {name: value for name, value in batch.items() if name not in ("old_values", "returns")}
    batch["ref_logprobs"] = ref_logprobs * WEIGHTS
    objective = make_critic_free_objective(stub_apply, clip_ratio=CLIP, kl_coef=kl_coef, entropy_coef=0.01,
                                           temperature=TEMPERATURE)
    loss, metrics = jax.jit(objective)({"policy": params["policy"]}, batch, None)
    log_ratio = ref_logprobs.astype(np.float64) - new_logprobs  # log(pi_ref / pi)
    k3 = float(np.sum((np.expm1(log_ratio) - log_ratio) * WEIGHTS) / WEIGHTS.sum())
    np.testing.assert_allclose(float(loss), expected["loss"] + kl_coef * k3, rtol=1e-5)
    for name in ("policy_loss", "entropy", "clip_fraction", "approx_kl", "ratio_mean", "ratio_max"):
        np.testing.assert_allclose(float(metrics[name]), expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert ("reference_kl" in metrics) == (kl_coef > 0)


GROUP = 4


def critic_free_run(**ppo) -> config.RunConfig:
    return ppo_run(group_size=GROUP, **ppo)


@pytest.mark.parametrize("algorithm, aggregation", [("grpo", "token"), ("grpo", "sequence"), ("rloo", "token")])
def test_critic_free_experience(models, sampled, algorithm, aggregation):
    """Advantages from the group's scores on every response token (RLOO's reward with its KL);
    GRPO keeps the reference's log-probabilities for its loss; no value model anywhere."""
    response, _, end_id, ppo_batch = sampled
    cfg = critic_free_run(algorithm=algorithm, loss_aggregation=aggregation)
    beta = 0.1
    batch, stats = run_experience(models, response, cfg=cfg, end_id=end_id, ref="other", beta=beta)
    assert "old_values" not in batch and "returns" not in batch and "explained_variance" not in stats
    weights = ppo_batch["weights"]
    np.testing.assert_array_equal(batch["old_logprobs"], ppo_batch["old_logprobs"])
    reference, _ = run_experience(models, response, end_id=end_id, policy="other")
    # The per-sequence scores are PPO's returns at the first action when the KL is zero.
    plain, _ = run_experience(models, response, end_id=end_id)
    first_action = PROMPT_LEN - 1
    scores = plain["returns"][:, first_action]
    if algorithm == "grpo":
        expected = np.asarray(group_advantages(jnp.asarray(scores), GROUP))
        np.testing.assert_allclose(batch["ref_logprobs"], reference["old_logprobs"], rtol=1e-6)
    else:
        sequence_kl = np.sum(ppo_batch["old_logprobs"] - reference["old_logprobs"], axis=1)
        expected = np.asarray(leave_one_out_advantages(jnp.asarray(scores - beta * sequence_kl), GROUP))
        assert "ref_logprobs" not in batch
    np.testing.assert_allclose(batch["advantages"], expected[:, None] * weights, rtol=1e-4, atol=1e-5)
    if aggregation == "sequence":
        np.testing.assert_allclose(batch["weights"], weights / weights.sum(1, keepdims=True), rtol=1e-6)
    else:
        np.testing.assert_array_equal(batch["weights"], weights)


def test_group_samples_differ_and_stay_together_through_minibatching(models):
    """The rollout repeats each prompt G times: the samples of a group differ (each row draws its
    own tokens), and every epoch's order keeps a group's rows adjacent and whole."""
    prompt, prompt_mask = prompts()
    repeated = np.repeat(np.arange(2), GROUP)
    response = np.asarray(generate(models["policy"], prompt[repeated], prompt_mask[repeated], jax.random.PRNGKey(3),
                                   cfg=PPO_RUN.model, max_new_tokens=NEW_TOKENS, temperature=1.0))
    for group in range(2):
        assert len({tuple(row) for row in response[group * GROUP : (group + 1) * GROUP]}) == GROUP
    for epoch in range(3):
        order = update_order(4 * GROUP, GROUP, [0, 1, epoch])
        assert sorted(order) == list(range(4 * GROUP))
        for block in order.reshape(-1, GROUP):
            assert block[0] % GROUP == 0 and list(block) == list(range(block[0], block[0] + GROUP))
    assert not np.array_equal(update_order(4 * GROUP, GROUP, [0, 1, 0]), update_order(4 * GROUP, GROUP, [0, 1, 1]))
    np.testing.assert_array_equal(update_order(8, 1, [0, 1, 0]), np.random.default_rng([0, 1, 0]).permutation(8))


def test_critic_free_runs_have_no_value_model(models):
    cfg = critic_free_run(algorithm="grpo")
    state = jax.eval_shape(make_ppo_init_fn(cfg, lambda index: models["policy"]))
    assert set(state.params) == {"policy"}
    assert check_batches(config.replace(cfg, ppo=dict(minibatches=2)), 4) == ROWS // 2 * GROUP
    for bad, message in ((dict(group_size=1), "group-size to 2 or more"), (dict(kl_target=0.5), "grpo's KL is a loss term")):
        with pytest.raises(UserError, match=message):
            check_algorithm(config.replace(cfg, ppo=bad))


def one_critic_free_step(strategy, models, batch, accum_steps: int = 1) -> tuple[dict, dict]:
    cfg = critic_free_run(algorithm="grpo", kl_coef=0.2)
    init_fn = make_ppo_init_fn(cfg, lambda index: models["policy"])
    abstract_state = jax.eval_shape(init_fn)
    state = strategy.compile_init(init_fn, abstract_state)()
    step = strategy.compile(make_train_step(rl_objective(cfg), make_ppo_optimizer(cfg), strategy.reduce, accum_steps),
                            abstract_state)
    state, metrics = step(state, strategy.place_batch(batch), jax.random.PRNGKey(2))
    metrics = summary([strategy.metrics_to_host(metrics)])
    return metrics, jax.tree.map(np.asarray, jax.device_get(strategy.state_to_host(state).params))


@pytest.fixture(scope="module")
def grpo_batch(models, sampled):
    response, _, end_id, _ = sampled
    batch, _ = run_experience(models, response, cfg=critic_free_run(algorithm="grpo", loss_aggregation="sequence"),
                              end_id=end_id, ref="other")
    rng = np.random.default_rng(0)  # old log-probs off the current policy's, so ratios clip
    return dict(batch, old_logprobs=batch["old_logprobs"] + 0.3 * rng.standard_normal(batch["weights"].shape)
                * (batch["weights"] > 0))


@pytest.fixture(scope="module")
def single_critic_free_step(models, grpo_batch):
    return one_critic_free_step(Single(), models, grpo_batch)


def test_critic_free_step_on_one_device(models, single_critic_free_step):
    metrics, new_params = single_critic_free_step
    assert set(new_params) == {"policy"} and metrics["reference_kl"] > 0 and 0 < metrics["clip_fraction"] < 1
    assert max_change(new_params["policy"], models["policy"]) > 1e-4


@pytest.mark.parametrize("make_strategy, accum_steps", cases(
    "mesh", mesh=(Mesh, 1), pmap=(Pmap, 1), **{"mesh-fsdp2": (lambda: Mesh(fsdp=2), 1), "single-accum2": (Single, 2)}))
def test_critic_free_step_matches_single_device(make_strategy, accum_steps, models, grpo_batch,
                                                 single_critic_free_step):
    metrics, new_params = one_critic_free_step(make_strategy(), models, grpo_batch, accum_steps)
    expected_metrics, expected_params = single_critic_free_step
    assert set(metrics) == set(expected_metrics)
    for name in metrics:
        np.testing.assert_allclose(metrics[name], expected_metrics[name], rtol=2e-5, atol=1e-6, err_msg=name)
    assert_trees_close(new_params, expected_params, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# PPO-ptx: the RL loss plus the LM loss on pretraining windows, in one step


def ptx_windows(rows: int = ROWS) -> dict:
    tokens = random_tokens((rows, PPO_RUN.model.context_len + 1), seed=5)
    return {"ptx_inputs": tokens[:, :-1], "ptx_targets": tokens[:, 1:]}


def test_ptx_objective_adds_the_lm_loss(models, grpo_batch):
    cfg = critic_free_run(algorithm="grpo", kl_coef=0.2, ptx_coef=0.7)
    params = {"policy": models["policy"]}
    windows = ptx_windows()
    batch = dict(grpo_batch, loss_denominator=np.float32(grpo_batch["weights"].sum()))
    loss, metrics = rl_objective(cfg)(params, batch | windows, None)
    rl_loss, _ = rl_objective(config.replace(cfg, ppo=dict(ptx_coef=0.0)))(params, batch, None)
    logits = np.asarray(GPT(cfg.model).apply(models["policy"], windows["ptx_inputs"]), np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, windows["ptx_targets"][..., None], -1).mean()
    np.testing.assert_allclose(float(metrics["ptx_loss"]), nll, rtol=1e-5)
    np.testing.assert_allclose(float(loss), float(rl_loss) + 0.7 * nll, rtol=1e-5)


@pytest.mark.parametrize("make_strategy, accum_steps", cases(
    "pmap", pmap=(Pmap, 1), mesh=(Mesh, 1), **{"single-accum2": (Single, 2)}))
def test_ptx_step_matches_single_device(make_strategy, accum_steps, models, grpo_batch):
    cfg = critic_free_run(algorithm="grpo", kl_coef=0.2, ptx_coef=0.7)

    def step(strategy, accum):
        init_fn = make_ppo_init_fn(cfg, lambda index: models["policy"])
        abstract_state = jax.eval_shape(init_fn)
        state = strategy.compile_init(init_fn, abstract_state)()
        train_step = make_train_step(rl_objective(cfg), make_ppo_optimizer(cfg), strategy.reduce, accum)
        state, metrics = strategy.compile(train_step, abstract_state)(
            state, strategy.place_batch(grpo_batch | ptx_windows()), jax.random.PRNGKey(2))
        return summary([strategy.metrics_to_host(metrics)]), jax.device_get(strategy.state_to_host(state).params)

    metrics, params = step(make_strategy(), accum_steps)
    expected_metrics, expected_params = step(Single(), 1)
    assert metrics["ptx_loss"] > 0
    for name in expected_metrics:
        np.testing.assert_allclose(metrics[name], expected_metrics[name], rtol=2e-5, atol=1e-6, err_msg=name)
    assert_trees_close(params, expected_params, rtol=1e-4, atol=1e-6)


def test_a_prompt_the_tokenizer_cannot_encode_or_fit_names_its_file_and_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "reverse abc"}\n\n{"prompt": "reverse \\u20ac"}\n')
    cfg = config.replace(config.preset("tiny", "ppo"), data=dict(path=str(path)), model=dict(context_len=40))
    tokenizer = CharTokenizer.build("reverse abc")
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}:3: the prompt: character '\u20ac'"):
        load_prompts(cfg, tokenizer)
    path.write_text('{"prompt": "abc"}\n\n\n{"prompt": "' + "abc " * 20 + '"}\n')
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}:4: the prompt has 83 tokens"):  # 80 + 3 specials
        load_prompts(cfg, tokenizer)
