"""Supervised fine-tuning: the chat template, the response-masked loss (by hand, under gradient
accumulation, packing and every strategy), the held-out split, the sft stage end to end, and the
commands that use its policy (eval, generate, chat)."""

import builtins
import dataclasses
import copy
import json
import re
import shutil

import jax
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
    run_cli,
    snapshot,
    tiny_model,
)

from genai_jax import cli, config, evaluation, rundir, runs, stages
from genai_jax.checkpoint import Checkpointer
from genai_jax.config import DataConfig
from genai_jax.data import world
from genai_jax.data.chat import build_rows, encode_rows, fitted_seq_len, load_conversations
from genai_jax.metrics import summary
from genai_jax.model import GPT
from genai_jax.objectives.masked_lm import make_masked_lm_objective
from genai_jax.parallel import Mesh, Pmap, Single
from genai_jax.tokenizer import (
    ASSISTANT,
    END,
    SPECIAL_TOKENS,
    SYSTEM,
    USER,
    CharTokenizer,
    build_tokenizer,
    decode_response,
    encode_chat,
)
from genai_jax.train import TrainState, make_train_step

MULTI_TURN = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "what is 2 plus 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "and reverse the word cat"},
    {"role": "assistant", "content": "tac"},
]
# MULTI_TURN in the template as (text, learned) segments: the loss mask is 1 exactly on the
# assistant's content and its end-of-turn token.
MULTI_TURN_SEGMENTS = [
    (SYSTEM, 0), ("You are terse.", 0), (END, 0),
    (USER, 0), ("what is 2 plus 3?", 0), (END, 0),
    (ASSISTANT, 0), ("5", 1), (END, 1),
    (USER, 0), ("and reverse the word cat", 0), (END, 0),
    (ASSISTANT, 0), ("tac", 1), (END, 1),
]
MULTI_TURN_TEXT = ("<|system|>You are terse.<|end|><|user|>what is 2 plus 3?<|end|>"
                   "<|assistant|>5<|end|><|user|>and reverse the word cat<|end|><|assistant|>tac<|end|>")
SHORT_MULTI_TURN = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": "and 2+3?"}, {"role": "assistant", "content": "5"}]


