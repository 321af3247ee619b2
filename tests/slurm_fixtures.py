"""Following jobs on the local SLURM clusters of tests/slurm_cluster.py (imported explicitly): their
accounting records, the end of a job, a step in its log, releasing a requeued job, and comparing a
run's training with a reference run's; and the jobs the multi-node tests submit (the demo recipe
shrunk to seconds, through launch/submit.py on the login node).

Every SLURM command goes through ``cluster.run`` (a :class:`slurm_cluster.SlurmCluster`): on the
one-node cluster it runs here, on the multi-node one on its login node, with the cluster's
``SLURM_CONF`` either way.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
from helpers import REPO, train_losses
from slurm_cluster import NamespaceCluster, SlurmCluster

FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "PREEMPTED", "BOOT_FAIL", "DEADLINE"}
"""Job states after which SLURM runs the job no more (unless it is requeued)."""


def wait_until(what: str, probe: Callable[[], Any], timeout: float, interval: float = 1.0) -> Any:
    """Poll ``probe()`` until it returns something true, and return that; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def job_segments(cluster: SlurmCluster, job_id: str) -> list[tuple[str, str]]:
    """(state, node list) of every run of the job (one per requeue), oldest first."""
    out = cluster.run(["sacct", "-j", job_id, "-X", "-n", "-P", "--duplicates", "-o", "State,NodeList"]).stdout
    return [(state.split()[0], nodes) for state, nodes in
            (line.split("|") for line in out.splitlines() if line.strip())]


def sacct_states(cluster: SlurmCluster, job_id: str) -> list[str]:
    """Accounting states of the job (one per run of it, requeues included), oldest first."""
    return [state for state, _ in job_segments(cluster, job_id)]


def hostnames(cluster: SlurmCluster, node_list: str) -> list[str]:
    """``node[1,3]`` -> ``['node1', 'node3']``."""
    return cluster.run(["scontrol", "show", "hostnames", node_list]).stdout.split()


def job_report(cluster: SlurmCluster, job_id: str) -> str:
    """The job's state and pending reason as the controller sees it, and every node's state and
    reason: what a timeout's message needs to tell a job that never started from a slow one."""
    info = cluster.run(["scontrol", "show", "job", job_id], check=False).stdout
    fields = re.findall(r"\b(?:JobState|Reason|Restarts|NodeList|StartTime)=\S+", info)
    job = " ".join(fields) or "unknown to the controller"
    nodes = cluster.run(["sinfo", "-N", "-h", "-o", "%N %T %E"], check=False).stdout.strip()
    return f"job {job_id}: {job}; nodes: " + "; ".join(nodes.splitlines())


def restore_nodes(cluster: SlurmCluster, timeout: float = 90) -> dict[str, str]:
    """Wait until every node is usable again (a node a test cut off rejoins by itself); resume those
    SLURM still keeps down or drained after ``timeout`` and return their {node: "state reason"}."""
    def unusable() -> dict[str, str]:
        lines = cluster.run(["sinfo", "-N", "-h", "-o", "%N|%T|%E"], check=False).stdout.splitlines()
        return {node: f"{state} ({reason})" for node, state, reason in (line.split("|", 2) for line in lines)
                if not state.rstrip("*").startswith(("idle", "mixed", "allocated", "completing"))}
    deadline = time.monotonic() + timeout
    while (lost := unusable()) and time.monotonic() < deadline:
        time.sleep(1)
    for node in lost:
        cluster.run(["scontrol", "update", f"NodeName={node}", "State=RESUME"], check=False)
    return lost


def wait_for_end(cluster: SlurmCluster, job_id: str, log: Path, runs: int = 1, timeout: float = 600) -> str:
    """Wait until the ``runs``-th run of the job (``runs - 1`` requeues) reached a final state and
    return it; on timeout cancel the job and fail with its states and the end of ``log``.

    Both the controller and accounting must agree: accounting is written asynchronously, so just
    after a requeue its last record may still be the previous run's final state.
    """
    def final_state() -> str | None:
        info = cluster.run(["scontrol", "show", "job", job_id], check=False).stdout
        controller = re.search(r"JobState=(\S+)", info)  # None: the controller forgot the job (MinJobAge)
        if controller is not None and controller.group(1) not in FINAL_STATES:
            return None
        states = sacct_states(cluster, job_id)
        return states[-1] if len(states) >= runs and states[-1] in FINAL_STATES else None
    try:
        return wait_until(f"job {job_id} to finish", final_state, timeout)
    except AssertionError:
        states = sacct_states(cluster, job_id)
        report = job_report(cluster, job_id)
        cluster.run(["scancel", job_id], check=False)
        raise AssertionError(f"job {job_id} did not finish {runs} run(s) (states {states}); {report}; log {log}:\n"
                             f"{log.read_text()[-4000:] if log.exists() else '(none)'}") from None


def wait_for_step(cluster: SlurmCluster, job_id: str, log: Path, step: int, max_steps: int,
                  timeout: float = 600) -> None:
    """Wait until rank 0's log (``log``) of the job reports optimizer step ``step`` (of ``max_steps``)."""
    try:
        wait_until(f"step {step} in {log}", lambda: log.exists() and f"step {step}/{max_steps}" in log.read_text(),
                   timeout=timeout, interval=0.05)
    except AssertionError as error:
        raise AssertionError(f"{error}; {job_report(cluster, job_id)}") from None


