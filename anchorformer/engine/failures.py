"""The failures ledger: why each start of a run ended early, one JSON record per start and rank in
``{run}/failures/`` (``RunFolder.failure_record``).

A start (an *attempt*) is one launch of the job's processes: a SLURM job and each of its requeues,
each restart of torchrun's group. A rank writes its record when an exception ends its training (a
peer's death reaches the survivors as one: gloo's "Connection closed by peer"), when the hang
watchdog ends it, or when a stop signal made the job requeue itself; the dead or frozen rank writes
nothing. Each rank writes only its own file, atomically, so ranks on many nodes never race. The
records give summary.json its requeue history and let a SLURM job refuse to loop on a failure
that repeats at the same step.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from typing import Callable, Literal, Optional

from anchorformer import dist
from anchorformer.atomic import atomic_write_bytes
from anchorformer.run_folder import RunFolder

__all__ = ["EX_TEMPFAIL", "Failure", "FailureHook", "FailureLedger", "current_attempt"]

logger = logging.getLogger(__name__)

EX_TEMPFAIL = 75
"""Exit status of a rank that ended on a failure a restart may not meet again (sysexits.h: "try
again later"); torchrun restarts its group on any non-zero status."""

Kind = Literal["crash", "hang", "stop"]


@dataclass(frozen=True)
class Failure:
    """Why one rank's part of one start ended early."""

    attempt: str
    """The start it ended (:func:`current_attempt`)."""
    kind: Kind
    """crash: an exception on this rank; hang: the watchdog saw no step for too long; stop: a stop
    signal (time limit, preemption) after which the job requeued itself."""
    reason: str
    """One line: the exception, the hang and the ranks that stopped answering, or the signal."""
    step: int
    """Optimizer steps done when it happened (the step a resumed run must get past)."""
    rank: int
    host: str
    time: str
    """Local time, ISO 8601 to the millisecond."""
    action: str = ""
    """What followed: 'requeued', 'left to SLURM', 'not requeued: ...'; '' while undecided."""

    @classmethod
    def now(cls, attempt: str, kind: Kind, reason: str, step: int, rank: int) -> Failure:
        """A failure of this process, happening now."""
        return cls(attempt, kind, " ".join(reason.split())[:1000], step, rank, socket.gethostname(),
                   datetime.now().isoformat(timespec="milliseconds"))

    def describe(self) -> str:
        return f"{self.kind} at step {self.step} on rank {self.rank} ({self.host}): {self.reason}"


FailureHook = Callable[[Failure], None]
"""Told of a failure this rank recorded (``engine.run_training(on_failure=...)``), from the thread
that noticed it: the main thread after an exception, the watchdog's thread after a hang."""


class FailureLedger:
    """The run folder's failure records (see the module docstring)."""

    def __init__(self, folder: RunFolder):
        self.folder = folder

    def record(self, failure: Failure) -> None:
        """Write (or rewrite, once its action is decided) this rank's record of a start."""
        path = self.folder.failure_record(failure.attempt, failure.rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(asdict(failure), indent=2).encode())

    def read(self) -> list[Failure]:
        """Every record, oldest first (an unreadable one is skipped with a warning)."""
        known = {f.name for f in fields(Failure)}
        records = []
        for path in sorted(self.folder.failures.glob("*_rank*.json")):
            try:
                records.append(Failure(**{k: v for k, v in json.loads(path.read_text()).items() if k in known}))
            except (OSError, ValueError, TypeError) as error:
                logger.warning("skipping unreadable failure record %s: %s", path, error)
        return sorted(records, key=lambda r: (r.time, r.attempt, r.rank))

    def repeated(self, failure: Failure) -> Optional[Failure]:
        """The failure of the latest earlier start, if that start failed (crash or hang) at the same
        step as ``failure``: no progress in between, so a restart would most likely fail again."""
        earlier = [r for r in self.read() if r.attempt != failure.attempt and r.kind != "stop"
                   and r.time <= failure.time]
        if not earlier:
            return None
        last = [r for r in earlier if r.attempt == earlier[-1].attempt]
        return next((r for r in last if r.step == failure.step), None)

    def history(self) -> list[dict[str, object]]:
        """One entry per start that ended early, oldest first (summary.json's ``requeues``): the
        record of the rank that requeued the job, else a hang's over a crash's (a peer's death
        reaches the others as a crash), else the lowest rank's; ``reports`` counts the ranks that
        wrote one."""
        by_attempt: dict[str, list[Failure]] = {}
        for record in self.read():
            by_attempt.setdefault(record.attempt, []).append(record)
        entries = []
        for records in by_attempt.values():
            chosen = min(records, key=lambda r: (r.action != "requeued", r.kind == "crash", r.rank))
            entries.append({**asdict(chosen), "reports": len(records)})
        return sorted(entries, key=lambda e: str(e["time"]))


def current_attempt(agree: bool = True) -> str:
    """This start's id, the same on every rank: the launcher's (SLURM job id and restart count,
    torchrun's run id and restart count), else rank 0's host, pid and start time.

    Args:
        agree: broadcast rank 0's id when the launcher names none (a collective: every rank
            calls it); False gives this process's own id (no process group needed).
    """
    launcher = dist.launch_attempt()
    if launcher is not None:
        return launcher
    own = f"{time.strftime('%Y%m%dT%H%M%S')}-{socket.gethostname()}-{os.getpid()}"
    return dist.broadcast_object(own) if agree else own
