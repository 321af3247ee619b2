"""Failures at scale (issue 22): a crashed, frozen or cut-off rank ends, the job requeues itself and
resumes with no person involved, a failure that repeats at the same step stops, stragglers are
named.

Fast tests drive the watchdog, the failures ledger and the straggler monitor in this process. The
slow ones train the demo recipe shrunk to seconds (``tests/test_multinode.py``'s TINY, 60 steps,
a checkpoint every 4): under torchrun with ``--max-restarts`` on this machine, and on the 3-node
SLURM of network namespaces (``multinode_cluster``), where they kill, freeze (SIGSTOP) or cut off
(``ip link set eth0 down`` in its namespace) one rank's process or node mid-run and compare the
end with the uninterrupted run. Each prints its timeline (seconds after the failure).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

import pytest
from helpers import BIN, REPO, cpu_env
from slurm_cluster import NamespaceCluster, alive
from slurm_fixtures import (
    RANK_ENV, Run, assert_same_training, job_overrides, job_report, job_segments, release_requeued, sacct_states,
    submit, submitted, wait_for_end, wait_for_step, wait_until,
)

from anchorformer.config import ConfigError, load
from anchorformer.config.schema import HealthConfig
from anchorformer.dist import DistEnv
from anchorformer.engine.failures import EX_TEMPFAIL, Failure, FailureLedger
from anchorformer.engine.metrics import TensorBoardLogger
from anchorformer.engine.stragglers import StragglerMonitor
from anchorformer.engine.watchdog import Watchdog
from anchorformer.run_folder import RunFolder

MAX_STEPS = 60
"""A few seconds of training: time to find a rank's process after step 5 and fail it mid-run."""
HANG_TIMEOUT_S = 10
"""The hang limit of the slow tests (a loaded 2-core machine must not take that long for a step)."""
FAILING = [f"train.max_steps={MAX_STEPS}", "checkpoint.every_steps=4", f"health.hang_timeout_s={HANG_TIMEOUT_S}"]


def _env(rank: int = 0, world_size: int = 1) -> DistEnv:
    return DistEnv(rank, world_size, rank, world_size, "127.0.0.1", 29500, "single", "gloo")


def _started(watchdog: Watchdog) -> list[int]:
    """Start ``watchdog`` with a fake exit; the list collects the statuses it exits with."""
    exits: list[int] = []
    watchdog._exit_process = exits.append
    watchdog.start()
    return exits


# ---------------------------------------------------------------------------- watchdog, ledger, stragglers

def test_the_watchdog_waits_for_the_first_step_then_ends_a_hung_run(tmp_path):
    folder = RunFolder(tmp_path)
    reported: list[Failure] = []
    watchdog = Watchdog(HealthConfig(hang_timeout_s=0.5), _env(), folder, attempt="start0")
    watchdog.on_hang = reported.append
    exits = _started(watchdog)
    try:
        time.sleep(1.5)  # a slow first step (compilation, a large first batch) is no hang
        assert exits == [] and watchdog.limit_s() is None
        watchdog.beat(1)
        wait_until("the watchdog to end the run", lambda: exits, timeout=10, interval=0.05)
    finally:
        watchdog.stop()
    assert exits == [EX_TEMPFAIL]
    [failure] = reported
    assert (failure.kind, failure.step, failure.rank, failure.attempt) == ("hang", 1, 0, "start0")
    assert "no optimizer step" in failure.reason and "after step 1" in failure.reason
    assert FailureLedger(folder).read() == [failure]
    stacks = folder.hang_stacks("start0", 0).read_text()
    assert "after step 1" in stacks and "hang-watchdog" not in stacks  # faulthandler names no threads
    assert "test_the_watchdog_waits_for_the_first_step" in stacks  # the main thread's stack, where it waits
    beat = json.loads(folder.heartbeat(0).read_text())
    assert (beat["rank"], beat["step"], beat["attempt"]) == (0, 1, "start0")


