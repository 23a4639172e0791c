"""Launching a sweep's runs: each is its saved command in a subprocess of the ordinary CLI, with
its output in a log file and its state in a status file beside its run directory.

    DIR/CELL/seed=S/              the run directory (--run-dir): what the command writes
    DIR/CELL/seed=S.log           its stdout and stderr, every launch appended
    DIR/CELL/seed=S.status.json   running / done / failed / interrupted, exit status, error line,
                                  launches, wall seconds, host and process id

The log and status sit beside the run directory rather than in it: a stage refuses to start in a
directory that holds files but no config.json. Nothing here imports JAX or initialises a backend:
the parent process must leave every accelerator to the runs.
"""

from __future__ import annotations

import glob
import json
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

from genai_jax import completion
from genai_jax.config import UserError
from genai_jax.overrides import PIPELINE_STAGES
from genai_jax.sweeps.spec import Run

SUMMARY_FILE = "summary.json"  # the pipeline's (genai_jax.pipeline.SUMMARY_FILE; not imported: it loads JAX)
INTERRUPTED_CODES = (130, 143, -signal.SIGINT, -signal.SIGTERM)
LOG_MARK = "==> genai-jax sweep:"
TPU_BOUNDS = {1: "1,1,1", 2: "1,2,1", 4: "2,2,1"}
"""TPU_CHIPS_PER_PROCESS_BOUNDS of a process that gets 1, 2 or 4 chips of one TPU VM."""


def log_path(sweep_dir: str, name: str) -> str:
    return os.path.join(sweep_dir, name + ".log")


def status_path(sweep_dir: str, name: str) -> str:
    return os.path.join(sweep_dir, name + ".status.json")


def read_status(sweep_dir: str, name: str) -> dict:
    path = status_path(sweep_dir, name)
    try:
        with open(path) as file:
            return json.load(file)
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError:
        return {"status": "interrupted", "error": f"{path} is not valid JSON"}


def write_status(sweep_dir: str, name: str, status: dict) -> None:
    path = status_path(sweep_dir, name)
    partial = f"{path}.{os.getpid()}.tmp"
    with open(partial, "w") as file:
        json.dump(status, file, indent=1)
    os.replace(partial, path)


def finished(command: str, run_dir: str) -> bool:
    """A stage: `completion.finished`, as the pipeline tests its stages. The pipeline: each of its
    stages, and summary.json."""
    if command != "pipeline":
        return completion.finished(run_dir)
    return (os.path.exists(os.path.join(run_dir, SUMMARY_FILE))
            and all(completion.finished(os.path.join(run_dir, stage)) for stage in PIPELINE_STAGES))


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:  # (os.kill(0, ...) would ask about the process group)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def effective_status(sweep_dir: str, record: dict) -> str:
    """pending, running, done, failed, interrupted, or incomplete (it exited 0 but is no longer
    finished: its final checkpoint or normalisation is gone). A run marked running by a process of
    this host that has died is interrupted."""
    status = read_status(sweep_dir, record["name"])
    state = status.get("status")
    run_dir = os.path.join(sweep_dir, record["name"])
    if state is None:
        return "interrupted" if os.path.exists(run_dir) else "pending"
    if state == "done":
        return "done" if finished(record["subcommand"], run_dir) else "incomplete"
    if state == "running" and status.get("host") == socket.gethostname() and not _alive(status.get("pid")):
        return "interrupted"
    return state


def started(sweep_dir: str, record: dict) -> bool:
    """Whether a recorded run has begun: its command made its run directory, or it is done or running."""
    status = read_status(sweep_dir, record["name"]).get("status")
    return os.path.exists(os.path.join(sweep_dir, record["name"])) or status in ("done", "running")


BOX = "╭╮╰╯│─"


