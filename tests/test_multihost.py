"""Multi-host runs on one machine: 2 processes x 2 CPU devices, joined through
`genai_jax.distributed` on 127.0.0.1, train like 1 process x 4 devices (pretraining, SFT, PPO),
and their checkpoints restore in one process. The distributed settings themselves are checked
in-process."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import (BASE_RUN, REPO, assert_one_error, assert_trees_close, cli_flags, run_cli, run_cli_subprocess,
                      train_losses)
from test_pipeline import small_configs
from test_sft import sft_config

from genai_jax import distributed, pipeline, rundir, runs
from genai_jax.checkpoint import Checkpointer

pytestmark = pytest.mark.slow  # several processes, each a whole stage: the full suite's, not the fast tier's

PRETRAIN = ["pretrain", *cli_flags(BASE_RUN)]
SFT = ["sft", *cli_flags(sft_config(), stage="sft")]
# Two iterations of two epochs x two minibatches (of one row per device), scored by the gold checker.
PPO = ["ppo", "--preset", "tiny", "--reward", "gold", "--data.world-chats", 64, "--train.batch-size", 8,
       "--train.max-steps", 2, "--train.eval-every", 2, "--train.ckpt-every", 2, "--train.no-progress",
       "--ppo.epochs", 2, "--ppo.minibatches", 2, "--ppo.max-new-tokens", 8, "--ppo.gold-prompts", 16]
# The pipeline of test_pipeline's small configs (saved as CONFIGS_DIR/<stage>/config.json).
PIPELINE = """
import sys
from pathlib import Path
from genai_jax import distributed, pipeline, rundir
distributed.initialize()
configs_dir, run_dir = sys.argv[1:]
configs = {stage: rundir.read_config(Path(configs_dir, stage)) for stage in pipeline.STAGES}
print("returned", sorted(pipeline.run_pipeline(configs, run_dir, gold_prompts=16)))
"""
# Wall-clock measurements, which differ between any two runs.
TIMINGS = ("tokens_per_s", "generate_s", "experience_s", "train_s", "generate_tokens_per_s", "host_peak_mib")
TIMEOUT = 240  # seconds: a hung collective fails the test instead of blocking it


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_processes(*argv, logs, processes: int = 2, devices: int = 2, returncode: int = 0,
                  program: tuple[str, ...] = ("-m", "genai_jax.cli")) -> list[str]:
    """`python PROGRAM ARGV` (the CLI by default) in `processes` processes of `devices` CPU
    devices each, joined on 127.0.0.1, each expected to exit with `returncode`; their output goes
    to files under `logs` (pipes could fill and block). Returns each process's output."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               **{distributed.COORDINATOR: f"127.0.0.1:{free_port()}", distributed.NUM_PROCESSES: str(processes)})
    logs.mkdir(parents=True, exist_ok=True)
    launched = []
    for index in range(processes):
        log = logs / f"process{index}.log"
        with open(log, "w") as out:
            launched.append((log, subprocess.Popen(
                [sys.executable, *program, *map(str, argv)], cwd=REPO, stdout=out,
                stderr=subprocess.STDOUT, env=env | {distributed.PROCESS_ID: str(index)})))
    deadline = time.monotonic() + TIMEOUT
    try:
        for _, process in launched:
            process.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        pytest.fail(f"killed after {TIMEOUT} s:\n" + "\n".join(log.read_text()[-2000:] for log, _ in launched))
    finally:
        for _, process in launched:
            process.kill()
            process.wait()
    outputs = [log.read_text() for log, _ in launched]
    for index, ((_, process), output) in enumerate(zip(launched, outputs)):
        assert process.returncode == returncode, f"process {index} exited {process.returncode}:\n{output[-4000:]}"
    return outputs


def run_one_process(*argv) -> None:
    done = run_cli_subprocess(*argv, devices=4)
    assert done.returncode == 0, done.stderr[-4000:]


