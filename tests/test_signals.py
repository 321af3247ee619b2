"""Stop signals (TERM, USR1) under the launchers: only the training process of each rank acts on them,
DataLoader workers survive them, and every rank finishes its step, writes one checkpoint and exits
well inside a launcher's 30 s grace; the run then resumes to exactly the result of an uninterrupted
one. SLURM's own paths (``scontrol requeue``, ``scancel --signal``) are in tests/test_submit.py.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from helpers import BIN, REPO, cpu_env, train_losses
from torch.utils.data import DataLoader, Dataset

from anchorformer.data.workers import init_worker
from anchorformer.dist.stop_signals import StopRequest


class _SlowNumbers(Dataset):
    """0..n-1, slowly enough that the workers are busy when the signals come."""

    def __len__(self) -> int:
        return 40

    def __getitem__(self, index: int) -> int:
        time.sleep(0.02)
        return index


def test_dataloader_workers_leave_stop_signals_to_the_training_process():
    batches = iter(DataLoader(_SlowNumbers(), batch_size=4, num_workers=2, worker_init_fn=init_worker))
    seen = [next(batches)]
    workers = [w.pid for w in batches._workers]
    # From another process, as SLURM and the launchers send them: the workers must ignore them.
    subprocess.run(["kill", "-TERM", *map(str, workers)], check=True)
    subprocess.run(["kill", "-USR1", *map(str, workers)], check=True)
    seen += list(batches)
    assert torch.cat(seen).tolist() == list(range(40))

    batches = iter(DataLoader(_SlowNumbers(), batch_size=4, num_workers=2, worker_init_fn=init_worker))
    next(batches)
    processes = list(batches._workers)
    for worker in processes:
        worker.terminate()  # TERM from the parent (a DataLoader ending a stuck worker) still ends it
    for worker in processes:
        worker.join(timeout=10)
    assert [w.exitcode for w in processes] == [0, 0]


def test_stop_request_keeps_a_signal_until_the_trainer_exists_then_forwards_each():
    previous = signal.getsignal(signal.SIGUSR1)
    calls: list[str] = []
    stop = StopRequest().install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)  # during start-up: no trainer yet
        assert [s for s, _ in stop.received] == [signal.SIGUSR1]
        stop.forward_to(lambda: calls.append("stop"))
        assert calls == ["stop"]
        os.kill(os.getpid(), signal.SIGTERM)
        assert calls == ["stop", "stop"] and stop.describe().startswith("SIGUSR1 ")
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGUSR1) == previous


# --------------------------------------------------------------------------------------------
# The launchers, 2 ranks x 2 DataLoader workers on CPU: TERM to the launcher mid-run.

MAX_STEPS = 30
SIGNAL_AFTER_STEP = 5
GRACE_S = 30  # what torchrun (--shutdown-timeout) and DeepSpeed's launcher wait before SIGKILL
TINY = ["configs/demo.yaml", "model.depth=1", "model.embed_dim=32", "model.num_heads=2",
        "model.num_anchors=4", "data.num_workers=2", "train.global_batch_size=32",
        "train.micro_batch_size=16", f"train.max_steps={MAX_STEPS}", "schedule.epochs=1", "schedule.warmup_epochs=0",
        "logging.every_steps=1", "logging.progress_bar=false"]
LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"],
    "deepspeed": [sys.executable, str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port"],
}


def _command(launcher: str, port: int, out: Path, cache: Path, name: str) -> list[str]:
    return [*LAUNCHERS[launcher], str(port), str(REPO / "launch" / "train.py"), *TINY, f"logging.output_dir={out}",
            f"logging.run_name={name}", f"data.cache_dir={cache}"]


def _start(command: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as sink:  # the child keeps its own descriptor
        return subprocess.Popen(command, cwd=REPO, env=cpu_env(OMP_NUM_THREADS="1"), stdout=sink,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _finish(process: subprocess.Popen, log: Path, timeout: float = 600) -> tuple[int, str]:
    """(exit status, output) of a launched run."""
    try:
        process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    return process.returncode, log.read_text()


def _eval_metrics(run_dir: Path) -> dict[str, float]:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == MAX_STEPS, summary
    return {k: v for k, v in summary["metrics"].items() if k.startswith("eval/")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, embedded_cache_dir) -> Path:
    """The run of the tests below, uninterrupted (torchrun, 2 ranks)."""
    out = tmp_path_factory.mktemp("reference")
    log = out / "reference.log"
    status, text = _finish(_start(_command("torchrun", 29590, out, embedded_cache_dir, "reference"), log), log)
    assert status == 0 and "completed: epoch" in text, text[-4000:]
    return out / "reference"


def _signal_target(launcher: str, process: subprocess.Popen) -> psutil.Process:
    """What a user (or the node's scheduler) signals: torchrun's agent; DeepSpeed's per-node
    launcher (``deepspeed.launcher.launch``, the parent of the ranks; the ``deepspeed`` command
    above it exits at once on TERM and leaves the ranks running, see docs/training.md)."""
    agent = psutil.Process(process.pid)
    if launcher == "torchrun":
        return agent
    return next(child for child in agent.children() if "deepspeed.launcher.launch" in " ".join(child.cmdline()))


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_term_to_the_launcher_checkpoints_every_rank_and_resumes_identically(launcher, reference, tmp_path,
                                                                              embedded_cache_dir, record_property):
    command = _command(launcher, 29591 if launcher == "torchrun" else 29592, tmp_path, embedded_cache_dir, "run")
    log = tmp_path / "interrupted.log"
    process = _start(command, log)
    deadline = time.monotonic() + 600
    while f"step {SIGNAL_AFTER_STEP}/{MAX_STEPS}" not in log.read_text():
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.05)
    target = _signal_target(launcher, process)
    ranks = target.children()  # the launcher starts the ranks, which start their loader workers
    assert len(ranks) == 2 and all(len(rank.children()) == 2 for rank in ranks), "2 ranks x 2 loader workers"
    latest = tmp_path / "run" / "checkpoints" / "latest"
    signalled = time.monotonic()
    target.send_signal(signal.SIGTERM)
    # More TERMs to the ranks while they agree and write (as SLURM adds its own): no effect.
    while not latest.exists() and time.monotonic() - signalled < GRACE_S:
        for rank in ranks:
            rank.send_signal(signal.SIGTERM)
        time.sleep(0.05)
    _, text = _finish(process, log)  # the launchers exit 1 after a signal, whatever the ranks did
    exited = time.monotonic() - signalled
    record_property("signal_to_exit_s", round(exited, 2))
    print(f"\n{launcher}: TERM -> launcher exit {exited:.1f} s")

    assert exited < GRACE_S, f"the ranks outlived the launcher's grace ({exited:.1f} s): it killed them"
    assert not any(rank.is_running() for rank in ranks)
    stopped = re.findall(r"\[rank (\d)\] anchorformer.engine.run: stopped at step (\d+) on (\S+)", text)
    assert sorted(rank for rank, _, _ in stopped) == ["0", "1"], text[-4000:]
    step = int(stopped[0][1])
    assert {int(s) for _, s, _ in stopped} == {step} and SIGNAL_AFTER_STEP <= step < MAX_STEPS
    assert not re.search(r"killed by signal|SIGKILL|exitcode", text), text[-4000:]
    # No rank failed; torchrun's agent reports its own signal with a traceback, by design.
    agent_report = f"SignalException: Process {target.pid} got signal: {int(signal.SIGTERM)}"
    assert text.count("Traceback") == (launcher == "torchrun") == (agent_report in text), text[-4000:]
    checkpoints = tmp_path / "run" / "checkpoints"
    assert latest.read_text().strip() == f"step_{step}"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", f"step_{step}"]  # one checkpoint
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "stopped"

    resume_log = tmp_path / "resumed.log"
    status, resumed = _finish(_start(command, resume_log), resume_log)
    assert status == 0 and "completed: epoch" in resumed, resumed[-4000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["resumed_from"].endswith(f"step_{step}")
    assert train_losses(tmp_path / "run") == pytest.approx(train_losses(reference), rel=1e-6)
    assert _eval_metrics(tmp_path / "run") == pytest.approx(_eval_metrics(reference), rel=1e-6)
