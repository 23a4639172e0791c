"""DPO: each loss against a hand computation, the response mask of preference rows, the
reference precomputed or in the step, strategies against one device, and the stage end to end."""

import json
import string

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import NUM_DEVICES, assert_one_error, assert_trees_close, cases, cli_flags, init, run_cli, tiny_model
from genai_jax import cli, config, rundir, runs, stages
from genai_jax.data import world
from genai_jax.data.chat import build_preference_rows
from genai_jax.data.preferences import PreferenceGroup
from genai_jax.dpo import REFERENCE_FILE, reference_logprobs
from genai_jax.metrics import summary
from genai_jax.model import GPT
from genai_jax.objectives.dpo import make_dpo_objective, pair_losses
from genai_jax.parallel import Mesh, Pmap, Single
from genai_jax.tokenizer import CharTokenizer
from genai_jax.train import TrainState, make_train_step

CHAR = CharTokenizer.build(string.ascii_letters + string.digits + " .?+=:'")

# ---------------------------------------------------------------------------------------------
# The losses by hand, on a table model: the logits after token a are TABLE[a]


def table_apply(params, tokens, deterministic=True, rngs=None):
    return params["table"][tokens]


def hand_logprob(table: np.ndarray, tokens: list[int], response_from: int) -> tuple[float, int]:
    """Summed log-probability of tokens[response_from:] under the table model, and their count."""
    log_probs = table - np.log(np.exp(table).sum(-1, keepdims=True))
    picked = [log_probs[tokens[t - 1], tokens[t]] for t in range(response_from, len(tokens))]
    return float(np.sum(picked)), len(picked)


def pair_batch(chosen: list[int], rejected: list[int], prompt_len: int, length: int = 8) -> dict:
    """One prompt with a better (first) and a worse answer, right-padded."""
    tokens = np.zeros((1, 2, length), np.int32)
    response = np.zeros((1, 2, length), np.int32)
    for i, row in enumerate((chosen, rejected)):
        tokens[0, i, : len(row)] = row
        response[0, i, prompt_len : len(row)] = 1
    return {"tokens": tokens, "response": response, "rank": np.array([[0, 1]], np.int32),
            "valid": np.ones((1, 2), bool), "weights": np.ones(1, np.float32), "loss_denominator": np.float32(1.0)}


TABLE = np.random.default_rng(0).normal(size=(6, 6)).astype(np.float32)
REF_TABLE = np.random.default_rng(1).normal(size=(6, 6)).astype(np.float32)
CHOSEN, REJECTED, PROMPT = [1, 2, 3, 4], [1, 2, 5, 5, 4], 2


def log_sigmoid(x: float) -> float:
    return -np.log1p(np.exp(-x))


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge", "simpo"])
def test_dpo_losses_match_hand_computation(loss):
    beta, smoothing, gamma = 0.5, 0.1, 0.3
    (pw, nw), (pl, nl) = (hand_logprob(TABLE, row, PROMPT) for row in (CHOSEN, REJECTED))
    (rw, _), (rl, _) = (hand_logprob(REF_TABLE, row, PROMPT) for row in (CHOSEN, REJECTED))
    h = beta * ((pw - rw) - (pl - rl))
    expected = {
        "sigmoid": -(1 - smoothing) * log_sigmoid(h) - smoothing * log_sigmoid(-h),
        "ipo": ((pw - rw) / nw - (pl - rl) / nl - 1 / (2 * beta)) ** 2,
        "hinge": max(0.0, 1 - h),
        "simpo": -(1 - smoothing) * log_sigmoid(beta * (pw / nw - pl / nl) - gamma)
        - smoothing * log_sigmoid(-(beta * (pw / nw - pl / nl) - gamma)),
    }[loss]
    batch = pair_batch(CHOSEN, REJECTED, PROMPT)
    batch["ref_logprobs"] = np.array([[rw, rl]], np.float32)
    objective = make_dpo_objective(table_apply, loss=loss, beta=beta, label_smoothing=smoothing, simpo_gamma=gamma)
    value, metrics = objective({"table": TABLE}, batch, None)
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["chosen_logprob"]), pw, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["rejected_logprob"]), pl, rtol=1e-5)
    chosen_reward = beta * pw / nw if loss == "simpo" else beta * (pw - rw)
    np.testing.assert_allclose(float(metrics["chosen_reward"]), chosen_reward, rtol=1e-5)
    assert float(metrics["accuracy"]) == float(metrics["chosen_reward"] > metrics["rejected_reward"])