def last_error(text: str) -> str:
    """The `genai-jax: error: ...` line of a run's output, else the title and first paragraph of
    tyro's boxed message (a bad flag value), else its last line."""
    lines = [part.strip() for line in text.splitlines() for part in line.split("\r")
             if part.strip() and not line.startswith(LOG_MARK)]
    errors = [line for line in lines if line.startswith("genai-jax: error:")]
    if errors:
        return errors[-1]
    boxes = [i for i, line in enumerate(lines) if line.startswith("╭─")]
    if boxes:
        title, body = lines[boxes[-1]].strip(BOX + " "), []
        for line in lines[boxes[-1] + 1:]:
            inner = line.strip("│ ")
            if not inner or not inner.strip(BOX + " "):
                break
            body.append(inner)
        return f"{title}: {' '.join(body)}"
    return lines[-1] if lines else ""


@dataclass(frozen=True)
class Share:
    """What one of N parallel jobs may use: environment variables and, on a CPU, the cores."""

    env: dict[str, str]
    cpus: tuple[int, ...] = ()

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in self.env.items()]
        if self.cpus:
            parts.append(f"cpus {','.join(map(str, self.cpus))}")
        return " ".join(parts)


def visible_gpus(environ: dict, nvidia_smi: str | None = None) -> list[str]:
    """The GPUs this process may use, without JAX: CUDA_VISIBLE_DEVICES when set, else the lines
    of `nvidia-smi -L` (or its given output)."""
    if "CUDA_VISIBLE_DEVICES" in environ:
        ids = [part.strip() for part in environ["CUDA_VISIBLE_DEVICES"].split(",") if part.strip()]
        return [] if ids in ([], ["-1"]) else ids
    if nvidia_smi is None:
        if shutil.which("nvidia-smi") is None:
            return []
        try:
            nvidia_smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30,
                                        check=False).stdout
        except (OSError, subprocess.SubprocessError):
            return []
    return [str(i) for i, _ in enumerate(line for line in nvidia_smi.splitlines() if line.startswith("GPU "))]


def tpu_chips() -> int:
    """TPU chips on this VM, counted from their device files (/dev/accel* or /dev/vfio/N)."""
    return len(glob.glob("/dev/accel*")) or len(glob.glob("/dev/vfio/[0-9]*"))


