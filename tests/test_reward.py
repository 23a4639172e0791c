"""The reward model: the Bradley-Terry loss (by hand, under every strategy), reading rewards at the
last real token, the scalar head on an SFT trunk, preference rows, normalisation, the reward stage
end to end and the `score` command."""

import dataclasses
import json
import string

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import (
    BASE_RUN,
    NUM_DEVICES,
    assert_one_error,
    assert_trees_close,
    cases,
    cli_flags,
    init,
    random_tokens,
    run_cli,
    snapshot,
    tiny_model,
)

from genai_jax import cli, completion, config, reward, rlhf, rundir, runs, stages
from genai_jax.config import UserError
from genai_jax.data import world
from genai_jax.data.chat import build_preference_rows, prompt_tail
from genai_jax.data.preferences import PreferenceGroup, parse_hh_transcript
from genai_jax.metrics import summary
from genai_jax.model import GPT, init_params, with_scalar_head
from genai_jax.objectives.bradley_terry import make_bradley_terry_objective, sequence_rewards
from genai_jax.parallel import Mesh, Pmap, Single, fsdp_spec
from genai_jax.sweeps import runner
from genai_jax.tokenizer import END, CharTokenizer, encode_chat
from genai_jax.train import TrainState, make_train_step

# Every character the world's prompts and answers use, and a few more.
CHAR = CharTokenizer.build(string.ascii_letters + string.digits + " .?+=:")


# ---------------------------------------------------------------------------------------------
# The Bradley-Terry loss by hand, with a stub model whose rewards are known

B, K, T = 4, 3, 6
# Rewards of each (group, slot). Group 0: a pair whose padded third slot claims the best rank
# (valid must exclude it); group 1: a K = 3 ranking; group 2: a pair; group 3: a zero-weight
# padded group with real-looking content (its weight must exclude it).
REWARDS = np.array([[0.3, -0.4, 5.0], [1.1, 0.2, -0.7], [-1.3, 0.6, 4.0], [2.0, -2.0, 1.5]])
RANK = np.array([[1, 0, 0], [2, 0, 1], [0, 1, 3], [0, 1, 2]], np.int32)
VALID = np.array([[1, 1, 0], [1, 1, 1], [1, 1, 0], [1, 1, 1]], bool)
WEIGHTS = np.array([1.0, 1.0, 1.0, 0.0], np.float32)
MARGIN = np.array([0.5, 0.0, -0.25, 3.0], np.float32)
# Real tokens of each row, and whether it is right padded (else left padded).
LENGTHS = np.array([[4, 2, 6], [5, 3, 1], [6, 4, 2], [3, 3, 3]])
RIGHT = np.array([[1, 0, 1], [0, 1, 1], [1, 0, 0], [1, 1, 0]], bool)
FILLER = 10.0  # the stub's value at every position but the last real one


def stub_batch() -> tuple[dict, jnp.ndarray]:
    """(batch, table): the stub model's value of a token is table[token]; the last real token of
    row (b, k) is 1 + b * K + k, worth REWARDS[b, k], every other token (padding included) FILLER."""
    tokens = np.zeros((B, K, T), np.int32)
    mask = np.zeros((B, K, T), np.int32)
    filler_ids = 1 + B * K + np.arange(4)
    rng = np.random.default_rng(0)
    for b in range(B):
        for k in range(K):
            row = rng.choice(filler_ids, T)
            length = LENGTHS[b, k]
            real = slice(0, length) if RIGHT[b, k] else slice(T - length, T)
            row[real.stop - 1] = 1 + b * K + k
            tokens[b, k], mask[b, k, real] = row, 1
    table = np.full(1 + B * K + 4, FILLER, np.float32)
    table[1 : 1 + B * K] = REWARDS.reshape(-1)
    batch = dict(tokens=tokens, mask=mask, rank=RANK, valid=VALID, weights=WEIGHTS, margin=MARGIN,
                 loss_denominator=np.float32(WEIGHTS.sum()))
    return batch, jnp.asarray(table)


def stub_apply(params, tokens, head="lm", **kwargs):
    assert head == "scalar"
    return params[tokens]


def bt_objective(batch, table, centering=0.0):
    objective = make_bradley_terry_objective(stub_apply, deterministic=True, centering=centering)
    loss, metrics = objective(table, batch, jax.random.PRNGKey(0))
    return float(loss), summary([metrics])