def qa(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


# 16 conversations with 2 to 8 response tokens each (none longer than SEQ_LEN).
CHATS = [world.chat(p) for p in world.problems(7, 15)] + [SHORT_MULTI_TURN]
# Conversations short enough for several to share a packed row.
SHORT_CHATS = [qa("2+3?", "5"), qa("cat", "tac"), qa("sort dcba", "abcd"), qa("hi", "hello"), SHORT_MULTI_TURN]
CHAT_TEXT = world.corpus(0, 50) + "".join(m["content"] for chat in CHATS + [MULTI_TURN] for m in chat)
CHAR = CharTokenizer.build(CHAT_TEXT)
SEQ_LEN = 40
MODEL = tiny_model(vocab_size=CHAR.vocab_size, context_len=SEQ_LEN)


# ---------------------------------------------------------------------------------------------
# The chat template


def expected_encoding(tokenizer, segments) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, mask) spelled out segment by segment: a special token is its id, text is encoded."""
    tokens, mask = [], []
    for text, learned in segments:
        ids = [tokenizer.special_id(text)] if text in SPECIAL_TOKENS else tokenizer.encode(text).tolist()
        tokens += ids
        mask += [float(learned)] * len(ids)
    return np.array(tokens, np.int32), np.array(mask, np.float32)


def test_template_of_a_multi_turn_conversation():
    tokens, mask = encode_chat(CHAR, MULTI_TURN)
    assert CHAR.decode(tokens) == MULTI_TURN_TEXT
    expected_tokens, expected_mask = expected_encoding(CHAR, MULTI_TURN_SEGMENTS)
    np.testing.assert_array_equal(tokens, expected_tokens)
    np.testing.assert_array_equal(mask, expected_mask)
    assert mask.sum() == (1 + 1) + (3 + 1)  # each answer's characters and its <|end|>

    prompt, prompt_mask = encode_chat(CHAR, MULTI_TURN, generation_prompt=True)
    np.testing.assert_array_equal(prompt, np.append(tokens, CHAR.special_id(ASSISTANT)))
    np.testing.assert_array_equal(prompt_mask, np.append(mask, 0.0))
    assert CHAR.decode(encode_chat(CHAR, MULTI_TURN[:2], generation_prompt=True)[0]) == (
        "<|system|>You are terse.<|end|><|user|>what is 2 plus 3?<|end|><|assistant|>")


def test_decode_response_stops_at_the_first_end():
    end = CHAR.special_id(END)
    tac, more = CHAR.encode("tac").tolist(), CHAR.encode(" and more").tolist()
    assert decode_response(CHAR, tac + [end] + more + [end]) == ("tac", True)
    assert decode_response(CHAR, [end] + tac) == ("", True)
    assert decode_response(CHAR, tac + more) == ("tac and more", False)
    # Other special tokens are never spelled out in a response.
    assert decode_response(CHAR, tac + [CHAR.special_id(USER)] + more) == ("tac and more", False)


def test_template_with_sentencepiece(tmp_path):
    sp = build_tokenizer(DataConfig(tokenizer="sentencepiece", sp_vocab_size=400), CHAT_TEXT, tmp_path)
    specials = [sp.special_id(token) for token in SPECIAL_TOKENS]
    assert len(set(specials)) == len(SPECIAL_TOKENS)
    tokens, mask = encode_chat(sp, MULTI_TURN)
    expected_tokens, expected_mask = expected_encoding(sp, MULTI_TURN_SEGMENTS)
    np.testing.assert_array_equal(tokens, expected_tokens)
    np.testing.assert_array_equal(mask, expected_mask)
    # No text spells a special token, not even the template's own markup.
    assert not set(sp.encode(MULTI_TURN_TEXT).tolist()) & set(specials)
    # The learned tokens decode to the assistant turns; the generation prompt ends in <|assistant|>.
    learned = tokens[mask == 1]
    answers = np.split(learned, np.flatnonzero(learned == sp.special_id(END)) + 1)[:-1]
    assert [decode_response(sp, answer) for answer in answers] == [("5", True), ("tac", True)]
    prompt, prompt_mask = encode_chat(sp, MULTI_TURN, generation_prompt=True)
    assert prompt[-1] == sp.special_id(ASSISTANT) and prompt_mask[-1] == 0


# ---------------------------------------------------------------------------------------------
# The response-masked loss with the tiny model


def chat_rows(chats=CHATS, pack: bool = False, seq_len: int = SEQ_LEN, overlong: str = "truncate"):
    return build_rows([encode_chat(CHAR, chat) for chat in chats], seq_len, CHAR.pad_id, pack=pack, overlong=overlong)


def numpy_nll(logits, targets) -> np.ndarray:
    """-log softmax(logits)[target], in float64."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return -np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def model_logits(params, rows) -> np.ndarray:
    return np.asarray(jax.jit(GPT(MODEL).apply)(params, rows["inputs"], positions=rows.get("positions"),
                                                 segment_ids=rows.get("segment_ids")))


def hand_loss(params, rows) -> tuple[float, float]:
    """(loss, response accuracy) by hand: summed over response tokens / response tokens in all rows."""
    logits = model_logits(params, rows)
    weights = rows["weights"].astype(np.float64)
    correct = logits.argmax(-1) == rows["targets"]
    return ((numpy_nll(logits, rows["targets"]) * weights).sum() / weights.sum(),
            (correct * weights).sum() / weights.sum())


def max_abs_diff(a, b) -> float:
    """The largest difference between two pytrees of arrays."""
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b))
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in pairs)


def masked_loss_and_grads(params, rows):
    objective = make_masked_lm_objective(GPT(MODEL).apply, deterministic=True)
    batch = dict(rows, loss_denominator=np.float32(rows["weights"].sum()))
    return jax.jit(jax.value_and_grad(lambda p: objective(p, batch, jax.random.PRNGKey(0))[0]))(params)


@pytest.fixture(scope="module")
def params():
    return init(MODEL)