def test_a_process_that_was_stopped_and_continued_is_not_hung(tmp_path):
    offset = [0.0]
    watchdog = Watchdog(HealthConfig(hang_timeout_s=0.5), _env(), RunFolder(tmp_path), attempt="a",
                        clock=lambda: time.monotonic() + offset[0])
    exits = _started(watchdog)
    try:
        watchdog.beat(1)
        offset[0] += 60  # the whole process stood still for a minute (SIGSTOP, then SIGCONT)
        time.sleep(0.35)
        assert exits == []
        wait_until("the watchdog to end the run", lambda: exits, timeout=10, interval=0.05)  # no step since
    finally:
        watchdog.stop()


def test_the_derived_hang_limit_follows_the_step_time_above_its_floor(tmp_path):
    now = [0.0]
    watchdog = Watchdog(HealthConfig(hang_floor_s=30, hang_steps=50), _env(), RunFolder(tmp_path), attempt="a",
                        clock=lambda: now[0])
    assert watchdog.limit_s() is None  # not armed before the first step
    watchdog.beat(1)
    assert watchdog.limit_s() == 30  # one step: no step time yet, the floor
    for step in range(2, 12):
        now[0] += 0.2
        watchdog.beat(step)
    assert watchdog.limit_s() == 30  # 50 x 0.2 s < the floor
    for step in range(12, 80):
        now[0] += 2.0
        watchdog.beat(step)
    assert watchdog.limit_s() == pytest.approx(100.0)  # 50 x the step time of the last steps
    with watchdog.excused("evaluation"):
        now[0] += 500
    now[0] += 2.0
    watchdog.beat(80)  # the evaluation is no step time
    assert watchdog.limit_s() == pytest.approx(100.0)
    off = Watchdog(HealthConfig(hang_timeout_s=-1), _env(), RunFolder(tmp_path), attempt="a")
    off.beat(1)
    assert off.limit_s() is None


def test_an_evaluation_is_not_timed_unless_a_peer_stopped_answering(tmp_path):
    folder = RunFolder(tmp_path)
    peer = {"rank": 1, "host": "node2", "pid": 4242, "attempt": "a", "step": 3}
    folder.heartbeats.mkdir(parents=True)

    def peer_beats(age_s: float) -> None:
        folder.heartbeat(1).write_text(json.dumps({**peer, "time": time.time() - age_s}))

    peer_beats(0)
    watchdog = Watchdog(HealthConfig(hang_timeout_s=0.5), _env(0, 2), folder, attempt="a")
    exits = _started(watchdog)
    try:
        watchdog.beat(3)
        with watchdog.excused("evaluation"):
            for _ in range(15):  # 1.5 s of a long evaluation, the peer alive
                peer_beats(0)
                time.sleep(0.1)
            assert exits == []
            peer_beats(60)  # the peer froze
            wait_until("the watchdog to end the run", lambda: exits, timeout=10, interval=0.05)
    finally:
        watchdog.stop()
    [failure] = FailureLedger(folder).read()
    assert "evaluation in progress" in failure.reason
    assert "ranks that stopped answering: 1 (node2, pid 4242, silent for 60 s, at step 3)" in failure.reason


