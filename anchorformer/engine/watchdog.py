"""The hang watchdog: a daemon thread that ends a run whose optimizer step stopped advancing.

A rank whose peer froze (SIGSTOP, a dead GPU, a node that lost its network without closing its
connections) waits inside a collective with no error and no log line until the collective timeout
(``health.collective_timeout_s``, 30 min by default). The watchdog ends that wait much sooner:

- It is armed by the first completed step (a slow first step, compilation or a large first batch,
  is not a hang), and times the gaps between steps from then on. The limit is
  ``health.hang_timeout_s``, or by default ``max(hang_floor_s, hang_steps x the measured step
  time)``.
- Meanwhile a second thread writes this rank's heartbeat (``RunFolder.heartbeat``: host, pid, step,
  time) twenty times per limit (at most every 5 s). A frozen process's heartbeat goes stale; a live
  one stuck in a collective keeps writing.
- Evaluations and checkpoint writes take as long as they take (:meth:`Watchdog.excused`): past the
  limit, the run is ended there only when a peer's heartbeat went stale (it froze or died), when
  every rank has been waiting in the same torch.distributed call for half the limit (nobody works:
  a partition or a deadlock; the heartbeat says how long its rank has been waiting), or once the
  collective timeout has passed too (a write stuck on a hung file system). A rank writing a slow
  checkpoint is not waiting, so its peers at the barrier are no hang. Waits outside
  torch.distributed's Python calls (a CUDA synchronisation after an NCCL collective, DeepSpeed
  waiting on a handle) do not count: there the collective timeout bounds them.
- When it ends the run, every rank that still runs writes the Python stacks of all its threads
  (faulthandler) to ``RUN/hang/``, logs the ranks whose heartbeat went stale (with their hosts),
  records the hang in the failures ledger, calls the hang hook (a SLURM job requeues itself
  there) and leaves with ``os._exit(EX_TEMPFAIL)``: the main thread, stuck in the collective,
  cannot be interrupted, and torchrun restarts its group on the non-zero status.

What a partition looks like: when the ranks cannot reach each other but every one of them still
writes to the shared run folder, no heartbeat goes stale; every rank reports the hang with the
same step and the log says that all ranks are alive and waiting in a collective (a partition or a
deadlock). On most clusters a node that loses its network loses the shared file system with it, and its heartbeat
goes stale like a frozen rank's. Heartbeat ages compare wall clocks of different hosts: they must
agree to within a fraction of the limit (NTP does).
"""
from __future__ import annotations

import contextlib
import faulthandler
import json
import logging
import os
import socket
import sys
import threading
import time
from collections import deque
from pathlib import Path
from types import FrameType
from typing import Callable, Iterator, Optional

from anchorformer.atomic import atomic_output, atomic_write_bytes
from anchorformer.config.schema import HealthConfig
from anchorformer.dist import DistEnv
from anchorformer.engine.failures import EX_TEMPFAIL, Failure, FailureHook, FailureLedger, current_attempt
from anchorformer.run_folder import RunFolder

__all__ = ["Watchdog"]

logger = logging.getLogger(__name__)

_HOOK_BUDGET_S = 20.0
"""How long the hang hook may take (a requeue asks SLURM, which a partitioned node cannot reach);
the process exits when it returns or after this long."""
_GRACE_MAX_S = 6.0
"""The most the hook waits for the other ranks to notice the same hang (see ``_end_hung_run``)."""
_EXIT_BUDGET_S = 28.0
"""The process is gone this long after the hang was noticed, whatever blocks (a hung file system
under the stacks or the ledger): faulthandler's own timer ends it then."""
_WINDOW_STEPS = 64
"""Steps over which the step time is measured (a rate: log and checkpoint steps average out)."""


