"""One job at a time in a run folder: ``{run}/run.lock`` names the job that uses it.

The lock holds the SLURM job id (when there is one), the host, the pid and that process's start
time. Rank 0 takes it before the run writes anything; a second run on the folder is refused while
the holder lives, unless it is the same SLURM job requeued (same job id). A holder that is gone (a
SLURM job that ``squeue`` no longer lists as active, a pid of this host that is dead or was reused)
leaves a stale lock, which the next run takes over with a log line. ``launch/submit.py`` checks the
lock before ``sbatch`` and writes it for the submitted job, so a second submission is refused while
the first one waits in the queue.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from anchorformer.atomic import atomic_write_bytes
from anchorformer.config import ConfigError
from anchorformer.dist import slurm
from anchorformer.run_folder import RunFolder

__all__ = ["LockHolder", "RunFolderInUse", "check_free", "acquire", "release", "claim_for_job"]

logger = logging.getLogger(__name__)

_ACTIVE_SLURM_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED",
                        "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED"}
"""squeue states of a job that may still write to its run folder (COMPLETING: its processes are
still finishing, e.g. writing the checkpoint of a preemption)."""


class RunFolderInUse(ConfigError):
    """Another live job holds the run folder's lock."""


@dataclass(frozen=True)
class LockHolder:
    """Who uses a run folder."""

    host: str
    """Host name of the process that took the lock."""
    pid: Optional[int]
    """That process (None for a job submitted but not started yet)."""
    pid_started: Optional[int]
    """The process's start time in clock ticks since boot (/proc/PID/stat): a reused pid differs."""
    slurm_job_id: Optional[str]
    """SLURM job id; a requeued job keeps it and takes its own lock back."""
    since: str
    """When the lock was taken (local time, ISO 8601)."""

    @classmethod
    def this_process(cls) -> LockHolder:
        """The holder for this process (and its SLURM job, when it runs in one)."""
        return cls(host=socket.gethostname(), pid=os.getpid(), pid_started=_process_start(os.getpid()),
                   slurm_job_id=os.environ.get("SLURM_JOB_ID"), since=time.strftime("%Y-%m-%dT%H:%M:%S"))

    @classmethod
    def submitted_job(cls, job_id: str) -> LockHolder:
        """The holder for a SLURM job just submitted from this host."""
        return cls(host=socket.gethostname(), pid=None, pid_started=None, slurm_job_id=job_id,
                   since=time.strftime("%Y-%m-%dT%H:%M:%S"))

    def describe(self) -> str:
        """``SLURM job 42 (pid 7 on node1)`` or ``pid 7 on laptop``, with when it took the lock."""
        where = f"pid {self.pid} on {self.host}" if self.pid is not None else f"submitted from {self.host}"
        who = f"SLURM job {self.slurm_job_id} ({where})" if self.slurm_job_id else where
        return f"{who} since {self.since}"

    def same_job(self, other: LockHolder) -> bool:
        """Whether ``other`` is this job: the same SLURM job id, or the same live process."""
        if self.slurm_job_id or other.slurm_job_id:
            return self.slurm_job_id == other.slurm_job_id
        return (self.host, self.pid, self.pid_started) == (other.host, other.pid, other.pid_started)


def check_free(folder: RunFolder, me: Optional[LockHolder]) -> None:
    """Refuse when a live job other than ``me`` holds the lock of ``folder`` (reads only).

    Args:
        folder: the run folder.
        me: the job asking (its own lock, e.g. a requeued job's, is no obstacle); None: any
            live holder refuses (a submission).

    Raises:
        RunFolderInUse: naming the holder and what to do.
    """
    holder = _read(folder.lock)
    if holder is not None and not (me is not None and holder.same_job(me)):
        _refuse_if_alive(folder, holder)


