"""SIGTERM, what a Cloud TPU maintenance event sends: the run saves a checkpoint at the step
boundary, exits 143 with one line saying so, and relaunching the same command resumes exactly."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import NUM_DEVICES, REPO, cli_flags, run_cli_subprocess, tiny_run, train_losses

from genai_jax import stages
from genai_jax.train import PreemptionGuard

# Checkpoints only at the end: the one at the preempted step must come from the preemption.
CFG = tiny_run(train={"max_steps": 400, "ckpt_every": 1000, "sample_tokens": 0, "strategy": "single"})
MESSAGE = re.compile(r"genai-jax: preempted at step (\d+): checkpoint saved in (.+); "
                     r"relaunch the same command to resume")


def test_guard_turns_sigterm_into_a_flag_and_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert not guard.requested
        signal.raise_signal(signal.SIGTERM)
        assert guard.requested
    assert signal.getsignal(signal.SIGTERM) is before


def wait_for_train_steps(run_dir, process, count: int, timeout: float = 180) -> None:
    """Until metrics.jsonl holds `count` train records (counted as text: a line may be half written)."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1]
        if metrics.exists() and metrics.read_text().count('"loss"') >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {count} train steps in {timeout} s")


@pytest.mark.slow  # a stage in a subprocess, stopped and relaunched
def test_sigterm_saves_exits_143_and_the_relaunch_resumes_exactly(tmp_path):
    run_dir = tmp_path / "run"
    argv = ["pretrain", *cli_flags(CFG), "--run-dir", str(run_dir)]
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={NUM_DEVICES}", JAX_PLATFORMS="cpu")
    process = subprocess.Popen([sys.executable, "-m", "genai_jax.cli", *argv], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_train_steps(run_dir, process, 3)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()

    assert process.returncode == 143, stderr
    assert "Traceback" not in stderr, stderr
    (line,) = [line for line in stderr.splitlines() if line.startswith("genai-jax:")]
    match = MESSAGE.fullmatch(line)
    assert match, line
    step = int(match[1])
    assert 3 <= step < CFG.train.max_steps
    assert match[2] == str((run_dir / "checkpoints").absolute())
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == [step]
    assert sorted(train_losses(run_dir)) == list(range(1, step + 1))

    relaunched = run_cli_subprocess(*argv)
    assert relaunched.returncode == 0, relaunched.stderr
    stages.pretrain(CFG, tmp_path / "straight")
    resumed, straight = train_losses(run_dir), train_losses(tmp_path / "straight")
    assert sorted(straight) == list(range(1, CFG.train.max_steps + 1))
    assert resumed == straight