def test_prompt_targets_change_neither_loss_nor_grads(params):
    rows, _ = chat_rows()
    prompt = rows["weights"] == 0
    shift = 1 + np.arange(prompt.size).reshape(prompt.shape) % 7  # 1..7: every prompt target changes
    other = (rows["targets"] + shift) % MODEL.vocab_size
    changed = dict(rows, targets=np.where(prompt, other, rows["targets"]).astype(np.int32))
    assert (changed["targets"] != rows["targets"]).sum() == prompt.sum()

    loss, grads = masked_loss_and_grads(params, rows)
    changed_loss, changed_grads = masked_loss_and_grads(params, changed)
    np.testing.assert_allclose(changed_loss, loss, rtol=1e-6)
    assert_trees_close(changed_grads, grads, rtol=1e-5, atol=1e-7)

    # The check has teeth: one response token's target does change both.
    row, position = np.argwhere(rows["weights"] == 1)[0]
    one = dict(rows, targets=rows["targets"].copy())
    one["targets"][row, position] = (one["targets"][row, position] + 1) % MODEL.vocab_size
    one_loss, one_grads = masked_loss_and_grads(params, one)
    assert abs(float(one_loss) - float(loss)) > 1e-4
    assert max_abs_diff(one_grads, grads) > 1e-6


def test_masked_loss_matches_hand_computation(params):
    rows, stats = chat_rows()
    counts = rows["weights"].sum(axis=1)
    assert len(set(counts.tolist())) > 3  # uneven numbers of response tokens per row
    assert stats.response_tokens == counts.sum()
    objective = make_masked_lm_objective(GPT(MODEL).apply, deterministic=True)
    loss, metrics = objective(params, dict(rows, loss_denominator=np.float32(counts.sum())), jax.random.PRNGKey(0))
    expected_loss, expected_accuracy = hand_loss(params, rows)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["response_accuracy"], expected_accuracy, rtol=1e-5, atol=1e-7)


# (strategy, accum_steps) cases checked against plain jit without accumulation.
STEP_CASES = {
    "single-accum2": (Single, 2),
    "mesh": (Mesh, 1),
    "mesh-accum2": (Mesh, 2),
    "pmap": (Pmap, 1),
    "pmap-accum2": (Pmap, 2),
}


def step_batch() -> dict:
    """16 rows with uneven response counts; the last has none, so under pmap and accumulation one
    (device, micro-batch) shard holds no response token at all."""
    rows, _ = chat_rows()
    assert len(rows["inputs"]) == 2 * NUM_DEVICES
    rows["weights"][-1] = 0.0
    return rows


def one_train_step(strategy, accum_steps: int) -> tuple[dict, dict]:
    """(metrics, params) on the host after one masked-LM step from `init(MODEL)`. Plain SGD, so the
    update is the gradient itself (Adam would hide a wrongly scaled gradient)."""
    optimizer = optax.sgd(0.5)

    def init_fn():
        return TrainState.create(init(MODEL), optimizer, jax.random.PRNGKey(1))

    abstract_state = jax.eval_shape(init_fn)
    state = strategy.compile_init(init_fn, abstract_state)()
    objective = make_masked_lm_objective(GPT(MODEL).apply, deterministic=True)
    step = strategy.compile(make_train_step(objective, optimizer, strategy.reduce, accum_steps), abstract_state)
    state, metrics = step(state, strategy.place_batch(step_batch()), jax.random.PRNGKey(2))
    metrics = summary([strategy.metrics_to_host(metrics)])
    return metrics, jax.tree.map(np.asarray, jax.device_get(strategy.state_to_host(state).params))


@pytest.fixture(scope="module")
def single_step():
    return one_train_step(Single(), 1)


def test_train_step_reports_the_hand_computed_loss_and_moves_params(single_step, params):
    metrics, new_params = single_step
    expected_loss, expected_accuracy = hand_loss(params, step_batch())
    np.testing.assert_allclose(metrics["loss"], expected_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["response_accuracy"], expected_accuracy, rtol=1e-5, atol=1e-7)
    assert max_abs_diff(new_params, params) > 1e-4


@pytest.mark.parametrize("case", cases("mesh-accum2", **{name: name for name in STEP_CASES}))
def test_train_step_matches_single_device_without_accumulation(case, single_step):
    assert jax.device_count() == NUM_DEVICES
    make_strategy, accum_steps = STEP_CASES[case]
    metrics, new_params = one_train_step(make_strategy(), accum_steps)
    expected_metrics, expected_params = single_step
    for name in ("loss", "response_accuracy", "grad_norm"):
        np.testing.assert_allclose(metrics[name], expected_metrics[name], rtol=2e-5, err_msg=name)
    assert_trees_close(new_params, expected_params, rtol=1e-4, atol=1e-6)


def weighted_nll(params, rows) -> np.ndarray:
    """The nll of every response token, in row-major order."""
    return numpy_nll(model_logits(params, rows), rows["targets"])[rows["weights"] == 1]