def acquire(folder: RunFolder, me: Optional[LockHolder] = None) -> LockHolder:
    """Take the lock of ``folder`` (created if missing) for ``me``; rank 0 calls it.

    Returns:
        The holder written to the lock.

    Raises:
        RunFolderInUse: another live job holds it.
    """
    me = me if me is not None else LockHolder.this_process()
    folder.root.mkdir(parents=True, exist_ok=True)
    path = folder.lock
    candidate = path.with_name(f".{path.name}.{os.getpid()}.new")
    atomic_write_bytes(candidate, _encode(me))  # whole on disk before it can become the lock
    try:
        for _ in range(3):
            try:
                os.link(candidate, path)  # atomic and exclusive: of two runs starting at once, one wins
                return me
            except FileExistsError:
                holder = _read(path)
            if holder is not None and holder.same_job(me):
                os.replace(candidate, path)  # a requeued job takes its own lock back (new host, pid)
                return me
            if holder is not None:
                _refuse_if_alive(folder, holder)
            if _move_aside(path, holder):
                logger.warning("run folder %s: taking over the stale lock of %s (%s)", folder.root,
                               holder.describe() if holder else "an unreadable holder",
                               "that job is gone" if holder else "its file could not be parsed")
    finally:
        candidate.unlink(missing_ok=True)
    raise RunFolderInUse("logging.run_name", f"run folder {folder.root} is being locked by another run right "
                         "now; retry, or pick another logging.run_name")


def claim_for_job(folder: RunFolder, job_id: str) -> None:
    """Write the lock for a just-submitted SLURM job (``launch/submit.py``, after ``check_free``)."""
    folder.root.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder.lock, _encode(LockHolder.submitted_job(job_id)))


def release(folder: RunFolder, me: LockHolder) -> None:
    """Remove the lock of ``folder`` if ``me`` still holds it."""
    path = folder.lock
    holder = _read(path)
    if holder is not None and holder.same_job(me):
        path.unlink(missing_ok=True)


def _encode(holder: LockHolder) -> bytes:
    return (json.dumps(asdict(holder), indent=2) + "\n").encode()


def _read(path: Path) -> Optional[LockHolder]:
    """The holder written in the lock file; None when there is none (or it cannot be parsed)."""
    try:
        return LockHolder(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        logger.warning("unreadable run lock %s: treated as stale", path)
        return None


def _refuse_if_alive(folder: RunFolder, holder: LockHolder) -> None:
    activity = _activity(holder)
    if activity is None:
        return
    how = (f"wait for it to end or cancel it (scancel {holder.slurm_job_id})" if holder.slurm_job_id
           else "wait for it to end or stop it")
    raise RunFolderInUse(
        "logging.run_name",
        f"run folder {folder.root} is in use by {holder.describe()}, {activity}; {how}, or pick another "
        f"logging.run_name (delete {folder.lock} only if that run is gone)")


def _activity(holder: LockHolder) -> Optional[str]:
    """What the holder is doing (``SLURM state RUNNING``, ``alive``, ...), or None when it is gone."""
    if holder.slurm_job_id and shutil.which("squeue") is not None:
        state = _slurm_state(holder.slurm_job_id)
        return f"SLURM state {state}" if state is not None else None
    if holder.pid is None:
        return "a SLURM job that cannot be checked here (no squeue)"
    if holder.host != socket.gethostname():
        return f"on another host (cannot be checked from {socket.gethostname()})"
    started = _process_start(holder.pid)
    return "alive" if started is not None and started == holder.pid_started else None


def _slurm_state(job_id: str) -> Optional[str]:
    """The job's state while it may still write (pending, running, completing, ...); None once
    SLURM lists it as finished or no longer knows it."""
    try:
        state = slurm.job_state(job_id, timeout_s=30, finished_too=True)
    except slurm.SlurmUnanswered as error:
        return f"unknown ({error})"
    return state if state in _ACTIVE_SLURM_STATES else None


def _process_start(pid: int) -> Optional[int]:
    """Start time of ``pid`` in clock ticks since boot, or None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return None if fields[0] == "Z" else int(fields[19])  # field 22 of stat(5), after pid and comm


def _move_aside(path: Path, judged: Optional[LockHolder]) -> bool:
    """Rename the stale lock ``judged`` out of the way; False when another run changed it first."""
    aside = path.with_name(f".{path.name}.stale.{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    if _read(aside) != judged:  # replaced by a live run between our read and the rename: put it back
        os.replace(aside, path)
        return False
    aside.unlink()
    return True