def assert_same_records(one, two) -> None:
    """The same records in metrics.jsonl, timings aside, to float32 rounding."""
    a, b = ([{k: v for k, v in r.items() if k not in TIMINGS} for r in rundir.read_metrics(d)] for d in (one, two))
    assert [r.keys() for r in b] == [r.keys() for r in a]
    for record_a, record_b in zip(a, b):
        np.testing.assert_allclose([record_b[k] for k in record_a], list(record_a.values()), rtol=1e-5, atol=1e-6,
                                   err_msg=f"step {record_a['step']}")


@pytest.fixture(scope="module")
def pretrain_runs(tmp_path_factory):
    """The tiny pretraining run by 1 process x 4 devices and by 2 processes x 2 devices."""
    root = tmp_path_factory.mktemp("multihost")
    one, two = root / "one", root / "two"
    run_one_process(*PRETRAIN, "--run-dir", one)
    run_processes(*PRETRAIN, "--run-dir", two, logs=root / "logs")
    return one, two


def test_two_processes_pretrain_like_one(pretrain_runs):
    one, two = pretrain_runs
    assert sorted(train_losses(two)) == [1, 2, 3, 4]  # process 0 alone logs: each step once
    assert_same_records(one, two)
    assert (two / "samples.txt").read_text() == (one / "samples.txt").read_text()


def test_two_process_checkpoint_restores_in_one_process(tmp_path, pretrain_runs):
    """...and goes on with the batches one process would have drawn: the data position is a count
    of global batches (batch k holds the same rows however many processes share it)."""
    one, two = pretrain_runs
    assert_trees_close(runs.load_trained(two)[2], runs.load_trained(one)[2])

    run_dir = shutil.copytree(two, tmp_path / "run")
    before = rundir.read_metrics(run_dir)
    run_one_process(*PRETRAIN, "--train.max-steps", 6, "--run-dir", run_dir)
    records = rundir.read_metrics(run_dir)
    assert records[: len(before)] == before
    assert Checkpointer(run_dir / "checkpoints").latest_step() == 6
    straight = tmp_path / "straight"
    run_one_process(*PRETRAIN, "--train.max-steps", 6, "--run-dir", straight)
    resumed, expected = train_losses(run_dir), train_losses(straight)
    assert sorted(resumed) == sorted(expected) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([resumed[5], resumed[6]], [expected[5], expected[6]], rtol=1e-5)


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory, pretrain_runs):
    """SFT of the two-process base run, by 1 process x 4 devices and by 2 processes x 2 devices."""
    _, base = pretrain_runs
    root = tmp_path_factory.mktemp("multihost-sft")
    one, two = root / "one", root / "two"
    run_one_process(*SFT, "--init-from", base, "--run-dir", one)
    run_processes(*SFT, "--init-from", base, "--run-dir", two, logs=root / "logs")
    return one, two


def test_two_processes_sft_like_one(sft_runs):
    assert_same_records(*sft_runs)


def test_two_processes_ppo_like_one(tmp_path, sft_runs):
    """Every process samples, scores and shuffles the whole rollout batch and feeds its devices'
    rows, so rollouts, minibatches, updates and the held-out evaluation equal one process's."""
    policy, _ = sft_runs
    one, two = tmp_path / "one", tmp_path / "two"
    run_one_process(*PPO, "--policy", policy, "--run-dir", one)
    run_processes(*PPO, "--policy", policy, "--run-dir", two, logs=tmp_path / "logs")
    records = rundir.read_metrics(two)
    assert [r["step"] for r in records if "proxy_reward" in r] == [1, 2]  # process 0 alone logs
    assert [r["step"] for r in records if "val_gold_score" in r] == [0, 2]
    assert_same_records(one, two)
    assert_trees_close(runs.load_trained(two)[2], runs.load_trained(one)[2])