def test_packing_changes_nothing_but_the_number_of_rows(params):
    chats = SHORT_CHATS + CHATS[:6] + SHORT_CHATS[::-1]
    padded, padded_stats = chat_rows(chats, pack=False)
    packed, packed_stats = chat_rows(chats, pack=True)
    assert packed_stats.rows < padded_stats.rows == len(chats)
    assert packed["segment_ids"].max() > 1  # some row really holds several conversations
    assert (packed_stats.response_tokens, packed_stats.truncated, packed_stats.dropped) == \
        (padded_stats.response_tokens, 0, 0)
    np.testing.assert_array_equal(packed["targets"][packed["weights"] == 1], padded["targets"][padded["weights"] == 1])

    np.testing.assert_allclose(weighted_nll(params, packed), weighted_nll(params, padded), rtol=1e-5, atol=1e-6)
    padded_loss, _ = masked_loss_and_grads(params, padded)
    packed_loss, _ = masked_loss_and_grads(params, packed)
    np.testing.assert_allclose(packed_loss, padded_loss, rtol=1e-5)
    np.testing.assert_allclose(packed_loss, hand_loss(params, padded)[0], rtol=1e-5)


LONG_PROMPT = [{"role": "user", "content": "what is 2 plus 3? " * 3}, {"role": "assistant", "content": "5"}]


@pytest.mark.parametrize("overlong, expected", [
    # MULTI_TURN keeps its first 41 tokens when truncated: through the first answer "5<|end|>" (2
    # response tokens). LONG_PROMPT's answer is past the cut, so it has none and is dropped either
    # way; SHORT_MULTI_TURN fits ("hello<|end|>", "5<|end|>": 8 response tokens).
    ("truncate", dict(conversations=3, truncated=2, dropped=1, rows=2, response_tokens=2 + 8)),
    ("drop", dict(conversations=3, truncated=0, dropped=2, rows=1, response_tokens=8)),
])
def test_overlong_conversations(overlong, expected):
    rows, stats = chat_rows([MULTI_TURN, LONG_PROMPT, SHORT_MULTI_TURN], overlong=overlong)
    assert vars(stats) == expected
    assert rows["inputs"].shape == (expected["rows"], SEQ_LEN)
    assert rows["weights"].sum() == expected["response_tokens"]
    if overlong == "truncate":
        tokens, mask = encode_chat(CHAR, MULTI_TURN)
        np.testing.assert_array_equal(rows["inputs"][0], tokens[:SEQ_LEN])
        np.testing.assert_array_equal(rows["targets"][0], tokens[1 : SEQ_LEN + 1])
        np.testing.assert_array_equal(rows["weights"][0], mask[1 : SEQ_LEN + 1])
    short_tokens, _ = encode_chat(CHAR, SHORT_MULTI_TURN)
    np.testing.assert_array_equal(rows["inputs"][-1, : len(short_tokens) - 1], short_tokens[:-1])


# ---------------------------------------------------------------------------------------------
# The held-out split


def instructions(chats) -> set[str]:
    return {chat[0]["content"] for chat in chats}


def spelled_in(instruction: str, text: str) -> bool:
    """Whether `text` states `instruction` as a whole phrase ("reverse the word ab" is not in
    "reverse the word abc")."""
    return re.search(rf"(?<![a-z0-9]){re.escape(instruction)}(?![a-z0-9])", text) is not None


def test_held_out_problems_are_in_no_training_chat_nor_the_corpus():
    train, val = load_conversations(DataConfig(source="world", world_chats=2000))
    train_instructions = instructions(train)
    corpus = world.corpus(0, 500)  # the corpus of the same data seed
    for seed in range(4):
        held_out = {p.instruction for p in world.problems(seed, 300, held_out=True)}
        assert not held_out & train_instructions
        assert not any(spelled_in(instruction, corpus) for instruction in held_out)
        # The checks have teeth: training-side problems of the same seed do turn up in both.
        training_side = {p.instruction for p in world.problems(seed, 300)}
        assert training_side & train_instructions
        assert any(spelled_in(instruction, corpus) for instruction in training_side)

    assert len(val) > 100
    for chat in val:
        problem = world.parse_instruction(chat[0]["content"])
        assert problem.held_out and chat[1]["content"] == problem.answer
    assert not any(world.parse_instruction(chat[0]["content"]).held_out for chat in train)