class Watchdog:
    """Ends the run when no optimizer step completes for too long (see the module docstring).

    Args:
        health: the ``health`` config section (limits).
        env: this rank's place in the job.
        folder: the run folder (heartbeats, stacks, the failures ledger).
        attempt: this start's id (default :func:`failures.current_attempt`, a collective when
            the launcher names none: every rank builds its watchdog at the same point).
        clock: monotonic seconds (tests pass a fake).
        exit_process: called with the exit status after a hang (tests pass a fake).
    """

    def __init__(self, health: HealthConfig, env: DistEnv, folder: RunFolder, attempt: Optional[str] = None,
                 clock: Callable[[], float] = time.monotonic, exit_process: Callable[[int], None] = os._exit):
        self.health, self.env, self.folder = health, env, folder
        self.attempt = current_attempt() if attempt is None else attempt
        self.on_hang: Optional[FailureHook] = None
        """Told of the recorded hang before the process exits (``run_training``'s ``on_failure``)."""
        self._clock, self._exit_process = clock, exit_process
        self._host = socket.gethostname()
        self._step = 0
        self._last_beat: Optional[float] = None  # None: not armed (no step completed yet)
        self._window: deque[tuple[float, int]] = deque(maxlen=_WINDOW_STEPS)
        self._step_time: Optional[float] = None
        self._excused: Optional[str] = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._trainer_thread: Optional[int] = None  # the thread that runs the steps (start()'s caller)
        self._waiting: tuple[Optional[FrameType], float] = (None, 0.0)  # its torch.distributed call, since when

    # ------------------------------------------------------------------ main thread
    def __enter__(self) -> Watchdog:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start watching and writing heartbeats (a no-op with ``health.hang_timeout_s=-1``).

        Two threads: a heartbeat write that blocks (a hung file system) must not stop the watch.
        """
        if self.health.hang_timeout_s < 0 or self._threads:
            return
        self._trainer_thread = threading.get_ident()
        self._stop.clear()
        self._threads = [threading.Thread(target=target, name=name, daemon=True) for target, name in
                         ((self._watch, "hang-watchdog"), (self._beat_on_disk, "hang-heartbeat"))]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop both threads (the run ended by itself)."""
        self._stop.set()
        for thread in self._threads:
            thread.join()
        self._threads = []

    def beat(self, step: int) -> None:
        """Optimizer step ``step`` completed (its outcome is on the host)."""
        now = self._clock()
        self._window.append((now, step))
        (first_at, first_step), (last_at, last_step) = self._window[0], self._window[-1]
        if last_step > first_step:
            self._step_time = (last_at - first_at) / (last_step - first_step)
        self._step, self._last_beat = step, now

    @contextlib.contextmanager
    def excused(self, what: str) -> Iterator[None]:
        """Do not time ``what`` (an evaluation, a checkpoint write) as a step: its length has nothing
        to do with a step's. Past the limit it ends only when a peer stopped answering or every rank
        waits in a collective (see the module docstring). The clock restarts after it."""
        self._excused = what
        try:
            yield
        finally:
            self._excused = None
            self._window.clear()  # the gap is no step time
            if self._last_beat is not None:
                self._last_beat = self._clock()

    def limit_s(self) -> Optional[float]:
        """Seconds without a step after which the run is ended; None until the first step, or
        with the watchdog off."""
        if self.health.hang_timeout_s < 0:
            return None
        if self.health.hang_timeout_s > 0:
            return self.health.hang_timeout_s if self._last_beat is not None else None
        if self._step_time is None:
            return None if self._last_beat is None else self.health.hang_floor_s
        return max(self.health.hang_floor_s, self.health.hang_steps * self._step_time)

    # ------------------------------------------------------------------ watchdog thread
    def _interval_s(self) -> float:
        """Seconds between two looks (and heartbeats): a twentieth of the limit (the derived one's
        floor before the first step), 0.2 to 5 s."""
        # (hang_timeout_s is never -1 here: the watchdog off starts no thread that asks)
        limit = self.limit_s() or self.health.hang_timeout_s or self.health.hang_floor_s
        return min(max(limit / 20, 0.2), 5.0)

    def _watch(self) -> None:
        looked = self._clock()
        while not self._stop.wait(self._interval_s()):
            limit, last, phase = self.limit_s(), self._last_beat, self._excused
            now, interval = self._clock(), self._interval_s()
            late, looked = now - looked - interval, now
            if limit is None or last is None:
                continue
            if late > self._stale_after(limit):
                # This whole process stood still (SIGSTOP and SIGCONT, a paused VM): not a hang of
                # the run, and its peers' own watchdogs judge whether they waited for it too long.
                logger.warning("rank %d was stopped for %.0f s; the hang watchdog restarts its clock",
                               self.env.rank, late)
                self._last_beat = last = last + late
            silent = now - last
            if silent <= limit:
                continue
            stale_after = self._stale_after(limit)
            stale, alive, least_wait = self._peers(stale_after)
            if (phase is None or stale or least_wait > stale_after
                    or silent > max(limit, self.health.collective_timeout_s)):
                self._end_hung_run(silent, limit, phase, stale, alive, least_wait)
                return

    def _stale_after(self, limit: float) -> float:
        """Seconds after which a peer's heartbeat counts as stale: half the limit (a peer that froze
        just after this rank's last step is that stale when the limit passes), at least 3 writes."""
        return max(3 * self._interval_s(), limit / 2)

    def _beat_on_disk(self) -> None:
        """This rank's heartbeat, rewritten every interval while the process runs; ``gap_s`` is the
        time since the previous one (a process that was stopped and continued shows its silence)."""
        previous = time.time()
        while True:
            now = time.time()
            beat = {"rank": self.env.rank, "host": self._host, "pid": os.getpid(), "attempt": self.attempt,
                    "step": self._step, "time": now, "gap_s": now - previous, "waiting_s": self._waiting_s(now)}
            previous = now
            try:
                self.folder.heartbeats.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(self.folder.heartbeat(self.env.rank), json.dumps(beat).encode())
            except OSError as error:  # a full or vanished file system must not end the run
                logger.warning("cannot write the heartbeat: %s", error)
            if self._stop.wait(self._interval_s()):
                return

    def _waiting_s(self, now: float) -> float:
        """How long the trainer's thread has been blocked in one torch.distributed call (0: not in
        one). A call is one frame object: while this holds it, a later call cannot be it."""
        frame = sys._current_frames().get(self._trainer_thread or -1)
        inside = frame is not None and frame.f_code.co_filename.endswith("distributed_c10d.py")
        waited, since = self._waiting
        if not inside:
            self._waiting = (None, 0.0)
            return 0.0
        if frame is not waited:
            self._waiting = (frame, now)
            return 0.0
        return now - since

    def _end_hung_run(self, silent: float, limit: float, phase: Optional[str], stale: list[str],
                      alive: int, least_wait: float) -> None:
        """Stacks, the silent ranks, the ledger, the hook, exit (whatever fails on the way)."""
        faulthandler.dump_traceback_later(_EXIT_BUDGET_S, exit=True)  # the deadline, whatever blocks below
        try:
            try:
                where = f"stacks in {self._write_stacks(silent, limit)}"
            except OSError as error:
                faulthandler.dump_traceback(sys.stderr, all_threads=True)
                where = f"stacks on stderr ({error})"
            during = f", {phase} in progress" if phase else ""
            if stale:
                peers = f"ranks that stopped answering: {', '.join(stale)}"
            else:
                waits = (f"every one waiting in a collective for {least_wait:.0f} s or more" if least_wait
                         else "none advancing")
                peers = (f"every rank's heartbeat is fresh ({alive} alive, {waits}): a network partition between "
                         "the ranks or a deadlock, see the stacks")
            reason = (f"no optimizer step for {silent:.3g} s after step {self._step}{during} (limit {limit:.3g} s); "
                      f"{peers}")
            logger.error("hang on rank %d (%s): %s; %s", self.env.rank, self._host, reason, where)
            failure = Failure.now(self.attempt, "hang", reason, self._step, self.env.rank)
            try:
                FailureLedger(self.folder).record(failure)
            except OSError as error:
                logger.error("cannot record the hang in the failures ledger: %s", error)
            if self.on_hang is not None:
                # The other ranks notice the same hang within a look and a step of this one. Let them write
                # their stacks first: the hook's requeue ends the frozen rank, and that ends them with an error.
                time.sleep(min(2 * self._interval_s() + (self._step_time or 0.0), _GRACE_MAX_S))
                hook = threading.Thread(target=self.on_hang, args=(failure,), name="hang-hook", daemon=True)
                hook.start()
                hook.join(_HOOK_BUDGET_S)
                if hook.is_alive():
                    logger.error("the hang hook did not return within %.0f s; exiting without it", _HOOK_BUDGET_S)
        finally:
            for handler in logging.getLogger().handlers:
                handler.flush()
            sys.stderr.flush()
            self._exit_process(EX_TEMPFAIL)
            faulthandler.cancel_dump_traceback_later()  # reached only when exit_process returns (a test's fake)

    def _write_stacks(self, silent: float, limit: float) -> Path:
        path = self.folder.hang_stacks(self.attempt, self.env.rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as tmp, open(tmp, "w") as out:
            out.write(f"rank {self.env.rank} of {self.env.world_size} on {self._host}, pid {os.getpid()}: no optimizer "
                      f"step for {silent:.1f} s after step {self._step} (limit {limit:.1f} s)\n\n")
            out.flush()
            faulthandler.dump_traceback(out, all_threads=True)
        return path

    def _peers(self, stale_after: float) -> tuple[list[str], int, float]:
        """The other ranks whose heartbeat is stale, or came back after a silence (one phrase each:
        rank, host, pid, silence, step), the number of ranks alive (this one included), and the
        least time any rank has been waiting in its torch.distributed call."""
        now, stale, alive = time.time(), [], 1
        least_wait = self._waiting_s(now)
        for rank in range(self.env.world_size):
            if rank == self.env.rank:
                continue
            try:
                beat = json.loads(self.folder.heartbeat(rank).read_text())
            except (OSError, ValueError):
                stale.append(f"{rank} (no heartbeat)")
                continue
            age = now - float(beat["time"])
            if beat.get("attempt") != self.attempt:
                stale.append(f"{rank} ({beat.get('host')}, no heartbeat in this start)")
            elif age > stale_after:
                stale.append(f"{rank} ({beat['host']}, pid {beat['pid']}, silent for {age:.0f} s, "
                             f"at step {beat['step']})")
            elif beat.get("gap_s", 0.0) > stale_after:  # continued meanwhile (SLURM sends SIGCONT to end it)
                stale.append(f"{rank} ({beat['host']}, pid {beat['pid']}, silent for {beat['gap_s']:.0f} s until "
                             f"{age:.0f} s ago, at step {beat['step']})")
            else:
                alive += 1
                least_wait = min(least_wait, beat["waiting_s"] + age if beat.get("waiting_s") else 0.0)
        return stale, alive, least_wait