def release_requeued(cluster: SlurmCluster, job_id: str, restarts: int = 1, timeout: float = 180) -> None:
    """Wait until the job was requeued for the ``restarts``-th time and no node still completes its
    last run, then lift SLURM's ~2 min hold (Reason=BeginTime) with ``scontrol update StartTime=now``
    (nothing to lift if the job started again by itself)."""
    def requeued() -> str | None:
        info = cluster.run(["scontrol", "show", "job", job_id], check=False).stdout
        state = re.search(r"JobState=(\S+)", info)
        if f"Restarts={restarts}" not in info or state is None:
            return None
        if state.group(1) == "RUNNING" or state.group(1) in FINAL_STATES:
            return "started"
        if state.group(1) != "PENDING":  # still ending its last run (COMPLETING, REQUEUED)
            return None
        completing = any(node.startswith("comp") for node in cluster.node_states().values())
        return None if completing else "pending"
    if wait_until(f"job {job_id} to be requeued", requeued, timeout=timeout, interval=0.2) == "started":
        return
    # slurmd revokes the old run's credential with a 1 s timestamp: a restart within that same
    # second is killed ("Job credential revoked"), which is what SLURM's hold guards against.
    time.sleep(2)
    lifted = cluster.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=False)
    # SLURM may have started it meanwhile (a node marked down frees the job's hold at once)
    assert lifted.returncode == 0 or "no longer pending" in lifted.stderr, lifted.stderr


def eval_metrics(run_dir: Path) -> dict[str, float]:
    """The final evaluation metrics in a run's summary.json."""
    summary = json.loads((run_dir / "summary.json").read_text())
    return {k: v for k, v in summary["metrics"].items() if k.startswith("eval/")}


def assert_same_training(run_dir: Path, reference_dir: Path, max_steps: int) -> None:
    """The run completed with the same loss at every step and the same final metrics as the reference."""
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == max_steps, summary
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, max_steps + 1))
    assert losses == pytest.approx(train_losses(reference_dir), rel=1e-6)
    assert eval_metrics(run_dir) == pytest.approx(eval_metrics(reference_dir), rel=1e-6)


# ---------------------------------------------------------------- jobs of the multi-node tests
MAX_STEPS = 30
"""Enough that a signal after step 3 arrives well before the end (steps take ~0.05 s)."""
# The demo recipe shrunk so that a job takes seconds: one 32-wide block, one loader worker per rank.
# The global batch of 24 splits over 2 and 3 ranks (micro-batch 4: 3 or 2 accumulation steps).
TINY = ["model.depth=1", "model.embed_dim=32", "model.num_heads=2", "model.num_anchors=4", "data.num_workers=1",
        "train.global_batch_size=24", "train.micro_batch_size=4", f"train.max_steps={MAX_STEPS}",
        "schedule.epochs=1", "schedule.warmup_epochs=0", "logging.every_steps=1", "logging.progress_bar=false"]
# Every rank computes alike wherever it runs: one thread each (the ranks share 2 cores), and the
# same anchor-mix kernel (auto would time the kernels in each process and may pick differently).
RANK_ENV = {"OMP_NUM_THREADS": "1", "ANCHORFORMER_ANCHOR_MIX": "torch"}


@dataclass(frozen=True)
class Run:
    """A job submitted for one run folder."""

    job_id: str
    run_dir: Path
    log: Path
    """Rank 0's log (or the batch script's output)."""


def job_overrides(workdir: Path, run_name: str) -> list[str]:
    """TINY, with the run folder ``workdir/runs/run_name`` and the dataset cache under ``workdir``."""
    return [*TINY, f"logging.output_dir={workdir / 'runs'}", f"logging.run_name={run_name}",
            f"data.cache_dir={workdir / 'cache'}"]


def submit(cluster: NamespaceCluster, workdir: Path, run_name: str, nodes: int, tasks_per_node: int = 1,
           *overrides: str) -> subprocess.Popen:
    """Start ``launch/submit.py`` on the login node (it prints the job id once submitted)."""
    command = [sys.executable, str(REPO / "launch" / "submit.py"), "--nodes", str(nodes),
               "--gpus-per-node", str(tasks_per_node), "--cpus-per-task", "1", "--no-exclusive", "--time", "20",
               "--signal-delay", "60", str(REPO / "configs" / "demo.yaml"), *job_overrides(workdir, run_name),
               *overrides]
    return subprocess.Popen(cluster.command(command), env={**cluster.env(), **RANK_ENV}, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def submitted(submission: subprocess.Popen, workdir: Path, run_name: str) -> Run:
    """The job that a :func:`submit` call submitted."""
    out, err = submission.communicate(timeout=600)
    assert submission.returncode == 0, f"submit failed:\n{out}{err}"
    job_id = out.split("submitted job ", 1)[1].split()[0]
    run_dir = workdir / "runs" / run_name
    return Run(job_id, run_dir, run_dir / "slurm" / f"{job_id}_0_log.err")


def submit_one(cluster: NamespaceCluster, workdir: Path, run_name: str, nodes: int, *overrides: str) -> Run:
    """Submit a job of ``nodes`` nodes, one rank each, and wait until SLURM took it."""
    return submitted(submit(cluster, workdir, run_name, nodes, 1, *overrides), workdir, run_name)