def test_a_checkpoint_write_ends_when_every_rank_waits_in_a_collective(tmp_path):
    folder = RunFolder(tmp_path)
    folder.heartbeats.mkdir(parents=True)
    # A blocking torch.distributed call as the watchdog sees it: a frame of distributed_c10d.py waiting in C.
    collective: dict = {"time": time}
    exec(compile("def barrier(seconds):\n    time.sleep(seconds)\n",
                 "/site-packages/torch/distributed/distributed_c10d.py", "exec"), collective)
    peer_waits = [0.0]  # the peer, alive: its heartbeat every 0.1 s
    peer = _PeerHeartbeat(folder, lambda: {"rank": 1, "host": "node2", "pid": 4242, "attempt": "a", "step": 3,
                                           "gap_s": 0.1, "time": time.time(), "waiting_s": peer_waits[0]})
    watchdog = Watchdog(HealthConfig(hang_timeout_s=0.5), _env(0, 2), folder, attempt="a")
    exits = _started(watchdog)
    try:
        watchdog.beat(3)
        with watchdog.excused("checkpoint"):
            time.sleep(1.5)  # writing a slow checkpoint, the peer at work: no hang
            assert exits == []
            peer_waits[0] = 5.0
            collective["barrier"](3)  # both ranks wait in a collective, alive: a partition or a deadlock
    finally:
        watchdog.stop()
        peer.stop()
    assert exits == [EX_TEMPFAIL]
    [failure] = FailureLedger(folder).read()
    assert "checkpoint in progress" in failure.reason and "every one waiting in a collective" in failure.reason


class _PeerHeartbeat:
    """Another rank's heartbeat, rewritten every 0.1 s from ``beat()`` until :meth:`stop`."""

    def __init__(self, folder: RunFolder, beat):
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._write, args=(folder, beat), daemon=True)
        self._thread.start()

    def _write(self, folder: RunFolder, beat) -> None:
        while not self._stopped.is_set():
            folder.heartbeat(beat()["rank"]).write_text(json.dumps(beat()))
            time.sleep(0.1)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()


def _failure(attempt: str, kind: str, step: int, rank: int = 0, at: str = "2026-01-01T00:00:00.000",
             action: str = "") -> Failure:
    return Failure(attempt, kind, f"{kind} at {step}", step, rank, f"node{rank + 1}", at, action)


def test_a_failure_repeats_when_the_start_before_failed_at_the_same_step(tmp_path):
    ledger = FailureLedger(RunFolder(tmp_path))
    first = _failure("slurm7.0", "crash", 12, at="2026-01-01T00:00:01.000")
    ledger.record(first)
    ledger.record(_failure("slurm7.0", "crash", 12, rank=1, at="2026-01-01T00:00:01.500"))
    assert ledger.repeated(_failure("slurm7.1", "crash", 13, at="2026-01-01T00:01:00.000")) is None  # progress
    assert ledger.repeated(_failure("slurm7.1", "hang", 12, at="2026-01-01T00:01:00.000")) == first
    # a stop (time limit) in between is no failure: the crash before it still counts
    ledger.record(_failure("slurm7.1", "stop", 20, at="2026-01-01T00:02:00.000", action="requeued"))
    assert ledger.repeated(_failure("slurm7.2", "crash", 12, at="2026-01-01T00:03:00.000")) == first
    # the same start's other ranks are no earlier start
    assert ledger.repeated(_failure("slurm7.0", "crash", 12, rank=2, at="2026-01-01T00:00:02.000")) is None


def test_the_requeue_history_has_one_entry_per_start(tmp_path):
    ledger = FailureLedger(RunFolder(tmp_path))
    ledger.record(_failure("slurm7.0", "crash", 12, rank=0, at="2026-01-01T00:00:01.000"))
    ledger.record(_failure("slurm7.0", "crash", 12, rank=2, at="2026-01-01T00:00:01.200", action="requeued"))
    ledger.record(_failure("slurm7.1", "stop", 30, at="2026-01-01T00:05:00.000", action="requeued"))
    (RunFolder(tmp_path).failures / "garbled_rank0.json").write_text("{")
    history = ledger.history()
    assert [(e["attempt"], e["kind"], e["step"], e["rank"], e["action"], e["reports"]) for e in history] == [
        ("slurm7.0", "crash", 12, 2, "requeued", 2), ("slurm7.1", "stop", 30, 0, "requeued", 1)]


