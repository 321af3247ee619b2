"""Stop signals: what schedulers and launchers send before they end a run, turned into one stop
request that the training process acts on at its next step boundary.

SLURM sends USR1 before the time limit (``--signal``) and TERM on preemption, ``scontrol requeue``
and ``scancel``, to every process of the job step; torchrun's agent and the DeepSpeed launcher
forward TERM to their ranks (and the ranks' children) and kill what is left after 30 s. Only the
training process acts on these signals: DataLoader workers leave them to it
(``anchorformer.data.workers.init_worker``).
"""
from __future__ import annotations

import signal
import time
from types import FrameType
from typing import Callable, Optional, Sequence, Union

__all__ = ["STOP_SIGNALS", "StopRequest"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""TERM (preemption, requeue, cancellation, a launcher shutting down) and USR1 (time limit)."""

_Handler = Union[Callable[[int, Optional[FrameType]], object], int, None]


class StopRequest:
    """Records stop signals from :meth:`install` on and forwards them to the trainer once it exists.

    The handler only appends to a list and calls the trainer's ``request_stop`` (which sets a flag
    read at the next step boundary), so it is safe at any moment: during imports, the process
    group's start, the model's build, a step, an evaluation or a checkpoint write.

    Args:
        signals: the signals to act on.
        received: ``(signal number, time.monotonic())`` of signals already caught by an earlier
            handler (launch/train.py installs one before its imports); appended to from then on.
    """

    def __init__(self, signals: Sequence[int] = STOP_SIGNALS,
                 received: Optional[list[tuple[int, float]]] = None):
        self.signals = tuple(signals)
        self.received: list[tuple[int, float]] = received if received is not None else []
        self._forward: Optional[Callable[[], None]] = None
        self._previous: dict[int, _Handler] = {}

    def install(self) -> StopRequest:
        """Catch the signals from now on (the main thread only, as Python requires)."""
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
            # Restart the system calls a signal interrupts: the C++ side of collectives and file
            # writes must not fail with EINTR because a flag was set.
            signal.siginterrupt(sig, False)
        return self

    def forward_to(self, request_stop: Callable[[], None]) -> None:
        """Call ``request_stop()`` on every signal from now on, and once now if one came already."""
        self._forward = request_stop
        if self.received:
            request_stop()

    def ignore(self) -> None:
        """Ignore the signals from now on (the checkpoint is written: a late one changes nothing)."""
        for sig in self.signals:
            self._previous.setdefault(sig, signal.getsignal(sig))
            signal.signal(sig, signal.SIG_IGN)

    def restore(self) -> None:
        """Put back the handlers that :meth:`install` replaced."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()
        self._forward = None

    def describe(self) -> str:
        """The first signal and how long ago it came, e.g. ``SIGTERM 2.4 s ago``; '' when none."""
        if not self.received:
            return ""
        signum, at = self.received[0]
        more = f" (+{len(self.received) - 1} more)" if len(self.received) > 1 else ""
        return f"{signal.Signals(signum).name} {time.monotonic() - at:.1f} s ago{more}"

    def _on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        self.received.append((signum, time.monotonic()))
        if self._forward is not None:
            self._forward()
