"""What SLURM says about a job: the one place that runs ``squeue``."""
from __future__ import annotations

import subprocess
from typing import Optional

__all__ = ["SlurmUnanswered", "job_state"]


class SlurmUnanswered(RuntimeError):
    """``squeue`` gave no answer (not installed, timed out, or failed for another reason than an
    unknown job); the message says which."""


def job_state(job_id: str | int, timeout_s: float, finished_too: bool = False) -> Optional[str]:
    """The state ``squeue`` lists for job ``job_id`` (``RUNNING``, ``COMPLETING``, ...).

    Args:
        job_id: the SLURM job id.
        timeout_s: how long squeue may take, in seconds.
        finished_too: also list finished jobs SLURM still remembers (``squeue -t all``: ``COMPLETED``,
            ``CANCELLED``, ...); by default squeue lists pending and running ones only.

    Returns:
        The state, or None when squeue lists no such job (an unknown id, or one it no longer lists).

    Raises:
        SlurmUnanswered: when squeue cannot say (missing, timed out, or an error other than an
            unknown job id).
    """
    states = ["-t", "all"] if finished_too else []
    try:
        done = subprocess.run(["squeue", "-h", *states, "-j", str(job_id), "-o", "%T"], capture_output=True,
                              text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise SlurmUnanswered("squeue timed out") from None
    except OSError as error:
        raise SlurmUnanswered(f"squeue cannot run: {error}") from None
    if done.returncode != 0:
        if "Invalid job id" in done.stderr:
            return None
        raise SlurmUnanswered(done.stderr.strip())
    listed = done.stdout.split()
    return listed[0] if listed else None