def device_shares(jobs: int, environ: dict, gpus: list[str], chips: int, cpus: list[int]) -> tuple[list[Share], str]:
    """Disjoint shares of this machine for `jobs` runs at a time, and a line saying what they are.

    GPUs: CUDA_VISIBLE_DEVICES, len(gpus) // jobs each. TPU chips: the Cloud TPU variables for
    independent processes on one VM (TPU_VISIBLE_CHIPS, TPU_CHIPS_PER_PROCESS_BOUNDS,
    TPU_PROCESS_BOUNDS, a TPU_MESH_CONTROLLER port each) for 1, 2 or 4 chips per job. CPU (or
    JAX_PLATFORMS=cpu): len(cpus) // jobs cores each, as the process's CPU affinity (XLA sizes its
    thread pools by it) and OMP/OpenBLAS/MKL thread counts for the numpy side."""
    if jobs == 1:
        return [Share({})], "one run at a time, with every device"
    platform = environ.get("JAX_PLATFORMS", "").split(",")[0].strip()
    if gpus and platform in ("", "cuda", "gpu"):
        if jobs > len(gpus):
            raise UserError(f"--jobs {jobs}: only {len(gpus)} GPU(s) visible ({','.join(gpus)}); "
                            f"use --jobs {len(gpus)} or fewer")
        each = len(gpus) // jobs
        shares = [Share({"CUDA_VISIBLE_DEVICES": ",".join(gpus[i * each:(i + 1) * each])}) for i in range(jobs)]
        unused = len(gpus) - each * jobs
        return shares, f"{jobs} runs at a time, {each} GPU(s) each" + (f" ({unused} left unused)" if unused else "")
    if chips and platform in ("", "tpu"):
        each = chips // jobs
        if each not in TPU_BOUNDS:
            raise UserError(f"--jobs {jobs}: {chips} TPU chips do not split into shares of 1, 2 or 4 chips")
        shares = []
        for i in range(jobs):
            port = str(8476 + i)
            chips_i = ",".join(str(c) for c in range(i * each, (i + 1) * each))
            shares.append(Share({"TPU_VISIBLE_CHIPS": chips_i, "TPU_VISIBLE_DEVICES": chips_i,
                                 "TPU_CHIPS_PER_PROCESS_BOUNDS": TPU_BOUNDS[each], "TPU_PROCESS_BOUNDS": "1,1,1",
                                 "TPU_MESH_CONTROLLER_ADDRESS": f"localhost:{port}", "TPU_MESH_CONTROLLER_PORT": port}))
        return shares, f"{jobs} runs at a time, {each} TPU chip(s) each"
    cpus = sorted(cpus)
    if jobs > len(cpus):
        groups = [(cpus[i % len(cpus)],) for i in range(jobs)]
        note = f"{jobs} runs at a time on {len(cpus)} core(s): some share a core"
    else:
        each = len(cpus) // jobs
        groups = [tuple(cpus[i * each:(i + 1) * each]) for i in range(jobs)]
        note = f"{jobs} runs at a time, {each} CPU core(s) each"
    threads = {name: str(len(groups[0])) for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    return [Share(dict(threads), group) for group in groups], note


def machine_shares(jobs: int) -> tuple[list[Share], str]:
    """`device_shares` of this machine."""
    environ = dict(os.environ)
    gpus = visible_gpus(environ) if jobs > 1 else []
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    return device_shares(jobs, environ, gpus, tpu_chips() if jobs > 1 and not gpus else 0, cpus)


@dataclass
class Job:
    run: Run
    process: subprocess.Popen
    slot: int
    started: float
    log_offset: int
    status: dict


class Progress:
    """One line per run started or finished: done, failed and left, and the mean time per run."""

    def __init__(self, total: int, done: int):
        self.total, self.done, self.failed, self.times = total, done, 0, []

    def line(self, verb: str, run: Run, detail: str = "") -> str:
        mean = f"{statistics.mean(self.times):.1f} s/run" if self.times else "-"
        left = self.total - self.done - self.failed
        return (f"sweep: {verb} [{run.index}] {run.name}{detail} "
                f"(done {self.done}, failed {self.failed}, left {left}, mean {mean})")


def _launch(run: Run, sweep_dir: str, share: Share, slot: int) -> Job:
    name = run.name
    os.makedirs(os.path.dirname(log_path(sweep_dir, name)), exist_ok=True)
    previous = read_status(sweep_dir, name)
    argv = run.argv(sweep_dir)
    env = dict(os.environ, PYTHONUNBUFFERED="1", **share.env)
    launches = previous.get("launches", 0) + 1
    with open(log_path(sweep_dir, name), "ab") as log:
        offset = log.tell()
        where = f" with {share.describe()}" if share.describe() else ""
        log.write(f"{LOG_MARK} launch {launches} of run {run.index} on {socket.gethostname()} at "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}{where}\n{LOG_MARK} {shlex.join(argv)}\n".encode())
        log.flush()
        # the child's CPU affinity, set before it starts (the parent runs no threads); Linux only
        cpus = share.cpus if hasattr(os, "sched_setaffinity") else ()
        process = subprocess.Popen(
            [sys.executable, "-m", "genai_jax.cli", *argv[1:]], stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, env=env, start_new_session=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    status = {"status": "running", "index": run.index, "launches": launches, "wall_s": previous.get("wall_s", 0.0),
              "host": socket.gethostname(), "pid": process.pid, "share": share.describe(),
              "started_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_status(sweep_dir, name, status)
    return Job(run, process, slot, time.monotonic(), offset, status)


def _finish(job: Job, sweep_dir: str, stopping: bool) -> str:
    """Record a job's end; returns done, failed or interrupted."""
    code = job.process.returncode
    elapsed = time.monotonic() - job.started
    with open(log_path(sweep_dir, job.run.name), "rb") as log:
        log.seek(job.log_offset)
        text = log.read().decode(errors="replace")
    error = ""
    if code == 0 and finished(job.run.command, job.run.run_dir(sweep_dir)):
        state = "done"
    elif code == 0:
        state, error = "failed", "exited 0 unfinished (no final checkpoint or normalisation)"
    elif code in INTERRUPTED_CODES or (stopping and code < 0):
        state = "interrupted"
    else:
        state = "failed"
        error = last_error(text) or (f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}")
    write_status(sweep_dir, job.run.name, dict(job.status, status=state, returncode=code, error=error,
                                               wall_s=job.status["wall_s"] + elapsed,
                                               finished_at=time.strftime("%Y-%m-%dT%H:%M:%S")))
    return state


def execute(runs: list[Run], records: dict[int, dict], sweep_dir: str, shares: list[Share], say=print) -> int:
    """Run every run of `runs` that is not done (nor running elsewhere, checked again as each run
    is launched), len(shares) at a time.
    Returns the number of failed runs, or 128 + the signal number when SIGINT or SIGTERM stopped
    the sweep (the running commands get SIGTERM: they checkpoint and exit; rerun to resume)."""
    states = {run.index: effective_status(sweep_dir, records[run.index]) for run in runs}
    for run in runs:
        if states[run.index] == "running":
            status = read_status(sweep_dir, run.name)
            say(f"sweep: [{run.index}] {run.name} is running (host {status.get('host')}, "
                f"pid {status.get('pid')}): left alone")
    queue = [run for run in runs if states[run.index] not in ("done", "running")]
    progress = Progress(len(runs), sum(state == "done" for state in states.values()))
    say(f"sweep: {len(runs)} run(s): {progress.done} already done, {len(queue)} to run")
    free = list(range(len(shares)))
    active: dict[int, Job] = {}
    stop: list[int] = []

    def on_signal(signum, frame):
        stop.append(signum)
        for job in active.values():
            job.process.send_signal(signal.SIGTERM if len(stop) == 1 else signal.SIGKILL)

    previous = {}
    if sys.platform != "win32":
        try:
            previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:  # not the main thread: no handlers
            previous = {}
    failed = 0
    try:
        while queue or active:
            while queue and free and not stop:
                run = queue.pop(0)
                now = effective_status(sweep_dir, records[run.index])
                if now in ("done", "running"):  # another launcher (host, array task) took it meanwhile
                    progress.done += now == "done"
                    say(f"sweep: [{run.index}] {run.name} is {now} elsewhere: left alone")
                    continue
                job = _launch(run, sweep_dir, shares[free[0]], free.pop(0))
                active[job.slot] = job
                say(progress.line("started", run))
            for slot, job in list(active.items()):
                if job.process.poll() is None:
                    continue
                del active[slot]
                free.append(slot)
                state = _finish(job, sweep_dir, bool(stop))
                elapsed = time.monotonic() - job.started
                if state == "done":
                    progress.done += 1
                    progress.times.append(elapsed)
                    say(progress.line("finished", job.run, f" in {elapsed:.1f} s"))
                elif state == "failed":
                    progress.failed += 1
                    failed += 1
                    progress.times.append(elapsed)
                    error = read_status(sweep_dir, job.run.name).get("error", "")
                    say(progress.line("FAILED", job.run, f" after {elapsed:.1f} s: {error} "
                                                         f"[log: {log_path(sweep_dir, job.run.name)}]"))
                else:
                    say(progress.line("interrupted", job.run, f" after {elapsed:.1f} s"))
            if stop:
                queue.clear()
            if active:
                time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stop:
        say(f"sweep: stopped by {signal.Signals(stop[0]).name}; run the same command to resume")
        return 128 + stop[0]
    return failed