def test_a_rank_persistently_slower_than_the_median_is_named(tmp_path, caplog):
    import torch

    monitor = StragglerMonitor(HealthConfig(straggler_ratio=1.5, straggler_patience=3), torch.nn.Linear(2, 2),
                               accumulation=1, device=torch.device("cpu"),
                               tensorboard=TensorBoardLogger(tmp_path, enabled=False), is_main=True)
    fast, slow = (0.10, "node1"), (0.16, "node2")  # 1.6x the faster: the low median of two ranks
    with caplog.at_level(logging.INFO, logger="anchorformer.engine.stragglers"):
        scalars = [monitor.judge([fast, slow, fast], step) for step in (50, 100)]
        assert not caplog.records  # twice is not yet persistent
        scalars.append(monitor.judge([fast, slow, fast], 150))
        monitor.judge([fast, (0.12, "node2"), fast], 200)
    assert scalars[-1] == {"perf/step_time_median_s": 0.10, "perf/step_time_max_s": 0.16,
                           "perf/step_time_slowest_rank": 1.0}
    warning, recovered = caplog.records
    assert warning.levelno == logging.WARNING and "rank 1 (node2)" in warning.message
    assert "1.6x the ranks' median" in warning.message and "3 log intervals" in warning.message
    assert "no longer straggles at step 200" in recovered.message
    assert monitor.judge([fast, slow], 250)["perf/step_time_median_s"] == 0.10  # of two, the faster


def test_the_straggler_monitor_times_training_forwards_only(tmp_path):
    import torch

    model = torch.nn.Linear(4, 4)
    monitor = StragglerMonitor(HealthConfig(), model, accumulation=2, device=torch.device("cpu"),
                               tensorboard=TensorBoardLogger(tmp_path, enabled=False), is_main=True)
    for _ in range(4):  # two steps of two micro-batches
        model(torch.ones(3, 4))
    model.eval()
    model(torch.ones(3, 4))
    busy = monitor.summary(data_wait_s=0.5, step=2)["perf/step_time_median_s"]
    assert 0.5 < busy < 0.6  # the data wait plus two tiny forwards per step


@pytest.mark.parametrize("key, value", [("hang_timeout_s", -2), ("hang_floor_s", 0), ("hang_steps", 0.5),
                                        ("collective_timeout_s", 0), ("straggler_ratio", 1.0),
                                        ("straggler_patience", 0)])
def test_bad_health_values_are_refused_naming_the_key(key: str, value: float):
    with pytest.raises(ConfigError, match=f"health.{key}"):
        load(REPO / "configs" / "demo.yaml", [f"health.{key}={value}"])


# ---------------------------------------------------------------------------- processes of a run

def _parent(pid: int) -> Optional[int]:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _environ(pid: int) -> dict[str, str]:
    try:
        text = Path(f"/proc/{pid}/environ").read_text()
    except OSError:
        return {}
    return dict(line.split("=", 1) for line in text.split("\0") if "=" in line)


def _children(pid: int) -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _parent(int(p.name)) == pid]


def _slurm_task(cluster: NamespaceCluster, job_id: str, rank: int) -> tuple[str, int]:
    """(node, pid) of the training process of rank ``rank`` of SLURM job ``job_id``: the python task
    that slurmstepd started (not the batch script, not its loader workers)."""
    def launched_by_slurm(pid: int) -> bool:
        try:
            return (Path(f"/proc/{pid}/comm").read_text().startswith("python")
                    and Path(f"/proc/{_parent(pid)}/comm").read_text().strip() == "slurmstepd")
        except OSError:
            return False
    [found] = [(node, pid) for node in cluster.node_names() for pid in cluster.processes(node)
               if _environ(pid).get("SLURM_JOB_ID") == job_id and _environ(pid).get("SLURM_PROCID") == str(rank)
               and launched_by_slurm(pid)]
    return found


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Run folders and the dataset cache of this module's runs (on the filesystem every node sees)."""
    return tmp_path_factory.mktemp("failures")