# ---------------------------------------------------------------------------------------------
# The sft stage end to end, on a tiny pretraining run

SFT_STEPS = 4


def sft_config(**sections) -> config.RunConfig:
    """The `tiny` sft preset shrunk to seconds, for a model like conftest.BASE_RUN's (no init_from)."""
    cfg = config.replace(
        config.preset("tiny", "sft"),
        model=dict(n_layer=2, n_head=2, d_model=32, context_len=64),
        optim=dict(warmup_steps=2),
        data=dict(world_chats=64),
        train=dict(batch_size=8, max_steps=SFT_STEPS, log_every=1, eval_every=2, eval_batches=1, ckpt_every=2,
                   progress=False),
    )
    return config.replace(cfg, **sections)


def sft_argv(run_dir, *flags, cfg=None) -> list[str]:
    return ["sft", *cli_flags(cfg or sft_config(), stage="sft"), "--run-dir", str(run_dir), *map(str, flags)]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, base_run):
    """`genai-jax sft --init-from BASE` for SFT_STEPS steps. Commands may add eval.json to it."""
    run_dir = tmp_path_factory.mktemp("sft") / "run"
    cli.main(sft_argv(run_dir, "--init-from", base_run))
    return run_dir


@pytest.mark.slow
def test_sft_run_directory(sft_run, base_run):
    saved = rundir.read_config(sft_run)
    base = rundir.read_config(base_run)
    assert saved.train.init_from == str(base_run)
    assert saved.model == base.model
    assert (sft_run / "tokenizer.json").read_bytes() == (base_run / "tokenizer.json").read_bytes()

    records = rundir.read_metrics(sft_run)
    assert records[0]["step"] == 0 and records[0]["conversations"] == 64 and records[0]["response_tokens"] > 64
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, SFT_STEPS + 1))
    assert all(np.isfinite(r["loss"]) and 0 <= r["response_accuracy"] <= 1 for r in train)
    assert [r["step"] for r in records if "val_loss" in r] == [0, 2, 4]  # the starting point, then eval_every

    # Fine-tuned from the base run's weights: a few warmup steps move them only slightly (a fresh
    # init would be ~0.02 away everywhere).
    _, _, base_params = runs.load_trained(base_run)
    _, _, sft_params = runs.load_trained(sft_run)
    assert 0 < max_abs_diff(sft_params, base_params) < 5e-3


@pytest.mark.slow
def test_sft_resumes_with_more_steps(tmp_path, sft_run, base_run):
    run_dir = shutil.copytree(sft_run, tmp_path / "run")
    before = rundir.read_metrics(run_dir)
    stages.sft(sft_config(train=dict(max_steps=SFT_STEPS + 2, init_from=str(base_run))), run_dir)
    records = rundir.read_metrics(run_dir)
    assert records[: len(before)] == before
    assert [r["step"] for r in records if "loss" in r] == list(range(1, SFT_STEPS + 3))
    assert Checkpointer(run_dir / "checkpoints").latest_step() == SFT_STEPS + 2


@pytest.mark.slow
def test_sft_refuses_a_base_run_with_another_model(tmp_path, capsys, base_run):
    before = snapshot(base_run)
    code, _, err = run_cli(capsys, *sft_argv(tmp_path / "run", "--init-from", base_run, "--model.n-layer", 3))
    assert_one_error(code, err, "model.n_layer=2 there, 3 here", str(base_run))
    assert "model.dropout" not in err
    assert not (tmp_path / "run").exists()
    assert snapshot(base_run) == before


@pytest.mark.slow
def test_sft_takes_its_model_from_the_init_run(tmp_path, capsys, base_run):
    """Without --model flags the CLI takes the model section from --init-from (as an imported
    checkpoint needs: no preset has its shape), keeping the stage's own dropout and head."""
    flags = cli_flags(sft_config(), stage="sft")
    without_model = [x for flag, value in zip(flags[::2], flags[1::2]) if not flag.startswith("--model.")
                     for x in (flag, value)]
    assert len(without_model) < len(flags)
    code, _, err = run_cli(capsys, "sft", *without_model, "--run-dir", tmp_path / "run", "--init-from", base_run)
    assert code == 0, err
    base_model = rundir.read_config(base_run).model
    assert base_model != config.preset("tiny", "sft").model
    stage_model = config.preset("tiny", "sft").model
    assert rundir.read_config(tmp_path / "run").model == dataclasses.replace(
        base_model, dropout=stage_model.dropout, head=stage_model.head)


