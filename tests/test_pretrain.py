"""The pretraining stage end to end: run directory contents, exact resume, every data source."""

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import CORPUS, train_losses, tiny_run

from genai_jax import rundir, stages
from genai_jax.tokenizer import SentencePieceTokenizer, load_tokenizer


def test_run_directory_holds_config_tokenizer_metrics_and_samples(trained_run):
    for name in ("config.json", "tokenizer.json", "metrics.jsonl", "samples.txt"):
        assert (trained_run / name).is_file(), name
    assert any((trained_run / "tensorboard").iterdir())
    assert sorted(int(p.name) for p in (trained_run / "checkpoints").iterdir() if p.name.isdigit()) == [4]

    saved = rundir.read_config(trained_run)
    assert saved.model.vocab_size == load_tokenizer(trained_run).vocab_size
    assert saved.train == tiny_run().train

    records = rundir.read_metrics(trained_run)
    assert records[0]["step"] == 0 and records[0]["n_params"] > 0
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    for record in train_records:
        assert np.isfinite(record["loss"]) and record["tokens_per_s"] > 0 and "lr" in record
    assert train_records[-1]["loss"] < train_records[0]["loss"]
    eval_records = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in eval_records] == [0, 4]  # the untrained model, then the end
    assert all(np.isfinite(r["val_loss"]) for r in eval_records)

    sample = (trained_run / "samples.txt").read_text()
    assert len(sample) == 1 + tiny_run().train.sample_tokens + 1  # prompt token, new tokens, newline


@pytest.mark.slow
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_resumed_run_matches_uninterrupted_run(tmp_path, dropout):
    cfg = tiny_run(model={"dropout": dropout}, train={"max_steps": 8, "ckpt_every": 4, "sample_tokens": 0})
    stages.pretrain(cfg, tmp_path / "straight")
    stages.pretrain(tiny_run(model={"dropout": dropout}, train={"max_steps": 4, "sample_tokens": 0}),
                    tmp_path / "resumed")
    assert sorted(train_losses(tmp_path / "resumed")) == [1, 2, 3, 4]
    stages.pretrain(cfg, tmp_path / "resumed")

    straight, resumed = train_losses(tmp_path / "straight"), train_losses(tmp_path / "resumed")
    assert sorted(straight) == list(range(1, 9))
    assert resumed == straight
    steps = [r["step"] for r in rundir.read_metrics(tmp_path / "resumed") if "loss" in r]
    assert steps == sorted(set(steps)), "a step is logged twice"


def write_corpus_files(root):
    """A single text file and a folder of .txt files (plus a non-.txt file to ignore)."""
    (root / "corpus.txt").write_text(CORPUS)
    folder = root / "folder"
    (folder / "sub").mkdir(parents=True)
    lines = CORPUS.splitlines(keepends=True)
    (folder / "a.txt").write_text("".join(lines[: len(lines) // 2]))
    (folder / "sub" / "b.txt").write_text("".join(lines[len(lines) // 2 :]))
    (folder / "notes.md").write_text("\x00 not text, and not read")
    return root / "corpus.txt", folder


@pytest.mark.slow
@pytest.mark.parametrize("which", ["file", "folder"])
def test_local_text_trains(tmp_path, which):
    file, folder = write_corpus_files(tmp_path)
    path = file if which == "file" else folder
    final = stages.pretrain(tiny_run(data={"path": str(path)}), tmp_path / "run")
    assert np.isfinite(final["val_loss"])
    losses = train_losses(tmp_path / "run")
    assert losses[4] < losses[1]
    assert load_tokenizer(tmp_path / "run").chars == "".join(sorted(set(CORPUS)))


@pytest.mark.slow
def test_tfds_source_trains_on_mock_data(tmp_path):
    with tfds.testing.mock_data(num_examples=200):
        final = stages.pretrain(tiny_run(data={"source": "tfds:tiny_shakespeare"}), tmp_path / "run")
    assert np.isfinite(final["val_loss"])
    assert sorted(train_losses(tmp_path / "run")) == [1, 2, 3, 4]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["source"] == "tfds:tiny_shakespeare"


@pytest.mark.slow
def test_sentencepiece_tokenizer_is_trained_saved_and_reloaded_on_resume(tmp_path):
    run_dir = tmp_path / "run"
    data = {"tokenizer": "sentencepiece", "sp_vocab_size": 400}
    stages.pretrain(tiny_run(data=data, train={"max_steps": 2, "ckpt_every": 2}), run_dir)
    tokenizer = load_tokenizer(run_dir)
    assert isinstance(tokenizer, SentencePieceTokenizer) and tokenizer.vocab_size == 400
    assert rundir.read_config(run_dir).model.vocab_size == 400
    model_bytes = (run_dir / "tokenizer.model").read_bytes()

    stages.pretrain(tiny_run(data=data, train={"max_steps": 4, "ckpt_every": 2}), run_dir)
    assert (run_dir / "tokenizer.model").read_bytes() == model_bytes
    assert sorted(train_losses(run_dir)) == [1, 2, 3, 4]
    text = "the sum of 12 and 30 is 42.\nabc reversed is cba."
    assert load_tokenizer(run_dir).decode(load_tokenizer(run_dir).encode(text)) == text


def test_steady_state_never_recompiles(tmp_path, caplog):
    """Six train steps and three evaluations compile the train and eval steps once each."""
    import jax

    cfg = tiny_run(train={"max_steps": 6, "eval_every": 2, "sample_tokens": 0})
    with jax.log_compiles(True), caplog.at_level("WARNING"):
        stages.pretrain(cfg, tmp_path / "run")
    compiled = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Finished XLA compilation")]
    assert sum("jit(train_step)" in m for m in compiled) == 1
    assert sum("jit(eval_step)" in m for m in compiled) == 1


@pytest.mark.slow
def test_run_that_restarts_before_its_first_checkpoint_logs_each_step_once(tmp_path):
    import shutil

    cfg = tiny_run(train={"max_steps": 3, "eval_every": 1000, "sample_tokens": 0})
    stages.pretrain(cfg, tmp_path / "run")
    first = rundir.read_metrics(tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "checkpoints")  # as if it had died before saving
    stages.pretrain(cfg, tmp_path / "run")
    again = rundir.read_metrics(tmp_path / "run")
    assert [r["step"] for r in again] == [r["step"] for r in first] == [0, 0, 1, 2, 3, 3]
    assert [r.get("loss") for r in again] == [r.get("loss") for r in first]