def test_two_processes_run_the_pipeline(tmp_path):
    """The whole recipe on 2 processes: every process takes part in every stage and in the final
    evaluation (orbax restores are collective), process 0 alone prints and writes the summary,
    complete; the reward stage holds the others until its normalisation, which ppo reads next, is
    written."""
    run_dir = tmp_path / "run"
    for stage, cfg in small_configs(run_dir).items():
        rundir.write_config(tmp_path / "configs" / stage, cfg)
    outputs = run_processes(tmp_path / "configs", run_dir, logs=tmp_path / "logs", program=("-c", PIPELINE))
    assert "returned ['base', 'ppo', 'reward', 'sft']" in outputs[0] and "returned []" in outputs[1]
    summary = json.loads((run_dir / pipeline.SUMMARY_FILE).read_text())
    assert set(summary) == set(pipeline.STAGES)
    assert all(value is not None for row in summary.values() for value in row.values()), summary
    assert "pipeline:" in outputs[0] and "pipeline:" not in outputs[1]  # one copy of each line
    assert "stage" not in outputs[1]  # and of the table


def test_two_processes_evaluate_once(tmp_path, pretrain_runs):
    """`eval` on 2 processes: both compute, process 0 alone prints and writes eval.json; `chat`,
    interactive, is refused."""
    _, two = pretrain_runs
    run = shutil.copytree(two, tmp_path / "run")
    outputs = run_processes("eval", "--run", run, "--num-prompts", 8, "--max-new-tokens", 8, logs=tmp_path / "logs")
    assert "gold_score" in outputs[0] and "gold_score" not in outputs[1]
    assert 0 <= json.loads((run / "eval.json").read_text())["gold_score"] <= 1
    outputs = run_processes("chat", "--run", run, logs=tmp_path / "chat-logs", returncode=2)
    for output in outputs:
        assert_one_error(2, output, "chat is interactive", "one process")


@pytest.mark.parametrize("strategy", ["single", "pmap"])
def test_one_process_strategies_are_refused_with_several(tmp_path, strategy):
    """`single` and `pmap` reduce over one process's devices only: each process would train its
    own model on its share of the data."""
    outputs = run_processes(*PRETRAIN, "--train.strategy", strategy, "--run-dir", tmp_path / "run",
                            logs=tmp_path / "logs", returncode=2)
    for output in outputs:
        assert_one_error(2, output, f"train.strategy={strategy}", "with 2 processes use train.strategy=mesh")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("env, needles", [
    ({distributed.NUM_PROCESSES: "two"}, [distributed.NUM_PROCESSES, "'two'", "not an integer"]),
    ({distributed.NUM_PROCESSES: "2", distributed.PROCESS_ID: "0"}, [distributed.COORDINATOR]),
    ({distributed.NUM_PROCESSES: "2", distributed.PROCESS_ID: "2", distributed.COORDINATOR: "127.0.0.1:1234"},
     [distributed.PROCESS_ID, "out of range"]),
    ({distributed.NUM_PROCESSES: "2", distributed.COORDINATOR: "127.0.0.1:1234"}, [distributed.PROCESS_ID]),
    ({distributed.NUM_PROCESSES: "2", distributed.PROCESS_ID: "1", distributed.COORDINATOR: "127.0.0.1"},
     [distributed.COORDINATOR, "host:port"]),
    ({distributed.COORDINATOR: "127.0.0.1:1234"}, [distributed.COORDINATOR, distributed.NUM_PROCESSES]),
    ({distributed.AUTO: "yes"}, [distributed.AUTO, "'auto'"]),
], ids=["count-not-integer", "no-coordinator", "id-out-of-range", "no-id", "no-port", "no-count", "auto-typo"])
def test_bad_distributed_settings_name_the_variable(tmp_path, capsys, monkeypatch, env, needles):
    """Refused before JAX is touched, so in-process: one error line, nothing created."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, _, err = run_cli(capsys, *PRETRAIN, "--run-dir", tmp_path / "run")
    assert_one_error(code, err, *needles)
    assert not (tmp_path / "run").exists()