def test_sft_needs_init_from(tmp_path, capsys):
    code, _, err = run_cli(capsys, *sft_argv(tmp_path / "run"))
    assert_one_error(code, err, "--init-from")
    assert not (tmp_path / "run").exists()


def write_jsonl(path, chats) -> str:
    path.write_text("".join(json.dumps({"messages": chat}) + "\n" for chat in chats))
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("bad_index", [1, 9], ids=["train-split", "validation-split"])
def test_sft_names_a_character_the_base_tokenizer_lacks(tmp_path, capsys, base_run, bad_index):
    """Of 10 conversations the last is the validation split (data.val_fraction 0.1); either way the
    error names the file and the conversation's line (a blank first line: lines are not indices)."""
    chats = [world.chat(p) for p in world.problems(0, 10)]
    chats[bad_index] = qa("what is 2 plus 2?", "four \u20ac")
    path = write_jsonl(tmp_path / "chats.jsonl", chats)
    (tmp_path / "chats.jsonl").write_text("\n" + (tmp_path / "chats.jsonl").read_text())
    code, _, err = run_cli(capsys, *sft_argv(tmp_path / "run", "--init-from", base_run, "--data.path", path))
    assert_one_error(code, err, "'\u20ac'", f"{path}:{bad_index + 2}:", "data.tokenizer=byte")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_byte_tokenizer_run_fine_tunes_on_characters_pretraining_never_saw(tmp_path, capsys):
    """data.tokenizer=byte: pretrained on the world corpus (no euro sign), SFT on a file with one."""
    base = tmp_path / "base"
    stages.pretrain(config.replace(BASE_RUN, data=dict(tokenizer="byte")), base)
    assert "\u20ac" not in world.corpus(0, 200)
    chats = [qa("what is 2 plus 2?", "four \u20ac")] + [world.chat(p) for p in world.problems(0, 9)]
    path = write_jsonl(tmp_path / "chats.jsonl", chats)
    code, _, err = run_cli(capsys, *sft_argv(tmp_path / "run", "--init-from", base, "--data.path", path))
    assert code == 0, err
    records = rundir.read_metrics(tmp_path / "run")
    assert records[0]["conversations"] == 9  # the euro sign's conversation is in the training split
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)


# ---------------------------------------------------------------------------------------------
# Commands on the fine-tuned run

PROMPTS = [p.instruction for p in world.problems(11, 3, held_out=True)]


@pytest.mark.slow
def test_eval_command(capsys, sft_run):
    code, out, err = run_cli(capsys, "eval", "--run", sft_run, "--num-prompts", 16)
    assert code == 0, err
    result = json.loads((sft_run / "eval.json").read_text())
    assert 0 <= result["gold_score"] <= 1 and 0 <= result["ended"] <= 1 and 0 <= result["exact"] <= 1
    assert re.search(rf"gold_score {100 * result['gold_score']:.1f}/100", out), out
    assert len(result["examples"]) == 5
    for example in result["examples"]:
        assert world.parse_instruction(example["prompt"]).held_out
        assert example["gold"] == world.gold_score(example["prompt"], example["response"])


def generate_file(capsys, run_dir, prompts_path, out_path) -> list[dict]:
    code, _, err = run_cli(capsys, "generate", "--run", run_dir, "--prompts", prompts_path, "--out", out_path,
                           "--max-new-tokens", 8, "--temperature", 0)
    assert code == 0, err
    return [json.loads(line) for line in out_path.read_text().splitlines()]


@pytest.mark.slow
def test_generate_answers_a_prompts_file_in_order(tmp_path, capsys, sft_run):
    prompts_path = tmp_path / "prompts.jsonl"
    prompts_path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    first = generate_file(capsys, sft_run, prompts_path, tmp_path / "out.jsonl")
    second = generate_file(capsys, sft_run, prompts_path, tmp_path / "again.jsonl")
    assert [set(line) for line in first] == [{"prompt", "response"}] * len(PROMPTS)
    assert [line["prompt"] for line in first] == PROMPTS
    assert first == second  # greedy decoding is deterministic

    cfg, tokenizer, params = runs.load_trained(sft_run)
    responses = evaluation.respond(cfg, params, tokenizer, [qa(p, "x")[:1] for p in PROMPTS], max_new_tokens=8)
    assert [line["response"] for line in first] == [r.text for r in responses]