def test_sigmoid_loss_is_log_2_when_the_policy_is_the_reference():
    model = tiny_model(vocab_size=CHAR.vocab_size, context_len=40)
    params = init(model)
    rows = step_rows(model.context_len)
    reference = reference_logprobs(config.RunConfig(model=model), params, rows)
    objective = make_dpo_objective(GPT(model).apply, deterministic=True)
    batch = dict(rows, ref_logprobs=reference, loss_denominator=np.float32(rows["weights"].sum()))
    loss, metrics = objective(params, batch, None)
    np.testing.assert_allclose(float(loss), np.log(2.0), rtol=1e-6)
    assert abs(float(metrics["margin"])) < 1e-6


def test_label_smoothing_at_one_half_is_flat():
    """With e = 1/2 the sigmoid loss is the same whichever answer is better: the labels carry nothing."""
    args = dict(chosen_count=1.0, rejected_count=1.0, beta=1.0, label_smoothing=0.5)
    a, b = pair_losses("sigmoid", 2.0, -1.0, **args), pair_losses("sigmoid", -1.0, 2.0, **args)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)


def test_unknown_loss_is_refused():
    with pytest.raises(ValueError, match="unknown DPO loss 'kto'"):
        make_dpo_objective(table_apply, loss="kto")


# ---------------------------------------------------------------------------------------------
# Preference rows: the response mask


def test_response_mask_covers_the_answer_and_its_end_of_turn():
    prompt = ({"role": "user", "content": "count a"},)
    rows, _ = build_preference_rows([PreferenceGroup(prompt, ("1", ""), (0, 1))], CHAR, 16)
    for k, answer in enumerate(("1", "")):
        length = int(rows["mask"][0, k].sum())
        marked = np.flatnonzero(rows["response"][0, k])
        # the answer's characters and <|end|>, the last tokens of the row
        assert list(marked) == list(range(length - len(answer) - 1, length))
        assert rows["tokens"][0, k, length - 1] == CHAR.special_id("<|end|>")
    truncated, stats = build_preference_rows([PreferenceGroup(prompt, ("abcdefghijklmnop", "a"), (0, 1))], CHAR, 8)
    assert stats["truncated"] == 1
    assert truncated["response"][0, 0].sum() == 8  # the whole kept row is answer


# ---------------------------------------------------------------------------------------------
# One step: the reference precomputed or in the step; strategies against one device

STEP_MODEL = tiny_model(vocab_size=CHAR.vocab_size, context_len=40)


def step_rows(length: int = STEP_MODEL.context_len) -> dict:
    """8 groups (every third a K = 3 ranking) of world problems; the last has weight 0."""
    groups = []
    for i, problem in enumerate(world.problems(5, NUM_DEVICES)):
        answer = problem.answer
        responses = (answer, answer + answer[-1], "") if i % 3 == 0 else (answer + answer[0], answer)
        ranking = (0, 2, 1) if len(responses) == 3 else (1, 0)
        groups.append(PreferenceGroup(tuple(world.chat(problem)[:1]), responses, ranking))
    rows, _ = build_preference_rows(groups, CHAR, length)
    rows["weights"][-1] = 0.0
    return rows


def one_dpo_step(strategy, accum_steps: int = 1, precompute: bool = True) -> tuple[dict, dict]:
    """(metrics, params) on the host after one DPO step with plain SGD, from a reference that
    differs from the policy (so the log-ratios are not zero)."""
    optimizer = optax.sgd(0.5)
    reference = init(STEP_MODEL, seed=3)
    rows = step_rows()
    if precompute:
        rows["ref_logprobs"] = reference_logprobs(config.RunConfig(model=STEP_MODEL), reference, rows)

    def init_fn():
        return TrainState.create(init(STEP_MODEL), optimizer, jax.random.PRNGKey(1))

    abstract_state = jax.eval_shape(init_fn)
    state = strategy.compile_init(init_fn, abstract_state)()
    objective = make_dpo_objective(GPT(STEP_MODEL).apply, deterministic=True, beta=0.5,
                                   reference_params=None if precompute else jax.device_get(reference))
    step = strategy.compile(make_train_step(objective, optimizer, strategy.reduce, accum_steps), abstract_state)
    state, metrics = step(state, strategy.place_batch(rows), jax.random.PRNGKey(2))
    metrics = summary([strategy.metrics_to_host(metrics)])
    return metrics, jax.tree.map(np.asarray, jax.device_get(strategy.state_to_host(state).params))


@pytest.fixture(scope="module")
def single_dpo_step():
    return one_dpo_step(Single())


def assert_same_step(result, expected):
    (metrics, params), (expected_metrics, expected_params) = result, expected
    assert set(metrics) == set(expected_metrics)
    for name in metrics:
        np.testing.assert_allclose(metrics[name], expected_metrics[name], rtol=2e-5, atol=1e-6, err_msg=name)
    assert_trees_close(params, expected_params, rtol=1e-4, atol=1e-6)