def _torchrun(workdir: Path, run_name: str, *options: str) -> subprocess.Popen:
    """2 ranks of the shrunk demo recipe under torchrun on this machine."""
    command = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", *options,
               str(REPO / "launch" / "train.py"), str(REPO / "configs" / "demo.yaml"),
               *job_overrides(workdir, run_name), *FAILING]
    return subprocess.Popen(command, cwd=REPO, env=cpu_env(**RANK_ENV), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def reference(deepspeed_ops_built, workdir: Path) -> Path:
    """The run folder of 2 ranks trained without interruption (torchrun: the same ranks as 2 SLURM
    tasks on 1 or 2 nodes)."""
    run = _torchrun(workdir, "reference")
    out, _ = run.communicate(timeout=600)
    assert run.returncode == 0, out[-5000:]
    return workdir / "runs" / "reference"


# ---------------------------------------------------------------------------- torchrun on one box

@pytest.mark.slow
def test_torchrun_restarts_its_group_after_a_rank_is_killed_and_the_run_resumes(reference, workdir: Path):
    run = _torchrun(workdir, "torchrun_restart", "--max-restarts=1", "--monitor-interval=1")
    lines: list[str] = []
    try:
        for line in run.stdout:
            lines.append(line)
            if f"step 5/{MAX_STEPS}" in line:  # after the checkpoint of step 4
                break
        [rank1] = [pid for pid in _children(run.pid) if _environ(pid).get("RANK") == "1"]  # not its loader worker
        os.kill(rank1, signal.SIGKILL)
        killed = time.monotonic()
        lines += run.stdout.readlines()
        run.wait(timeout=600)
    finally:
        run.kill()
    log = "".join(lines)
    assert run.returncode == 0, log[-5000:]
    print(f"\ntorchrun: rank 1 killed; the group restarted, resumed and completed {time.monotonic() - killed:.1f} s "
          "later")
    assert "resumed from" in log and log.count("process group up") == 2, log[-3000:]
    run_dir = workdir / "runs" / "torchrun_restart"
    [entry] = json.loads((run_dir / "summary.json").read_text())["requeues"]
    assert entry["kind"] == "crash" and entry["attempt"].endswith(".0") and entry["step"] >= 4, entry
    assert_same_training(run_dir, reference, MAX_STEPS)


# ---------------------------------------------------------------------------- SLURM: 3 nodes, each a network namespace

class Timeline:
    """Seconds from a failure to what followed it, printed at the end of a test."""

    def __init__(self, what: str):
        self.what, self.start, self.events = what, time.monotonic(), {}

    def mark(self, event: str) -> float:
        self.events[event] = time.monotonic() - self.start
        return self.events[event]

    def __str__(self) -> str:
        return f"{self.what}: " + ", ".join(f"{event} +{seconds:.1f} s" for event, seconds in self.events.items())


def _submit_failing(cluster: NamespaceCluster, workdir: Path, run_name: str, nodes: int, *overrides: str) -> Run:
    """A job of ``nodes`` nodes, one rank each, of the shrunk recipe with a short hang limit."""
    return submitted(submit(cluster, workdir, run_name, nodes, 1, *FAILING, *overrides), workdir, run_name)


def _requeued(cluster: NamespaceCluster, run: Run, timeline: Timeline) -> None:
    """Wait until the job requeued itself, lift SLURM's hold, and wait until it trains again."""
    wait_until("the job to requeue itself", lambda: "Restarts=1" in cluster.run(
        ["scontrol", "show", "job", run.job_id]).stdout, timeout=120, interval=0.2)
    timeline.mark("requeued")
    release_requeued(cluster, run.job_id)
    timeline.mark("hold released")
    try:
        wait_until("the requeued job to resume", lambda: "resumed from" in run.log.read_text(), timeout=300,
                   interval=0.2)
    except AssertionError as error:
        raise AssertionError(f"{error}; {job_report(cluster, run.job_id)}") from None
    timeline.mark("training again")


def _only_entry(run: Run) -> dict:
    """The one requeue of the run's summary.json."""
    [entry] = json.loads((run.run_dir / "summary.json").read_text())["requeues"]
    return entry


@pytest.mark.slow
@pytest.mark.usefixtures("nodes_back")
def test_a_crashed_rank_requeues_the_job_which_resumes_to_the_same_result(multinode_cluster, reference, workdir,
                                                                          repeated):
    # (``repeated``: that job runs meanwhile)
    run = _submit_failing(multinode_cluster, workdir, "crash", 2)
    wait_for_step(multinode_cluster, run.job_id, run.log, 5, MAX_STEPS)  # after the checkpoint of step 4
    node, pid = _slurm_task(multinode_cluster, run.job_id, 1)
    os.kill(pid, signal.SIGKILL)  # the training process alone: its node lives on
    timeline = Timeline(f"rank 1 killed on {node}")
    _requeued(multinode_cluster, run, timeline)
    assert wait_for_end(multinode_cluster, run.job_id, run.log, runs=2) == "COMPLETED"
    timeline.mark("completed")
    print(f"\n{timeline}")
    assert sacct_states(multinode_cluster, run.job_id) == ["REQUEUED", "COMPLETED"]
    entry = _only_entry(run)
    assert (entry["kind"], entry["action"], entry["attempt"]) == ("crash", "requeued", f"slurm{run.job_id}.0"), entry
    assert "Connection" in entry["reason"] and entry["step"] >= 4, entry
    assert_same_training(run.run_dir, reference, MAX_STEPS)


def _wait_for_exits(pids: dict[int, str], timeline: Timeline, limit_s: float) -> None:
    """Wait until every process of ``pids`` ({pid: rank and node}) ended; each must within ``limit_s``."""
    for pid, who in pids.items():
        wait_until(f"{who} to exit", lambda: not alive(pid), timeout=limit_s + 60, interval=0.1)
        assert timeline.mark(f"{who} exited") <= limit_s, timeline


@pytest.mark.slow
@pytest.mark.usefixtures("nodes_back")
def test_a_frozen_rank_ends_every_survivor_and_the_job_resumes(multinode_cluster, workdir):
    run = _submit_failing(multinode_cluster, workdir, "frozen", 3)
    wait_for_step(multinode_cluster, run.job_id, run.log, 5, MAX_STEPS)
    tasks = {rank: _slurm_task(multinode_cluster, run.job_id, rank) for rank in range(3)}
    frozen_node, frozen = tasks[1]
    os.kill(frozen, signal.SIGSTOP)  # connections stay open; SLURM sees nothing
    timeline = Timeline(f"rank 1 frozen on {frozen_node}")
    try:
        _wait_for_exits({pid: f"rank {rank} ({node})" for rank, (node, pid) in tasks.items() if rank != 1},
                        timeline, HANG_TIMEOUT_S + 30)
        _requeued(multinode_cluster, run, timeline)
        assert not alive(frozen)  # SLURM ended it with the job
        assert wait_for_end(multinode_cluster, run.job_id, run.log, runs=2) == "COMPLETED"
        timeline.mark("completed")
    finally:
        if alive(frozen):
            os.kill(frozen, signal.SIGKILL)
    print(f"\n{timeline}")
    for rank in (0, 2):
        stacks = (run.run_dir / "hang" / f"slurm{run.job_id}.0_rank{rank}.txt").read_text()
        assert "no optimizer step" in stacks and "most recent call first" in stacks
    entry = _only_entry(run)
    assert (entry["kind"], entry["action"]) == ("hang", "requeued"), entry
    assert f"ranks that stopped answering: 1 ({frozen_node}" in entry["reason"], entry
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == MAX_STEPS


@pytest.fixture(scope="module")
def repeated(multinode_cluster, deepspeed_ops_built, workdir: Path) -> Iterator[tuple[Run, threading.Thread,
                                                                                     Timeline]]:
    """A job whose every start fails at step 0 (its nodes name an anchor-mix backend that does not
    exist), submitted early so that it runs beside the tests before its own; a thread lifts SLURM's
    hold once the job requeued itself."""
    run = _submit_failing(multinode_cluster, workdir, "repeated", 2,
                          'slurm.setup=["export ANCHORFORMER_ANCHOR_MIX=bogus"]')
    timeline = Timeline("a job with a deterministic bug submitted")

    def release() -> None:
        wait_until("the job to requeue itself", lambda: "Restarts=1" in multinode_cluster.run(
            ["scontrol", "show", "job", run.job_id]).stdout, timeout=600, interval=0.2)
        timeline.mark("requeued")
        release_requeued(multinode_cluster, run.job_id)
    releaser = threading.Thread(target=release, daemon=True)
    releaser.start()
    yield run, releaser, timeline
    multinode_cluster.run(["scancel", run.job_id], check=False)


@pytest.mark.slow
@pytest.mark.usefixtures("nodes_back")
def test_a_failure_repeating_at_the_same_step_stops_the_job_with_one_error(multinode_cluster, repeated):
    run, releaser, timeline = repeated
    releaser.join(timeout=600)
    assert wait_for_end(multinode_cluster, run.job_id, run.log, runs=2) == "FAILED"
    timeline.mark("failed")
    print(f"\n{timeline}")
    assert sacct_states(multinode_cluster, run.job_id) == ["REQUEUED", "FAILED"]
    log = run.log.read_text()
    assert "RunFailed: the run failed at step 0 in two starts in a row" in log, log[-3000:]
    assert "unknown anchor-mix backend 'bogus'" in log
    actions = {(f.attempt, f.action) for f in FailureLedger(RunFolder(run.run_dir)).read()}
    assert (f"slurm{run.job_id}.0", "requeued") in actions and (f"slurm{run.job_id}.1", "not requeued") in actions


@pytest.mark.slow
@pytest.mark.usefixtures("nodes_back")
def test_a_node_cut_off_the_network_ends_its_ranks_and_the_job_resumes_elsewhere(multinode_cluster, reference,
                                                                                 workdir):
    run = _submit_failing(multinode_cluster, workdir, "cut_off", 2)
    wait_for_step(multinode_cluster, run.job_id, run.log, 5, MAX_STEPS)
    tasks = {rank: _slurm_task(multinode_cluster, run.job_id, rank) for rank in range(2)}
    cut_node = tasks[1][0]
    link = ["ip", "-n", multinode_cluster.namespace(cut_node), "link", "set", "eth0"]
    subprocess.run([*link, "down"], check=True)  # silently: no connection is closed
    timeline = Timeline(f"{cut_node}'s network down")
    try:
        _wait_for_exits({pid: f"rank {rank} ({node})" for rank, (node, pid) in tasks.items()}, timeline,
                        HANG_TIMEOUT_S + 30)
        _requeued(multinode_cluster, run, timeline)
        # (accounting may keep no record of the first run: it ended while its node was unreachable)
        assert wait_for_end(multinode_cluster, run.job_id, run.log) == "COMPLETED"
        timeline.mark("completed")
    finally:
        subprocess.run([*link, "up"], check=True)
    print(f"\n{timeline}")
    segments = job_segments(multinode_cluster, run.job_id)
    assert cut_node not in segments[-1][1], segments
    for rank in (0, 1):  # the cut-off rank hung too, and wrote to the shared run folder
        assert (run.run_dir / "hang" / f"slurm{run.job_id}.0_rank{rank}.txt").is_file()
    entry = _only_entry(run)
    assert entry["kind"] == "hang" and entry["action"] in ("requeued", "left to SLURM"), entry
    assert_same_training(run.run_dir, reference, MAX_STEPS)
    wait_until(f"{cut_node} to rejoin", lambda: multinode_cluster.node_states().get(cut_node, "").startswith(
        ("idle", "mix", "alloc")), timeout=120, interval=0.5)
