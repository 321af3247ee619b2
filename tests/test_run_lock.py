"""The run folder's lock: one live job per run folder, the same SLURM job requeued takes its own lock
back, and the lock of a dead local process is taken over with a log line."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, cpu_env

from anchorformer.engine import run_lock
from anchorformer.engine.run_lock import LockHolder, RunFolderInUse
from anchorformer.run_folder import RunFolder


def _holder_of(process: subprocess.Popen) -> LockHolder:
    """The lock holder a run in ``process`` would write."""
    me = LockHolder.this_process()
    return dataclasses.replace(me, pid=process.pid, pid_started=run_lock._process_start(process.pid),
                               slurm_job_id=None)


def _write_lock(run_dir: Path, holder: LockHolder) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    RunFolder(run_dir).lock.write_text(json.dumps(dataclasses.asdict(holder)))


def test_a_live_run_keeps_the_folder_and_its_end_frees_it(tmp_path: Path):
    run_dir = tmp_path / "run"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(run_dir, _holder_of(other))
        with pytest.raises(RunFolderInUse, match=rf"logging.run_name.*in use by pid {other.pid} .*alive"):
            run_lock.check_free(RunFolder(run_dir), LockHolder.this_process())
        with pytest.raises(RunFolderInUse, match="pick another logging.run_name"):
            run_lock.acquire(RunFolder(run_dir))
    finally:
        other.kill()
        other.wait()
    mine = run_lock.acquire(RunFolder(run_dir))  # its holder is gone now: a stale lock
    assert json.loads(RunFolder(run_dir).lock.read_text())["pid"] == mine.pid
    run_lock.release(RunFolder(run_dir), mine)
    assert not RunFolder(run_dir).lock.exists() and sorted(p.name for p in run_dir.iterdir()) == []


def test_the_stale_lock_of_a_dead_process_is_taken_over_with_a_log_line(tmp_path: Path, caplog):
    run_dir = tmp_path / "run"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    holder = _holder_of(gone)
    gone.wait()
    _write_lock(run_dir, holder)
    run_lock.check_free(RunFolder(run_dir), None)  # a dead holder is no obstacle, not even to a submission
    with caplog.at_level("WARNING", logger="anchorformer.engine.run_lock"):
        run_lock.acquire(RunFolder(run_dir))
    assert f"taking over the stale lock of pid {gone.pid}" in caplog.text


def test_the_same_slurm_job_requeued_takes_its_own_lock_back(tmp_path: Path):
    run_dir = tmp_path / "run"
    run_lock.claim_for_job(RunFolder(run_dir), "4242")  # what launch/submit.py writes after sbatch
    job_before = dataclasses.replace(LockHolder.this_process(), slurm_job_id="4242")
    run_lock.check_free(RunFolder(run_dir), job_before)
    taken = run_lock.acquire(RunFolder(run_dir), job_before)
    assert json.loads(RunFolder(run_dir).lock.read_text())["pid"] == taken.pid
    requeued = dataclasses.replace(job_before, pid=taken.pid + 1, since="later")
    assert run_lock.acquire(RunFolder(run_dir), requeued) == requeued


def test_launch_train_refuses_a_folder_a_live_run_holds_with_one_line(tmp_path: Path):
    run_dir = tmp_path / "runs" / "busy"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        _write_lock(run_dir, _holder_of(other))
        done = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "configs/demo.yaml",
                               f"logging.output_dir={tmp_path / 'runs'}", "logging.run_name=busy",
                               f"data.cache_dir={tmp_path / 'cache'}"],
                              cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)
    finally:
        other.kill()
        other.wait()
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(errors) == 1 and "Traceback" not in done.stderr
    assert f"config key 'logging.run_name': run folder {run_dir} is in use by pid {other.pid}" in errors[0]
    assert sorted(p.name for p in run_dir.iterdir()) == [RunFolder(run_dir).lock.name]  # nothing else was written