def test_dpo_step_moves_the_policy(single_dpo_step):
    metrics, params = single_dpo_step
    assert np.isfinite(metrics["loss"]) and metrics["loss"] != pytest.approx(np.log(2.0), abs=1e-3)
    assert metrics["grad_norm"] > 0
    moved = jax.tree.map(lambda a, b: float(np.abs(a - np.asarray(b)).max()), params, init(STEP_MODEL))
    assert max(jax.tree.leaves(moved)) > 1e-4


def test_reference_in_the_step_gives_the_precomputed_step(single_dpo_step):
    assert_same_step(one_dpo_step(Single(), precompute=False), single_dpo_step)


@pytest.mark.parametrize("make_strategy, accum_steps", cases(
    "mesh-fsdp2", mesh=(Mesh, 1), pmap=(Pmap, 1),
    **{"mesh-fsdp2": (lambda: Mesh(fsdp=2), 1), "single-accum2": (Single, 2)}))
def test_dpo_step_matches_single_device(make_strategy, accum_steps, single_dpo_step):
    assert jax.device_count() == NUM_DEVICES
    assert_same_step(one_dpo_step(make_strategy(), accum_steps), single_dpo_step)


@pytest.mark.slow
def test_reference_in_the_step_under_a_mesh(single_dpo_step):
    assert_same_step(one_dpo_step(Mesh(), precompute=False), single_dpo_step)


# ---------------------------------------------------------------------------------------------
# The stage end to end: `genai-jax dpo --init-from SFT`

SMALL = dict(n_layer=2, n_head=2, d_model=32, context_len=64)
DPO_STEPS = 4


def dpo_config(**dpo) -> config.RunConfig:
    """The `tiny` DPO preset shrunk to seconds (no init_from: the CLI gets --init-from)."""
    return config.replace(
        config.preset("tiny", "dpo"), model=SMALL, optim=dict(warmup_steps=2, decay_steps=100),
        data=dict(world_pairs=64), dpo=dict(gold_prompts=16, **dpo),
        train=dict(batch_size=8, max_steps=DPO_STEPS, log_every=1, eval_every=2, eval_batches=1,
                   ckpt_every=2, progress=False),
    )