def hand_bradley_terry(rank, margin, centering=0.0) -> dict[str, float]:
    """Loss and metrics by hand in float64: per prompt, the mean over the pairs its ranking implies."""
    totals = dict(loss=0.0, accuracy=0.0, margin=0.0, chosen_reward=0.0, rejected_reward=0.0, chosen_square=0.0,
                  rejected_square=0.0)
    for b in range(B):
        if WEIGHTS[b] == 0:
            continue
        valid = [k for k in range(K) if VALID[b, k]]
        implied = [(i, j) for i in valid for j in valid if rank[b, i] < rank[b, j]]
        assert len(implied) == len(valid) * (len(valid) - 1) // 2
        for i, j in implied:
            better, worse = REWARDS[b, i], REWARDS[b, j]
            w = WEIGHTS[b] / len(implied)
            totals["loss"] += w * (np.logaddexp(0.0, -(better - worse - margin[b])) + centering * (better + worse) ** 2)
            totals["accuracy"] += w * (better > worse)
            totals["margin"] += w * (better - worse)
            totals["chosen_reward"] += w * better
            totals["rejected_reward"] += w * worse
            totals["chosen_square"] += w * better**2
            totals["rejected_square"] += w * worse**2
    means = {name: value / WEIGHTS.sum() for name, value in totals.items()}
    for side in ("chosen", "rejected"):
        means[f"{side}_reward_std"] = np.sqrt(means.pop(f"{side}_square") - means[f"{side}_reward"] ** 2)
    return means


