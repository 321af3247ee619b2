"""What every DataLoader worker of the project runs first (its ``worker_init_fn``).

SLURM signals every process of a job step, and torchrun and the DeepSpeed launcher signal a rank's
whole process tree, so a stop signal reaches the DataLoader workers too. PyTorch's worker handler
dies of a TERM that does not come from its parent ("DataLoader worker ... killed by signal:
Terminated"), which takes the rank down before it can checkpoint. The workers leave the stop
signals to the training process, which stops at a step boundary and shuts them down itself.
"""
from __future__ import annotations

import os
import signal
import threading

from anchorformer.dist.stop_signals import STOP_SIGNALS

__all__ = ["init_worker"]


def init_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: this worker ignores the stop signals (TERM, USR1) from
    anyone but its parent; a TERM from the training process (how a DataLoader, or Python's exit,
    ends a worker that did not stop) still ends it at once.

    Args:
        worker_id: the DataLoader's worker index (unused: every worker does the same).
    """
    # Blocked signals wait for the filter thread; threads started later inherit the mask.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    threading.Thread(target=_filter_stop_signals, args=(os.getppid(),), name="stop-signal-filter",
                     daemon=True).start()


def _filter_stop_signals(parent: int) -> None:
    """Take the worker's stop signals one by one: exit on the parent's TERM, drop the others."""
    while True:
        info = signal.sigwaitinfo(STOP_SIGNALS)
        if info.si_signo == signal.SIGTERM and info.si_pid == parent:
            os._exit(0)  # what PyTorch's own worker handler does for its parent's TERM