def dpo_argv(run_dir, *flags, cfg=None) -> list[str]:
    return ["dpo", *cli_flags(cfg or dpo_config(), stage="dpo"), "--run-dir", str(run_dir), *map(str, flags)]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A tiny pretraining run fine-tuned for 4 SFT steps; read-only."""
    base = tmp_path_factory.mktemp("base") / "run"
    stages.pretrain(config.replace(dpo_config(), model=SMALL, data=dict(world_docs=200),
                                   train=dict(sample_tokens=0, eval_every=1000, ckpt_every=DPO_STEPS)), base)
    sft_dir = tmp_path_factory.mktemp("sft") / "run"
    stages.sft(config.replace(config.preset("tiny", "sft"), model=SMALL, optim=dict(warmup_steps=2),
                              data=dict(world_chats=64),
                              train=dict(batch_size=8, max_steps=4, eval_every=4, eval_batches=1, ckpt_every=4,
                                         progress=False, init_from=str(base))), sft_dir)
    return sft_dir


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, sft_run):
    run_dir = tmp_path_factory.mktemp("dpo") / "run"
    cli.main(dpo_argv(run_dir, "--init-from", sft_run))
    return run_dir


def train_losses(run_dir) -> list[float]:
    return [r["loss"] for r in rundir.read_metrics(run_dir) if "loss" in r]


@pytest.mark.slow
def test_dpo_run_directory(dpo_run, sft_run):
    saved = json.loads((dpo_run / "config.json").read_text())
    assert saved["model"]["head"] == "lm" and saved["train"]["init_from"] == str(sft_run)
    assert saved["dpo"]["loss"] == "sigmoid"
    assert (dpo_run / REFERENCE_FILE).exists()
    records = rundir.read_metrics(dpo_run)
    # step 0: the policy is the reference, so the held-out loss is log 2 and the margin 0
    first_eval = next(r for r in records if "val_loss" in r)
    assert first_eval["step"] == 0 and first_eval["val_loss"] == pytest.approx(np.log(2.0), rel=1e-5)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, DPO_STEPS + 1))
    final = records[-1]
    assert final["step"] == DPO_STEPS
    for name in ("val_pair_accuracy", "val_gold_accuracy", "val_gold_score", "val_greedy_gold_score"):
        assert 0 <= final[name] <= 1, name
    # a policy run, loaded as every policy is (eval, generate, chat), a few steps from the SFT run
    cfg, _, params = runs.load_trained(dpo_run)
    sft_params = runs.load_trained(sft_run)[2]
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                                         params, sft_params))
    assert cfg.model.head == "lm" and 0 < max(moved) < 0.05


@pytest.mark.slow
def test_reference_on_the_fly_trains_the_same(tmp_path, capsys, dpo_run, sft_run):
    run_dir = tmp_path / "run"
    assert run_cli(capsys, *dpo_argv(run_dir, "--init-from", sft_run, "--dpo.no-precompute-reference"))[0] == 0
    assert not (run_dir / REFERENCE_FILE).exists()
    np.testing.assert_allclose(train_losses(run_dir), train_losses(dpo_run), rtol=1e-5)


@pytest.mark.slow
def test_dpo_resumes_with_more_steps(tmp_path, capsys, dpo_run, sft_run):
    run_dir = tmp_path / "run"
    assert run_cli(capsys, *dpo_argv(run_dir, "--init-from", sft_run, "--train.max-steps", 2))[0] == 0
    cached = (run_dir / REFERENCE_FILE).read_bytes()
    assert run_cli(capsys, *dpo_argv(run_dir, "--init-from", sft_run))[0] == 0
    assert (run_dir / REFERENCE_FILE).read_bytes() == cached  # read back, not recomputed
    np.testing.assert_allclose(train_losses(run_dir), train_losses(dpo_run), rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["ipo", "hinge", "simpo"])
def test_other_losses_train(tmp_path, capsys, sft_run, loss):
    run_dir = tmp_path / "run"
    code, _, err = run_cli(capsys, *dpo_argv(run_dir, "--init-from", sft_run, "--dpo.loss", loss, "--train.max-steps", 2))
    assert code == 0, err
    assert (run_dir / REFERENCE_FILE).exists() == (loss != "simpo")  # simpo needs no reference
    assert all(np.isfinite(train_losses(run_dir)))


def hh(*turns: tuple[str, str]) -> str:
    return "".join(f"\n\n{speaker}: {text}" for speaker, text in turns)


@pytest.mark.slow
def test_dpo_on_an_hh_file_with_empty_answers(tmp_path, capsys, sft_run):
    """As in HH-RLHF's harmless-base test file: some final Assistant turns are empty."""
    problems = [p for p in world.problems(21, 64) if set(p.instruction + p.answer) <= set(CHAR.chars)][:20]
    lines = [json.dumps({"chosen": hh(("Human", p.instruction), ("Assistant", p.answer)),
                         "rejected": hh(("Human", p.instruction), ("Assistant", "" if i % 5 == 0 else p.answer + "0"))})
             for i, p in enumerate(problems)]
    path = tmp_path / "hh.jsonl"
    path.write_text("\n".join(lines) + "\n")
    code, _, err = run_cli(capsys, *dpo_argv(tmp_path / "run", "--init-from", sft_run, "--data.path", path,
                                             "--train.max-steps", 2))
    assert code == 0, err
    final = rundir.read_metrics(tmp_path / "run")[-1]
    assert "val_pair_accuracy" in final and "val_gold_accuracy" not in final  # no gold for a file


@pytest.mark.slow  # its module's trained-run fixture is the cost
def test_dpo_needs_init_from_and_an_lm_head(tmp_path, capsys, sft_run):
    code, _, err = run_cli(capsys, *dpo_argv(tmp_path / "run"))
    assert_one_error(code, err, "dpo needs --init-from RUN_DIR")
    code, _, err = run_cli(capsys, *dpo_argv(tmp_path / "run", "--init-from", sft_run, "--model.head", "scalar"))
    assert_one_error(code, err, "model.head must be lm")
    assert not (tmp_path / "run").exists()


def test_implicit_rewards_are_zero_for_the_reference():
    params = init(STEP_MODEL)
    rows = step_rows()
    reference = reference_logprobs(config.RunConfig(model=STEP_MODEL), params, rows)
    objective = make_dpo_objective(GPT(STEP_MODEL).apply, deterministic=True, reference_params=params)
    _, metrics = objective(params, dict(rows, loss_denominator=jnp.float32(rows["weights"].sum())), None)
    assert abs(float(metrics["chosen_reward"])) < 1e-6
    assert np.all(reference[rows["valid"]] < 0) and np.all(reference[~rows["valid"]] == 0)


@pytest.mark.slow  # its module's trained-run fixture is the cost
def test_a_character_the_tokenizer_lacks_names_the_preferences_file_and_line(tmp_path, capsys, sft_run):
    pair = {"prompt": "reverse abc", "chosen": "cba", "rejected": "abc"}
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join([json.dumps(pair), "", json.dumps(pair | {"chosen": "cba \u20ac"})]) + "\n")
    code, _, err = run_cli(capsys, *dpo_argv(tmp_path / "run", "--init-from", sft_run, "--data.path", path))
    assert_one_error(code, err, f"{path}:3:", "'\u20ac'")
    assert not (tmp_path / "run").exists()
