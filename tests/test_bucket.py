"""Run directories and data in a Cloud Storage bucket (gs://...), against a local emulator (no
network): the files a run keeps besides its checkpoints, and text and JSONL data, go through etils'
epath, TensorBoard events through tensorboardX's GCS writer, and the checkpoint directory reaches
orbax as the URL it is.

Orbax's own writes to GCS (tensorstore's OCDBT) are not run here: the emulator does not implement
the conditional writes they rely on."""

import atexit
import json
import os
import socket

import numpy as np
import pytest
from conftest import CORPUS
from etils import epath

from genai_jax import config, reward, rundir
from genai_jax.checkpoint import Checkpointer
from genai_jax.config import DataConfig
from genai_jax.data import sources
from genai_jax.data.conversations import read_jsonl_conversations
from genai_jax.tokenizer import build_tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def bucket():
    """A bucket on an emulator that stays up until the process exits: TensorBoard's writers upload
    their events once more from their own exit handlers, which run before this earlier-registered one."""
    from gcp_storage_emulator.server import create_server
    from tensorboardX import record_writer

    # and once more when collected, as late as the interpreter's shutdown, with the emulator gone
    record_writer.GCSRecordWriter.__del__ = lambda writer: None
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket="genai-jax-test")
    server._api.daemon = True  # its thread must not hold the process open at exit
    server.start()
    atexit.register(server.stop)
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    return "gs://genai-jax-test"


def test_config_tokenizers_and_normalization_round_trip(bucket):
    run_dir = epath.Path(f"{bucket}/files")
    assert rundir.is_remote(run_dir) and str(run_dir) == f"{bucket}/files"
    cfg = config.preset("tiny")
    rundir.write_config(run_dir, cfg)
    assert json.loads((run_dir / rundir.CONFIG_FILE).read_text())["model"]["d_model"] == cfg.model.d_model
    assert rundir.read_config(run_dir) == cfg

    for kind in ("char", "sentencepiece"):
        directory = run_dir / kind
        saved = build_tokenizer(DataConfig(tokenizer=kind, sp_vocab_size=300), CORPUS, directory)
        loaded = load_tokenizer(epath.Path(str(directory)))
        np.testing.assert_array_equal(loaded.encode(CORPUS), saved.encode(CORPUS))
        assert loaded.decode(loaded.encode(CORPUS)) == CORPUS

    reward.save_normalization(str(run_dir), {"gain": 2.0, "bias": -0.5})
    assert reward.load_normalization(str(run_dir)) == {"gain": 2.0, "bias": -0.5}


def test_metrics_log_is_rewritten_whole_and_trimmed_on_resume(bucket, monkeypatch):
    run_dir = epath.Path(f"{bucket}/metrics")
    writer = rundir.MetricsWriter(run_dir)
    writer.write({"step": 1, "loss": 3.0})
    assert rundir.read_metrics(run_dir) == []  # rewritten at most every REMOTE_REWRITE_SECONDS
    writer.write({"step": 2, "loss": 2.0})
    writer.flush()  # as with each checkpoint
    assert [r["step"] for r in rundir.read_metrics(run_dir)] == [1, 2]
    writer.write({"step": 3, "loss": 1.0})
    writer.close()
    assert [r["step"] for r in rundir.read_metrics(run_dir)] == [1, 2, 3]
    assert any(path.name.startswith("events.out.tfevents") for path in (run_dir / "tensorboard").iterdir())

    # a run resumed from its step-2 checkpoint drops step 3 and logs it again
    monkeypatch.setattr(rundir.MetricsWriter, "REMOTE_REWRITE_SECONDS", 0.0)
    writer = rundir.MetricsWriter(run_dir, start_step=2)
    assert [r["step"] for r in rundir.read_metrics(run_dir)] == [1, 2]
    writer.write({"step": 3, "loss": 0.5})
    assert rundir.read_metrics(run_dir)[-1] == {"step": 3, "loss": 0.5}
    writer.close()
    assert [r["loss"] for r in rundir.read_metrics(run_dir)] == [3.0, 2.0, 0.5]


def test_checkpoint_directory_reaches_orbax_as_a_url(bucket, tmp_path, monkeypatch):
    checkpointer = Checkpointer(f"{bucket}/run/checkpoints")
    assert str(checkpointer.manager.directory) == f"{bucket}/run/checkpoints"
    assert checkpointer.latest_step() is None
    checkpointer.close()
    monkeypatch.chdir(tmp_path)  # a local relative path is made absolute
    local = Checkpointer("run/checkpoints")
    assert str(local.manager.directory) == str(tmp_path / "run" / "checkpoints")
    local.close()


def test_text_and_jsonl_data_are_read_from_a_bucket(bucket):
    root = epath.Path(f"{bucket}/data")
    (root / "corpus" / "sub").mkdir(parents=True, exist_ok=True)
    (root / "corpus" / "a.txt").write_text("first half\n")
    (root / "corpus" / "sub" / "b.txt").write_text("second half\n")
    (root / "corpus" / "notes.md").write_text("not read")
    assert sources.load_text(DataConfig(source="text", path=f"{bucket}/data/corpus")) == "first half\n\nsecond half\n"

    chats = root / "chats.jsonl"
    chats.write_text('{"prompt": "hi", "response": "hello"}\n\n{"prompt": "bye"}\n')
    with pytest.raises(config.UserError, match=f"^{bucket}/data/chats.jsonl:3: "):
        read_jsonl_conversations(str(chats))
    assert read_jsonl_conversations(str(chats), skip_malformed=True) == (
        [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]], 1)