def assert_matches_hand(loss, metrics, expected):
    np.testing.assert_allclose(loss, expected["loss"], rtol=1e-5)
    for name in ("accuracy", "margin", "chosen_reward", "rejected_reward", "chosen_reward_std", "rejected_reward_std"):
        np.testing.assert_allclose(metrics[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_bradley_terry_loss_matches_hand_computation():
    batch, table = stub_batch()
    loss, metrics = bt_objective(batch, table)
    expected = hand_bradley_terry(RANK, MARGIN)
    assert_matches_hand(loss, metrics, expected)
    assert 0 < expected["accuracy"] < 1

    # The K = 3 prompt counts once: alone in the batch, its loss is the mean of its three pairs'.
    alone = dict(batch, weights=np.array([0, 1, 0, 0], np.float32), loss_denominator=np.float32(1))
    r = REWARDS[1]
    pair_losses = [np.logaddexp(0, -(r[i] - r[j])) for i, j in ((1, 2), (1, 0), (2, 0))]  # ranking 1 > 2 > 0
    np.testing.assert_allclose(bt_objective(alone, table)[0], np.mean(pair_losses), rtol=1e-5)


def test_swapping_chosen_and_rejected():
    batch, table = stub_batch()
    _, metrics = bt_objective(batch, table)
    # Reverse every ranking among the valid responses (ranks of invalid slots don't matter).
    swapped_rank = np.where(VALID, VALID.sum(1, keepdims=True) - 1 - np.where(VALID, RANK, 0), RANK).astype(np.int32)
    assert (swapped_rank[VALID] != RANK[VALID]).any()
    swapped_loss, swapped = bt_objective(dict(batch, rank=swapped_rank), table)
    assert_matches_hand(swapped_loss, swapped, hand_bradley_terry(swapped_rank, MARGIN))
    np.testing.assert_allclose(swapped["accuracy"], 1 - metrics["accuracy"], rtol=1e-6)  # no tied rewards
    np.testing.assert_allclose(swapped["margin"], -metrics["margin"], rtol=1e-6)
    assert abs(metrics["margin"]) > 0.1
    np.testing.assert_allclose(swapped["chosen_reward"], metrics["rejected_reward"], rtol=1e-6)


def test_margin_shifts_the_loss():
    batch, table = stub_batch()
    without = {name: value for name, value in batch.items() if name != "margin"}
    loss_without, _ = bt_objective(without, table)
    loss_zero, _ = bt_objective(dict(batch, margin=np.zeros(B, np.float32)), table)
    loss_with, _ = bt_objective(batch, table)
    np.testing.assert_allclose(loss_without, hand_bradley_terry(RANK, np.zeros(B))["loss"], rtol=1e-5)
    np.testing.assert_allclose(loss_zero, loss_without, rtol=1e-6)
    np.testing.assert_allclose(loss_with, hand_bradley_terry(RANK, MARGIN)["loss"], rtol=1e-5)
    assert abs(loss_with - loss_without) > 1e-2
    # A larger margin asks more of the better response: the loss grows.
    loss_more, _ = bt_objective(dict(batch, margin=MARGIN + 1.0), table)
    np.testing.assert_allclose(loss_more, hand_bradley_terry(RANK, MARGIN + 1.0)["loss"], rtol=1e-5)
    assert loss_more > loss_with


def test_centering_adds_the_weighted_mean_square_sum():
    batch, table = stub_batch()
    coef = 0.1
    plain, plain_metrics = bt_objective(batch, table)
    centered, centered_metrics = bt_objective(batch, table, centering=coef)
    np.testing.assert_allclose(centered, hand_bradley_terry(RANK, MARGIN, centering=coef)["loss"], rtol=1e-5)
    squares = 0.0
    for b in range(B - 1):  # the last group has weight 0
        valid = np.flatnonzero(VALID[b])
        implied = [(i, j) for i in valid for j in valid if RANK[b, i] < RANK[b, j]]
        squares += sum((REWARDS[b, i] + REWARDS[b, j]) ** 2 for i, j in implied) / len(implied)
    np.testing.assert_allclose(centered - plain, coef * squares / 3, rtol=1e-4)
    assert centered_metrics["accuracy"] == plain_metrics["accuracy"]


# ---------------------------------------------------------------------------------------------
# Rewards of the real model at the last real token

RM_MODEL = tiny_model(vocab_size=CHAR.vocab_size, context_len=16, head="scalar", init_std=0.2)


def test_reward_is_read_at_the_last_real_token_whatever_the_padding():
    params = init(RM_MODEL, seed=1)
    values = jax.jit(lambda p, tokens: GPT(RM_MODEL).apply(p, tokens, head="scalar"))
    width = RM_MODEL.context_len
    sequences = [random_tokens((length,), seed=length, vocab=CHAR.vocab_size) for length in (5, 9, width)]
    expected = [float(np.asarray(values(params, seq[None]))[0, -1]) for seq in sequences]
    assert len({round(e, 4) for e in expected}) == 3

    # Each sequence right padded, left padded and in the middle of a row whose padding holds junk
    # tokens (the mask alone says what is real); the longest fills its row (no padding).
    tokens = random_tokens((9, width), seed=99, vocab=CHAR.vocab_size)
    mask = np.zeros((9, width), np.int32)
    for s, seq in enumerate(sequences):
        for p, start in enumerate((0, width - len(seq), (width - len(seq)) // 2)):
            tokens[3 * s + p, start : start + len(seq)] = seq
            mask[3 * s + p, start : start + len(seq)] = 1
    assert mask[-1].all()
    rewards = sequence_rewards(GPT(RM_MODEL).apply, params, tokens, mask)
    np.testing.assert_allclose(np.asarray(rewards), np.repeat(expected, 3), rtol=1e-5, atol=1e-6)

    # The check has teeth: reading the left-padded row without its mask gives another value.
    left = np.asarray(values(params, tokens[1:2]))[0, -1]
    assert abs(left - expected[0]) > 1e-3


# ---------------------------------------------------------------------------------------------
# The scalar head on an SFT trunk


@pytest.mark.parametrize("tied", cases("tied", untied=False, tied=True))
def test_with_scalar_head_keeps_the_trunk(tied):
    d = 256
    lm_cfg = tiny_model(d_model=d, tie_embeddings=tied)
    sft_params = init(lm_cfg, seed=3)
    assert ("lm_head" in sft_params["params"]) == (not tied)
    rm_params = with_scalar_head(sft_params, lm_cfg, jax.random.PRNGKey(4))

    trunk = {name for name in sft_params["params"] if name != "lm_head"}
    assert set(rm_params["params"]) == trunk | {"scalar_head"}
    for name in trunk:
        assert_trees_close(rm_params["params"][name], sft_params["params"][name], rtol=0, atol=0)
    # The same structure and shapes the reward stage's own init makes (checkpoints restore into it).
    rm_cfg = dataclasses.replace(lm_cfg, head="scalar")
    fresh = init_params(rm_cfg, jax.random.PRNGKey(0))
    assert jax.tree.structure(fresh) == jax.tree.structure(rm_params)
    assert jax.tree.map(np.shape, fresh) == jax.tree.map(np.shape, rm_params)

    head = rm_params["params"]["scalar_head"]
    kernel = np.asarray(head["kernel"])
    assert kernel.shape == (d, 1)
    np.testing.assert_allclose(kernel.std(), 1 / np.sqrt(d + 1), rtol=0.2)
    assert abs(kernel.mean()) < 3 / np.sqrt(d + 1) / np.sqrt(d)
    np.testing.assert_array_equal(np.asarray(head["bias"]), 0.0)
    values = GPT(rm_cfg).apply(rm_params, random_tokens((2, 8)), head="scalar")
    assert values.shape == (2, 8) and np.isfinite(np.asarray(values)).all()


# ---------------------------------------------------------------------------------------------
# Preference rows


def user(text: str) -> tuple[dict, ...]:
    return ({"role": "user", "content": text},)


def encoded(group: PreferenceGroup, response: str) -> np.ndarray:
    return encode_chat(CHAR, [*group.prompt, {"role": "assistant", "content": response}])[0]


PAIR = PreferenceGroup(user("2+2?"), ("4", "5"), (0, 1), margin=0.5)
RANKED = PreferenceGroup(user("name a prime"), ("4", "7", "9"), (1, 2, 0))
FLIPPED = PreferenceGroup(user("3+4?"), ("8", "7"), (1, 0))


def test_preference_rows_of_pairs_and_a_ranking():
    rows, stats = build_preference_rows([PAIR, RANKED, FLIPPED], CHAR, 24)
    assert stats == {"groups": 3, "pairs": 1 + 3 + 1, "truncated": 0, "dropped": 0}
    assert rows["tokens"].shape == rows["mask"].shape == (3, 3, 24)
    np.testing.assert_array_equal(rows["rank"][:, :2], [[0, 1], [2, 0], [1, 0]])
    assert rows["rank"][1, 2] == 1
    np.testing.assert_array_equal(rows["valid"], [[1, 1, 0], [1, 1, 1], [1, 1, 0]])
    np.testing.assert_array_equal(rows["weights"], [1, 1, 1])
    np.testing.assert_array_equal(rows["margin"], [0.5, 0, 0])
    for g, group in enumerate([PAIR, RANKED, FLIPPED]):
        for k, response in enumerate(group.responses):
            expected = encoded(group, response)
            np.testing.assert_array_equal(rows["tokens"][g, k, : len(expected)], expected)
            np.testing.assert_array_equal(rows["tokens"][g, k, len(expected) :], CHAR.pad_id)
            np.testing.assert_array_equal(rows["mask"][g, k], np.arange(24) < len(expected))
    assert not rows["mask"][[0, 2], 2].any()  # the pairs' third slot is padding
    # The best response by rank is the one the ranking puts first.
    for g, group in enumerate([PAIR, RANKED, FLIPPED]):
        assert int(np.argmin(np.where(rows["valid"][g], rows["rank"][g], 99))) == group.ranking[0]


LONG = PreferenceGroup(user("how many letters are in abcdef? " * 2), ("6", "5"), (0, 1))


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_overlong_preference_groups(overlong):
    seq_len = 24
    lengths = [len(encoded(LONG, r)) for r in LONG.responses]
    assert min(lengths) > seq_len
    rows, stats = build_preference_rows([PAIR, LONG, FLIPPED], CHAR, seq_len, overlong)
    if overlong == "drop":
        assert stats == {"groups": 3, "pairs": 2, "truncated": 0, "dropped": 1}
        np.testing.assert_array_equal(rows["rank"], [[0, 1], [1, 0]])
        np.testing.assert_array_equal(rows["tokens"][1, 0, : len(encoded(FLIPPED, "8"))], encoded(FLIPPED, "8"))
        return
    assert stats == {"groups": 3, "pairs": 3, "truncated": 1, "dropped": 0}
    for k, response in enumerate(LONG.responses):
        np.testing.assert_array_equal(rows["tokens"][1, k], encoded(LONG, response)[-seq_len:])
        assert rows["tokens"][1, k, -1] == CHAR.special_id(END)
        assert rows["mask"][1, k].all()
    assert CHAR.decode(rows["tokens"][1, 0]).endswith("<|assistant|>6<|end|>")


def test_preference_rows_name_a_group_with_an_unknown_character():
    bad = PreferenceGroup(user("2+2?"), ("4", "four \u20ac"), (0, 1))
    with pytest.raises(UserError, match=r"preference group 12: .*'\u20ac'"):
        build_preference_rows([PAIR, RANKED, bad], CHAR, 24, first=10)


# An HH-RLHF-like history: 3 * 2 (a role and an end each) + 2 * 30 + 10 + 1 = 77 tokens with the
# generation prompt.
HISTORY = (*user("a" * 30), {"role": "assistant", "content": "b" * 30}, *user("c" * 10))


@pytest.mark.parametrize("context_len, tail", [
    (77 + 16, HISTORY),  # fits: whole
    (64 + 16, (*user("a" * 17), *HISTORY[1:])),  # the earliest user turn's start cut, to the last token
    (40 + 16, user("c" * 10)),  # that turn cannot stay (the assistant's alone is 32 tokens): the next one
    (8 + 16, user("c" * 5)),
    (3 + 16, user("")),
])
def test_prompt_tail_keeps_the_end_that_leaves_room_to_answer(context_len, tail):
    assert prompt_tail(CHAR, HISTORY, context_len, 16) == list(tail)
    assert len(encode_chat(CHAR, list(tail), generation_prompt=True)[0]) <= context_len - 16


def test_prompt_tail_refuses_a_context_with_no_room_for_a_prompt():
    with pytest.raises(UserError, match=r"^model\.context_len=18 leaves no room for a prompt and 16 new tokens$"):
        prompt_tail(CHAR, HISTORY, 18, 16)


def test_a_reward_run_is_finished_with_its_normalisation_only(tmp_path):
    """The pipeline (which skips finished stages) and the sweep runner (which counts them done)
    ask `completion.finished`: a reward run stopped after its last checkpoint, before its
    normalisation, is unfinished for both."""
    for name, head in (("sft", "lm"), ("reward", "scalar")):
        run_dir = tmp_path / name
        (run_dir / "checkpoints" / "2").mkdir(parents=True)
        (run_dir / "checkpoints" / "4.orbax-checkpoint-tmp-1").mkdir()  # a step being written
        (run_dir / "config.json").write_text(json.dumps({"train": {"max_steps": 4}, "model": {"head": head}}))
        assert not completion.finished(run_dir) and not runner.finished(name, str(run_dir))
        assert completion.finished(run_dir, max_steps=2) == (head == "lm")
        (run_dir / "checkpoints" / "4").mkdir()
        assert completion.finished(run_dir) == runner.finished(name, str(run_dir)) == (head == "lm")
    (tmp_path / "reward" / "reward_normalization.json").write_text(json.dumps({"gain": 1.0, "bias": 0.0}))
    assert completion.finished(tmp_path / "reward") and runner.finished("reward", str(tmp_path / "reward"))


# ---------------------------------------------------------------------------------------------
# One train step under every strategy

# d_model 64: the MLP kernels are big enough for FSDP to split them.
STEP_MODEL = tiny_model(vocab_size=CHAR.vocab_size, context_len=40, head="scalar", d_model=64)


def step_rows() -> dict:
    """8 groups (every third a K = 3 ranking) of world problems; the last has weight 0."""
    groups = []
    for i, problem in enumerate(world.problems(5, NUM_DEVICES)):
        answer = problem.answer
        responses = (answer, answer + answer[-1], "no") if i % 3 == 0 else (answer + answer[0], answer)
        ranking = (0, 2, 1) if len(responses) == 3 else (1, 0)
        groups.append(PreferenceGroup(tuple(world.chat(problem)[:1]), responses, ranking))
    rows, _ = build_preference_rows(groups, CHAR, STEP_MODEL.context_len)
    rows["weights"][-1] = 0.0
    return rows


def one_bt_step(strategy, accum_steps: int = 1) -> tuple[dict, dict]:
    """(metrics, params) on the host after one Bradley-Terry step with plain SGD."""
    optimizer = optax.sgd(0.5)

    def init_fn():
        return TrainState.create(init(STEP_MODEL), optimizer, jax.random.PRNGKey(1))

    abstract_state = jax.eval_shape(init_fn)
    state = strategy.compile_init(init_fn, abstract_state)()
    objective = make_bradley_terry_objective(GPT(STEP_MODEL).apply, deterministic=True)
    step = strategy.compile(make_train_step(objective, optimizer, strategy.reduce, accum_steps), abstract_state)
    state, metrics = step(state, strategy.place_batch(step_rows()), jax.random.PRNGKey(2))
    metrics = summary([strategy.metrics_to_host(metrics)])
    return metrics, jax.tree.map(np.asarray, jax.device_get(strategy.state_to_host(state).params))


@pytest.fixture(scope="module")
def single_bt_step():
    return one_bt_step(Single())


def test_bradley_terry_step_on_one_device(single_bt_step):
    metrics, new_params = single_bt_step
    rows = step_rows()
    objective = make_bradley_terry_objective(GPT(STEP_MODEL).apply, deterministic=True)
    params = init(STEP_MODEL)
    loss, direct = objective(params, dict(rows, loss_denominator=np.float32(rows["weights"].sum())), None)
    np.testing.assert_allclose(metrics["loss"], float(loss), rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], float(direct["accuracy"]), rtol=1e-5, atol=1e-7)
    assert np.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0
    moved = jax.tree.map(lambda a, b: float(np.abs(a - np.asarray(b)).max()), new_params, params)
    assert moved["params"]["scalar_head"]["kernel"] > 1e-4 and moved["params"]["wte"] > 1e-6


@pytest.mark.parametrize("make_strategy, accum_steps", cases(
    "mesh-fsdp2", mesh=(Mesh, 1), pmap=(Pmap, 1),
    **{"mesh-fsdp2": (lambda: Mesh(fsdp=2), 1), "single-accum2": (Single, 2)}))
def test_bradley_terry_step_matches_single_device(make_strategy, accum_steps, single_bt_step):
    assert jax.device_count() == NUM_DEVICES
    strategy = make_strategy()
    if isinstance(strategy, Mesh) and strategy.fsdp > 1:
        specs = jax.tree.leaves(jax.tree.map(lambda x: fsdp_spec(x.shape, strategy.fsdp), init(STEP_MODEL)))
        assert any("fsdp" in spec for spec in specs)  # some parameters really are split
    metrics, new_params = one_bt_step(strategy, accum_steps)
    expected_metrics, expected_params = single_bt_step
    assert set(metrics) == set(expected_metrics)
    for name in metrics:  # the reward stds too: a Spread's moments average exactly over devices
        np.testing.assert_allclose(metrics[name], expected_metrics[name], rtol=2e-5, atol=1e-7, err_msg=name)
    assert_trees_close(new_params, expected_params, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Normalisation and near misses


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fit_normalization_standardises_the_scores(dtype):
    raw = (3.0 * np.random.default_rng(0).standard_normal(200) + 5.0).astype(dtype)
    norm = reward.fit_normalization(raw)
    normalized = norm["gain"] * raw.astype(np.float64) + norm["bias"]
    np.testing.assert_allclose(normalized.mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(normalized.std(), 1.0, rtol=1e-5)
    assert norm["gain"] > 0


@pytest.mark.parametrize("constant", [[0.5] * 4, [0.1] * 3, np.full(256, 0.7, np.float32)],
                         ids=["exact", "inexact-mean", "float32-rewards"])
def test_fit_normalization_refuses_constant_scores(constant):
    with pytest.raises(UserError, match="same score"):
        reward.fit_normalization(np.asarray(constant))


ANSWERS = sorted({p.answer for p in world.problems(0, 60) if len(p.answer) >= 2}) + ["11", "AAB", "zz"]
ALPHABETS = [set(string.digits), set(string.ascii_uppercase), set(string.ascii_lowercase)]


def test_near_miss_keeps_the_alphabet():
    assert {a.isdigit() for a in ANSWERS} == {True, False} and any(a.isupper() for a in ANSWERS)
    for answer in ANSWERS:
        alphabet = next(a for a in ALPHABETS if set(answer) <= a)
        for seed in range(300):
            perturbed = world.near_miss(answer, np.random.default_rng(seed))
            assert perturbed and set(perturbed) <= alphabet, (answer, perturbed)
            assert abs(len(perturbed) - len(answer)) <= 1


def test_near_miss_never_returns_the_answer():
    same = {answer: [seed for seed in range(300)
                     if world.near_miss(answer, np.random.default_rng(seed)) == answer]
            for answer in ANSWERS}
    assert not {answer: seeds[:3] for answer, seeds in same.items() if seeds}


# ---------------------------------------------------------------------------------------------
# The reward stage end to end: pretrain -> sft -> reward, then `score`

SMALL = dict(n_layer=2, n_head=2, d_model=32, context_len=64)
RM_STEPS = 4


def sft_config(base_run) -> config.RunConfig:
    return config.replace(
        config.preset("tiny", "sft"), model=SMALL, optim=dict(warmup_steps=2), data=dict(world_chats=64),
        train=dict(batch_size=8, max_steps=4, log_every=1, eval_every=4, eval_batches=1, ckpt_every=4,
                   progress=False, init_from=str(base_run)),
    )


def reward_config(**data) -> config.RunConfig:
    """The `tiny` reward preset shrunk to seconds (no init_from: the CLI gets --init-from)."""
    return config.replace(
        config.preset("tiny", "reward"), model=SMALL, optim=dict(warmup_steps=2), data=dict(world_pairs=64, **data),
        train=dict(batch_size=8, max_steps=RM_STEPS, log_every=1, eval_every=2, eval_batches=1,
                   ckpt_every=RM_STEPS, progress=False),
    )


def reward_argv(run_dir, *flags, cfg=None) -> list[str]:
    return ["reward", *cli_flags(cfg or reward_config(), stage="reward"), "--run-dir", str(run_dir), *map(str, flags)]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A tiny pretraining run fine-tuned for 4 SFT steps; read-only."""
    base = tmp_path_factory.mktemp("base") / "run"
    stages.pretrain(BASE_RUN, base)
    run_dir = tmp_path_factory.mktemp("sft") / "run"
    stages.sft(sft_config(base), run_dir)
    return run_dir


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, sft_run):
    """`genai-jax reward --init-from SFT` on world preference pairs; read-only."""
    run_dir = tmp_path_factory.mktemp("reward") / "run"
    cli.main(reward_argv(run_dir, "--init-from", sft_run))
    return run_dir


@pytest.mark.slow
def test_reward_run_directory(reward_run, sft_run):
    saved = json.loads((reward_run / "config.json").read_text())
    assert saved["model"]["head"] == "scalar" and saved["train"]["init_from"] == str(sft_run)
    assert (reward_run / "tokenizer.json").read_bytes() == (sft_run / "tokenizer.json").read_bytes()

    records = rundir.read_metrics(reward_run)
    assert records[0]["step"] == 0 and records[0]["pairs"] == records[0]["groups"] > 8
    assert [r["step"] for r in records if "val_accuracy" in r] == [0, 2, RM_STEPS]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, RM_STEPS + 1))
    assert all(np.isfinite(r["loss"]) and 0 <= r["accuracy"] <= 1 for r in train)

    final = records[-1]
    normalization = json.loads((reward_run / "reward_normalization.json").read_text())
    assert final["step"] == RM_STEPS
    assert {name: final[name] for name in ("gain", "bias")} == normalization and normalization["gain"] > 0
    assert np.isfinite(final["normalized_mean"]) and final["normalized_std"] > 0
    for name in ("val_gold_accuracy", "val_label_accuracy"):
        assert 0 <= final[name] <= 1, name

    # The trunk starts from the SFT weights (4 small steps away), the head is new.
    _, _, sft_params = runs.load_trained(sft_run)
    cfg, _, rm_params = runs.load_trained(reward_run)
    assert cfg.model.head == "scalar" and "scalar_head" in rm_params["params"]
    trunk = {name: value for name, value in rm_params["params"].items() if name != "scalar_head"}
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                                         trunk, sft_params["params"]))
    assert 0 < max(diffs) < 5e-3


@pytest.mark.slow
def test_reward_refuses_an_sft_run_with_another_model(tmp_path, capsys, sft_run):
    before = snapshot(sft_run)
    code, _, err = run_cli(capsys, *reward_argv(tmp_path / "run", "--init-from", sft_run, "--model.n-layer", 3))
    assert_one_error(code, err, "model.n_layer", str(sft_run))
    assert "model.head" not in err
    assert not (tmp_path / "run").exists()
    assert snapshot(sft_run) == before


@pytest.mark.slow
def test_reward_needs_init_from_and_a_scalar_head(tmp_path, capsys, sft_run):
    code, _, err = run_cli(capsys, *reward_argv(tmp_path / "run"))
    assert_one_error(code, err, "--init-from")
    code, _, err = run_cli(capsys, *reward_argv(tmp_path / "run", "--init-from", sft_run, "--model.head", "lm"))
    assert_one_error(code, err, "model.head=scalar")
    assert not (tmp_path / "run").exists()


def hand_rewards(cfg, params, tokenizer, chats) -> np.ndarray:
    """The raw reward of each whole conversation: the scalar head at its last token, the rows
    right padded under plain causal attention (no positions, segment ids or mask)."""
    encoded = [encode_chat(tokenizer, chat)[0] for chat in chats]
    tokens = np.full((len(chats), cfg.model.context_len), tokenizer.pad_id, np.int32)
    for row, chat_tokens in enumerate(encoded):
        tokens[row, : len(chat_tokens)] = chat_tokens
    values = np.asarray(jax.jit(lambda p, t: GPT(cfg.model).apply(p, t, head="scalar"))(params, tokens))
    return np.array([values[row, len(chat_tokens) - 1] for row, chat_tokens in enumerate(encoded)], np.float64)


@pytest.mark.slow
def test_score_command(tmp_path, capsys, reward_run):
    problems = world.problems(9, 4, held_out=True)
    lines = [{"prompt": p.instruction, "response": response}
             for p in problems for response in (p.answer, p.answer[::-1] + "3")]
    multi = [{"role": "user", "content": "how many letters are in abc?"}, {"role": "assistant", "content": "3"},
             {"role": "user", "content": problems[0].instruction}, {"role": "assistant", "content": "no"}]
    lines.append({"messages": multi})
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    code, _, err = run_cli(capsys, "score", "--run", reward_run, "--in", path, "--out", tmp_path / "out.jsonl")
    assert code == 0, err
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(out) == len(lines)
    assert [{k: v for k, v in record.items() if k != "score"} for record in out] == lines
    assert all(type(record["score"]) is float for record in out)

    cfg, tokenizer, params = runs.load_trained(reward_run)
    normalization = json.loads((reward_run / "reward_normalization.json").read_text())
    chats = [[{"role": "user", "content": line["prompt"]}, {"role": "assistant", "content": line["response"]}]
             for line in lines[:-1]] + [multi]
    raw = hand_rewards(cfg, params, tokenizer, chats)
    assert np.ptp(raw) > 1e-4  # different responses, different rewards: the check has teeth
    expected = normalization["gain"] * raw + normalization["bias"]
    np.testing.assert_allclose([record["score"] for record in out], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_score_writes_the_input_lines_with_a_score_added(tmp_path, capsys, reward_run):
    """What `score --out` promises: each input line as it was (its form and any other fields, such
    as an id to join on), plus "score"."""
    lines = [{"id": 7, "prompt": "how many letters are in abc?", "response": "3"},
             {"messages": [{"role": "user", "content": "reverse the word abc"},
                           {"role": "assistant", "content": "cba"}]}]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    code, _, err = run_cli(capsys, "score", "--run", reward_run, "--in", path, "--out", tmp_path / "out.jsonl")
    assert code == 0, err
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in record.items() if k != "score"} for record in out] == lines


@pytest.mark.slow
def test_score_refuses_a_run_that_is_not_a_reward_model(tmp_path, capsys, sft_run):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "how many letters are in abc?", "response": "3"}) + "\n")
    code, _, err = run_cli(capsys, "score", "--run", sft_run, "--in", path, "--out", tmp_path / "out.jsonl")
    assert_one_error(code, err, str(sft_run), "not a reward model")
    assert not (tmp_path / "out.jsonl").exists()


def hh(*turns: tuple[str, str]) -> str:
    return "".join(f"\n\n{speaker}: {text}" for speaker, text in turns)


@pytest.mark.slow
def test_reward_on_an_hh_rlhf_file(tmp_path, capsys, sft_run):
    tokenizer = runs.load_trained(sft_run)[1]
    known = set(tokenizer.chars)
    problems = [p for p in world.problems(21, 64) if set(p.instruction + p.answer) <= known][:32]
    assert len(problems) == 32
    records = []
    for i, p in enumerate(problems):
        earlier = (("Human", "hi"), ("Assistant", "3")) if i % 4 == 0 else ()
        records.append({"chosen": hh(*earlier, ("Human", p.instruction), ("Assistant", p.answer)),
                        "rejected": hh(*earlier, ("Human", p.instruction), ("Assistant", p.answer + p.answer[-1]))})
    path = tmp_path / "hh.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))

    run_dir = tmp_path / "run"
    code, _, err = run_cli(capsys, *reward_argv(run_dir, "--init-from", sft_run, "--data.path", path))
    assert code == 0, err
    assert rundir.read_config(run_dir).data.path == str(path)
    normalization = json.loads((run_dir / "reward_normalization.json").read_text())
    assert normalization["gain"] > 0 and np.isfinite(normalization["bias"])
    records = rundir.read_metrics(run_dir)
    n_train = 32 - int(32 * 0.1)  # the last val_fraction of the file validates
    assert records[0]["groups"] == records[0]["pairs"] == n_train
    assert [r["step"] for r in records if "loss" in r] == list(range(1, RM_STEPS + 1))
    final = records[-1]
    assert final["step"] == RM_STEPS and final["gain"] == normalization["gain"]
    assert "val_gold_accuracy" not in final  # no gold checker for a file's pairs


@pytest.mark.slow
def test_reward_on_hh_lines_with_the_released_files_defects(tmp_path, capsys, sft_run):
    """HH-RLHF's harmless-base test file as released, in small: lines whose "Human:" marker lacks
    its blank line (two Assistant turns end the transcript), and prompts far longer than the
    context. The first such line stops the stage naming the flag that skips it; with that flag
    alone the reward model trains on the prompts' ends, is normalised on the policy's samples for
    the same ends, and PPO uses it."""
    tokenizer = runs.load_trained(sft_run)[1]
    problems = [p for p in world.problems(22, 128) if set(p.instruction + p.answer) <= set(tokenizer.chars)][:40]
    assert len(problems) == 40
    history = [turn for p in problems[32:] for turn in (("Human", p.instruction), ("Assistant", p.answer))]
    lines = []
    for p in problems[:32]:
        turns = (*history, ("Human", p.instruction))
        lines.append(json.dumps({"chosen": hh(*turns, ("Assistant", p.answer)),
                                 "rejected": hh(*turns, ("Assistant", p.answer + p.answer[-1]))}))
    typo = hh(("Human", "Who performs in drag?"), ("Assistant", "Drag queens and drag kings.  Human: Then how?"))
    for line in (4, 20):  # 1-based lines 5 and 21
        lines.insert(line, json.dumps({"chosen": typo + hh(("Assistant", "On stage.")),
                                       "rejected": typo + hh(("Assistant", "I do not know."))}))
    path = tmp_path / "hh.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    prompt = parse_hh_transcript(json.loads(lines[0])["chosen"])[:-1]
    assert len(encode_chat(tokenizer, prompt, generation_prompt=True)[0]) > 4 * SMALL["context_len"]

    run_dir = tmp_path / "run"
    code, _, err = run_cli(capsys, *reward_argv(run_dir, "--init-from", sft_run, "--data.path", path))
    assert_one_error(code, err, f"{path}:5: ", "the turn before the final Assistant turn", "--data.skip-malformed")
    assert not run_dir.exists()

    code, out, err = run_cli(capsys, *reward_argv(run_dir, "--init-from", sft_run, "--data.path", path,
                                                  "--data.skip-malformed"))
    assert code == 0, err
    assert f"{path}: skipped 2 malformed line(s)" in out
    records = rundir.read_metrics(run_dir)
    assert records[0]["groups"] == records[0]["truncated"] == 32 - int(32 * 0.1)  # every prompt keeps its end
    assert records[-1]["step"] == RM_STEPS and records[-1]["normalized_std"] > 0
    assert completion.finished(run_dir)

    ppo_cfg = config.replace(config.preset("tiny", "ppo"), model=SMALL, data=dict(world_chats=64),
                             ppo=dict(epochs=1, minibatches=1, gold_prompts=8, max_new_tokens=8,
                                      policy=str(sft_run), reward=str(run_dir)),
                             train=dict(batch_size=8, max_steps=1, eval_every=1, ckpt_every=1, progress=False))
    rlhf.ppo(ppo_cfg, tmp_path / "ppo")
    assert completion.finished(tmp_path / "ppo")
    [scored] = [r for r in rundir.read_metrics(tmp_path / "ppo") if "proxy_reward" in r]
    assert np.isfinite(scored["proxy_reward"])


@pytest.mark.slow
def test_a_reward_run_stopped_before_its_normalisation_is_finished_by_its_rerun(tmp_path, capsys, sft_run,
                                                                                   monkeypatch):
    """A stop between the final checkpoint and the normalisation (a crash there, a preemption)
    leaves an unfinished run, and running the stage again fits the normalisation without training."""
    run_dir = tmp_path / "run"

    def stop(scores):
        raise UserError("stopped after training")

    monkeypatch.setattr(reward, "fit_normalization", stop)
    code, _, err = run_cli(capsys, *reward_argv(run_dir, "--init-from", sft_run))
    assert_one_error(code, err, "stopped after training")
    assert not completion.finished(run_dir) and not (run_dir / "reward_normalization.json").exists()
    checkpoints = snapshot(run_dir / "checkpoints")
    monkeypatch.undo()

    code, _, err = run_cli(capsys, *reward_argv(run_dir, "--init-from", sft_run))
    assert code == 0, err
    assert completion.finished(run_dir)
    assert snapshot(run_dir / "checkpoints") == checkpoints
    records = rundir.read_metrics(run_dir)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, RM_STEPS + 1))
    assert [r["step"] for r in records if "gain" in r] == [RM_STEPS]