@pytest.mark.slow
def test_chat_keeps_the_history(monkeypatch, capsys, sft_run):
    lines = iter(["what is 1 plus 2?", "reverse the word dog"])

    def fake_input(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    calls, real_respond = [], evaluation.respond

    def recording_respond(cfg, params, tokenizer, chats, **kwargs):
        responses = real_respond(cfg, params, tokenizer, chats, **kwargs)
        calls.append((copy.deepcopy(chats), responses))
        return responses

    monkeypatch.setattr(builtins, "input", fake_input)
    monkeypatch.setattr(evaluation, "respond", recording_respond)
    code, out, err = run_cli(capsys, "chat", "--run", sft_run, "--max-new-tokens", 8)
    assert code == 0, err
    assert len(calls) == 2
    (first_chats, (first,)), (second_chats, (second,)) = calls
    assert first_chats == [[{"role": "user", "content": "what is 1 plus 2?"}]]
    assert second_chats == [[{"role": "user", "content": "what is 1 plus 2?"},
                             {"role": "assistant", "content": first.text},
                             {"role": "user", "content": "reverse the word dog"}]]
    assert out.count("assistant> ") == 2
    assert f"assistant> {first.text}\n" in out and f"assistant> {second.text}\n" in out


def greedy_by_full_forward(cfg, params, tokenizer, chat, max_new_tokens: int):
    """Greedy decoding without a cache or padding: the whole sequence through the model each step."""
    tokens = encode_chat(tokenizer, chat, generation_prompt=True)[0].tolist()
    prompt_len = len(tokens)
    apply = jax.jit(GPT(cfg.model).apply)
    for _ in range(max_new_tokens):
        row = np.full((1, cfg.model.context_len), tokenizer.pad_id, np.int32)  # right padding: causal, harmless
        row[0, : len(tokens)] = tokens
        tokens.append(int(np.asarray(apply(params, row))[0, len(tokens) - 1].argmax()))
    return decode_response(tokenizer, tokens[prompt_len:])


def test_respond_is_unchanged_by_left_padding():
    """Greedy answers of a random model (init_std 0.2: sharp logits that change with every token),
    answered together (the shorter prompt left-padded) or alone."""
    cfg = config.RunConfig(model=tiny_model(vocab_size=CHAR.vocab_size, context_len=64, init_std=0.2))
    params = init(cfg.model, seed=3)
    short = qa(PROMPTS[0], "x")[:1]
    long = [{"role": "system", "content": "answer in one word."}, *qa(PROMPTS[1], "x")[:1]]
    lengths = [len(encode_chat(CHAR, chat, generation_prompt=True)[0]) for chat in (short, long)]
    assert lengths[1] - lengths[0] > 8  # different prompt buckets

    together = evaluation.respond(cfg, params, CHAR, [short, long], max_new_tokens=8, batch_size=2)
    alone = [evaluation.respond(cfg, params, CHAR, [chat], max_new_tokens=8, batch_size=2)[0] for chat in (short, long)]
    assert together == alone
    assert together[0].text != together[1].text  # answers depend on the prompt: the check has teeth
    for chat, response in zip((short, long), together):
        assert (response.text, response.ended) == greedy_by_full_forward(cfg, params, CHAR, chat, 8)


def test_sequences_sized_by_the_data():
    """data.seq_len -1 (the pretrained presets): rows as long as the longest conversation needs,
    rounded up to a multiple of 64 and at most the context; nothing truncated."""
    assert [fitted_seq_len(n, 96) for n in (1, 64, 65, 200)] == [64, 64, 96, 96]
    chats, _ = load_conversations(DataConfig(world_chats=40))
    tokenizer = CharTokenizer.build(world.corpus(0, 50))
    longest = max(len(encode_chat(tokenizer, chat)[0]) - 1 for chat in chats)
    rows, stats = encode_rows(chats, tokenizer, DataConfig(), config.SEQ_LEN_FROM_DATA, limit=4096)
    assert stats["seq_len"] == fitted_seq_len(longest, 4096) == rows["inputs"].shape[1] and stats["truncated"] == 0
    rows, stats = encode_rows(chats, tokenizer, DataConfig(), config.SEQ_LEN_FROM_DATA, limit=longest - 1)
    assert stats["seq_len"] == longest - 1 and stats["truncated"] > 0
