"""The training job that ``launch/submit.py`` hands to submitit (SLURM or its local executor).

Only ``launch/submit.py`` imports this module: it is the scheduler's side of training.

A :class:`TrainingJob` is pickled by submitit and unpickled in every task of the job. Calling it
runs the same trainer as ``launch/train.py``. When SLURM signals (USR1 ``signal_delay_s`` before
the time limit or from ``scancel --signal``; TERM on preemption, ``scontrol requeue``, ``scancel``)
the trainer finishes its step, every rank writes one checkpoint and exits 0. A job still running
(the time limit, ``scancel --signal=...``) requeues itself through submitit's own machinery: rank 0
dumps :meth:`TrainingJob.checkpoint` (a fresh copy that resumes from the run folder) over the job's
pickle and runs ``scontrol requeue``. A job SLURM is already ending (state COMPLETING: requeued by
``scontrol requeue`` or a preemption, which SLURM restarts itself, or cancelled by ``scancel``,
which stays cancelled) is left to SLURM. The requeued job (same id) resumes where it stopped.

When a rank fails instead (an exception, a peer's death that reaches it as one, or a hang the
watchdog ends) every surviving rank requeues the job the same way (:class:`_RequeueOnFailure`):
each writes the same continued job over the pickle (atomically) and runs ``scontrol requeue`` while
SLURM still lists the job as running, so whichever rank survives gets it done; the failure and
what followed go to the run's failures ledger and into summary.json. A failure at the same step as
the start before (no progress in between) is not requeued: the job ends with one error instead of
looping on a deterministic bug, as it does after ``slurm.max_requeues`` requeues.
"""
from __future__ import annotations

import copy
import logging
import os
import signal
import subprocess
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Optional

import submitit

from anchorformer.atomic import atomic_output
from anchorformer.config import RootConfig, from_dict, to_dict
from anchorformer.run_folder import RunFolder

if TYPE_CHECKING:
    from anchorformer.dist import DistEnv
    from anchorformer.engine.failures import Failure

__all__ = ["PREEMPT_SIGNAL", "TrainingJob", "JobSummary", "RunFailed"]

logger = logging.getLogger(__name__)

PREEMPT_SIGNAL = "USR1"
"""Signal SLURM sends ``signal_delay_s`` before the time limit (``#SBATCH --signal=USR1@N``);
submitit must agree on it (``SUBMITIT_PREEMPT_SIGNAL``), both where it writes the sbatch script
and inside the job."""
_SLURM_TIMEOUT_S = 8.0
"""How long one squeue, scontrol or scancel call may take here: after a hang, the requeue must fit
the watchdog's 20 s for its hook (a node cut off from the controller never gets an answer)."""


class RunFailed(RuntimeError):
    """A failed run that is not requeued: it failed at the same step as the start before, or it
    was requeued ``slurm.max_requeues`` times."""


@dataclass(frozen=True)
class JobSummary:
    """What a finished job returns to the submitter (``job.result()``)."""

    status: str
    """Trainer status: 'completed' (a stopped run requeues instead of returning)."""
    epoch: int
    """Epochs completed."""
    step: int
    """Optimizer steps completed."""
    requeues: int
    """How many times this job was requeued before it finished."""
    metrics: dict[str, Any]
    """Final metrics reported by the trainer (e.g. eval/top1)."""


@dataclass(frozen=True)
class TrainingJob:
    """A picklable, checkpointable training run (submitit calls it in every task).

    Args:
        config: the resolved configuration as plain data (``config.to_dict``), fixed at
            submission so a requeued job trains with exactly the options it was submitted with.
            Plain data, not the dataclasses: a requeued job may start on newer code, which
            validates it again (new options take their defaults).
        requeues: how many times this run was requeued already.
    """

    config: dict[str, Any]
    requeues: int = 0

    @classmethod
    def from_config(cls, cfg: RootConfig) -> TrainingJob:
        """The job that trains ``cfg``."""
        return cls(to_dict(cfg))

    @property
    def cfg(self) -> RootConfig:
        """The validated configuration (raises ConfigError if this code cannot accept it)."""
        return from_dict(self.config)

    def __call__(self) -> JobSummary:
        """Run training in this task; requeue the job when the trainer stopped on a signal.

        Returns:
            The trainer's summary when training completed.
        """
        # submitit installed its requeue handler on USR1; keep it to requeue after the
        # checkpoint, while the trainer takes the signals over so that they only request a stop.
        submitit_handler = signal.getsignal(getattr(signal, f"SIG{PREEMPT_SIGNAL}"))
        from anchorformer.dist.stop_signals import StopRequest  # imports torch: only inside the job

        stop = StopRequest().install()  # first: a signal during start-up stops after the first step
        from anchorformer.dist import detect, uses_cuda

        if submitit.JobEnvironment.USR_SIG != PREEMPT_SIGNAL:
            raise RuntimeError(f"submitit listens for SIG{submitit.JobEnvironment.USR_SIG}, not "
                               f"SIG{PREEMPT_SIGNAL}; export SUBMITIT_PREEMPT_SIGNAL={PREEMPT_SIGNAL} "
                               "in the job (launch/submit.py does)")
        job_env = submitit.JobEnvironment()
        if job_env.cluster == "local":
            _export_local_rendezvous(job_env)
        dist_env = detect(cuda_available=uses_cuda(self.cfg.train.device))  # as launch/train.py detects
        _setup_process(dist_env)
        from anchorformer.engine import run_training  # imports deepspeed: after DS_ACCELERATOR
        from anchorformer.engine.failures import EX_TEMPFAIL, Failure, current_attempt

        # SLURM restarts a job it requeued itself (scontrol requeue, preemption) from the pickle
        # as submitted: that restart resumes too.
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        job = self._continued(restarts) if restarts > self.requeues else self
        logger.info("starting training in %s (requeued %d times before)", job_env, job.requeues)
        on_failure = _RequeueOnFailure(job, job_env)
        try:
            result = run_training(job.cfg, env=dist_env, stop=stop, on_failure=on_failure)
        except Exception as error:
            if on_failure.refusal is not None:
                raise RunFailed(on_failure.refusal) from error
            if on_failure.requeued:
                # No result file: the submitter keeps waiting for the requeued job.
                raise SystemExit(EX_TEMPFAIL) from None
            raise
        if result.status == "stopped":
            # The checkpoint is written: a repeated signal (scancel twice, TERM after USR1) must
            # not start a second requeue while this one runs.
            stop.ignore()
            signal_seen = stop.describe() or "another rank's stop signal"
            self._requeue(job_env, submitit_handler, Failure.now(current_attempt(agree=False), "stop",
                                                                 f"stopped on {signal_seen}", result.step,
                                                                 job_env.global_rank))
        return JobSummary(status=result.status, epoch=result.epoch, step=result.step,
                          requeues=job.requeues, metrics=dict(result.metrics))

    def checkpoint(self) -> Optional[submitit.helpers.DelayedSubmission]:
        """The submission that continues this run after a requeue (submitit calls it).

        Returns:
            A fresh copy that resumes from the run folder's latest checkpoint, or None (submitit
            then gives up with an error) once ``slurm.max_requeues`` is reached.
        """
        max_requeues = self.cfg.slurm.max_requeues
        if self.requeues >= max_requeues:
            logger.error("not requeuing: the run was requeued %d times (slurm.max_requeues=%d)",
                         self.requeues, max_requeues)
            return None
        return submitit.helpers.DelayedSubmission(self._continued(self.requeues + 1))

    def _continued(self, requeues: int) -> TrainingJob:
        """This run after ``requeues`` requeues: it resumes from the run folder."""
        resumed = copy.deepcopy(self.config)
        resumed["train"]["resume"] = "auto"
        return TrainingJob(resumed, requeues)

    def _requeue(self, job_env: submitit.JobEnvironment,
                 submitit_handler: Callable[[int, Any], None] | int | None, stopped: Failure) -> None:
        """After the checkpoint: rank 0 requeues a job that is still running through submitit and
        records the stop in the failures ledger; every rank then leaves without a result (exit 0).

        Leaving with SystemExit keeps submitit from writing a result file, so the submitter
        keeps waiting for the requeued job.
        """
        if job_env.global_rank != 0:
            logger.info("stopped after the checkpoint; rank 0 requeues the job")
            raise SystemExit(0)
        from anchorformer.engine.failures import FailureLedger  # imports torch: only inside the job

        ledger = FailureLedger(RunFolder.of(self.cfg))
        state = _slurm_job_state(job_env)
        if state not in ("RUNNING", None):
            # COMPLETING: SLURM is ending the job. It restarts a requeued or preempted job itself
            # (which then resumes); a cancelled one must stay cancelled (a requeue revives it).
            logger.info("SLURM is ending job %s (state %s: scontrol requeue, a preemption or scancel); "
                        "the checkpoint is saved, SLURM decides whether the job restarts",
                        job_env.job_id, state)
            ledger.record(replace(stopped, action="left to SLURM"))
            raise SystemExit(0)
        declined = self.requeues >= self.cfg.slurm.max_requeues  # checkpoint() declines
        ledger.record(replace(stopped, action="not requeued: slurm.max_requeues reached" if declined else "requeued"))
        if not callable(submitit_handler):
            raise RuntimeError(f"training stopped on a signal but submitit's {PREEMPT_SIGNAL} "
                               f"handler is not installed ({submitit_handler!r}); run this job "
                               "through launch/submit.py")
        try:
            # Dumps self.checkpoint() over the job pickle, requeues, then exits with -1.
            submitit_handler(getattr(signal, f"SIG{PREEMPT_SIGNAL}"), None)
        except SystemExit:
            raise SystemExit(0) from None  # requeued: this run ended as it should
        except subprocess.CalledProcessError as error:
            logger.warning("could not requeue (%s); the checkpoint is saved and a resubmission "
                           "with train.resume=auto continues from it", error)
            raise SystemExit(1) from None


class _RequeueOnFailure:
    """What a rank does when its training failed (``run_training``'s failure hook): requeue the job
    so that it resumes from the last checkpoint, unless the failure repeats the last start's.

    Every surviving rank runs it (a hang's from the watchdog's thread, with 20 s for it); none knows
    which others survived, so each one writes the same continued job over submitit's pickle
    (atomically: the last rename wins, all alike) and requeues the job while SLURM lists it as
    running. The first ``scontrol requeue`` ends the job's other processes (TERM, then KILL after
    KillWait, a frozen one too); later ones find the job ending and leave it.

    Args:
        job: the running job (its requeue count and config).
        job_env: submitit's view of this task.
    """

    def __init__(self, job: TrainingJob, job_env: submitit.JobEnvironment):
        self.job, self.job_env = job, job_env
        self.requeued = False
        """The job was requeued (by this rank or another): leave without a result."""
        self.refusal: Optional[str] = None
        """Why the job is not requeued: the job must end with this error."""

    def __call__(self, failure: Failure) -> None:
        from anchorformer.engine.failures import FailureLedger  # imports torch: only inside the job

        ledger = FailureLedger(RunFolder.of(self.job.cfg))
        continued = self.job.checkpoint()
        repeated = ledger.repeated(failure)
        if repeated is not None:
            self.refusal = (f"the run failed at step {failure.step} in two starts in a row with no progress in "
                            f"between ({repeated.describe()}; now {failure.describe()}); not requeued, since a "
                            f"failure that repeats would loop. The checkpoints are kept: fix the cause and "
                            f"resubmit (train.resume=auto continues from the latest)")
        elif continued is None:
            self.refusal = (f"{failure.describe()}; not requeued: the run was requeued {self.job.requeues} times "
                            f"(slurm.max_requeues={self.job.cfg.slurm.max_requeues}); resubmit to continue")
        elif self.job_env.cluster != "slurm":
            self.refusal = f"{failure.describe()}; submitit's {self.job_env.cluster} executor cannot requeue"
        if self.refusal is not None:
            logger.error("%s", self.refusal)
            ledger.record(replace(failure, action="not requeued"))
            if failure.kind == "hang":  # a frozen rank would hold the allocation until the time limit
                _slurm_command(["scancel", str(self.job_env.job_id)], self.job_env)
            return
        action = self._requeue(continued)
        ledger.record(replace(failure, action=action))
        self.requeued = action in ("requeued", "left to SLURM")
        logger.error("%s; %s (job %s, requeue %d of at most %d)", failure.describe(), action, self.job_env.job_id,
                     self.job.requeues + 1, self.job.cfg.slurm.max_requeues)

    def _requeue(self, continued: submitit.helpers.DelayedSubmission) -> str:
        """Dump ``continued`` over the job's pickle and requeue the job; what happened, in words."""
        state = _slurm_job_state(self.job_env, timeout_s=_SLURM_TIMEOUT_S)
        if state not in ("RUNNING", None):
            return "left to SLURM"  # another rank requeued it, or SLURM ends it (node failure, scancel)
        pickle = self.job_env.paths.submitted_pickle
        submitted = submitit.helpers.DelayedSubmission.load(pickle)
        # submitit's timeout countdown is its own bookkeeping of time limits: carried over as is.
        continued.set_timeout(submitted._timeout_min, submitted._timeout_countdown)
        with atomic_output(pickle) as tmp:
            continued.dump(tmp)
        requeue = _slurm_command(["scontrol", "requeue", str(self.job_env.job_id)], self.job_env)
        if _succeeded(requeue):
            return "requeued"
        if requeue is not None and "pending" in requeue.stderr:  # "Job is pending execution": requeued already
            return "left to SLURM"
        state = _slurm_job_state(self.job_env, timeout_s=_SLURM_TIMEOUT_S)
        if state not in ("RUNNING", None):
            return "left to SLURM"  # another rank's requeue came first
        return f"requeue failed (scontrol requeue: {requeue.stderr.strip() if requeue else 'no answer'})"


def _slurm_command(argv: list[str], job_env: submitit.JobEnvironment) -> Optional[subprocess.CompletedProcess]:
    """Run a SLURM command on the job (``scontrol requeue``, ``scancel``); None when it could not run
    or timed out. A failure is logged, not raised."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=_SLURM_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as error:
        logger.warning("%s for job %s: %s", argv[0], job_env.job_id, error)
        return None
    if not _succeeded(done):
        logger.warning("%s for job %s failed: %s", " ".join(argv[:2]), job_env.job_id, done.stderr.strip())
    return done


def _succeeded(done: Optional[subprocess.CompletedProcess]) -> bool:
    """Whether a :func:`_slurm_command` on this job did its work: it ended with 0, or SLURM's TERM
    to every process of the job (a requeue's, a cancel's) ended the command itself."""
    return done is not None and done.returncode in (0, -signal.SIGTERM)


def _slurm_job_state(job_env: submitit.JobEnvironment, timeout_s: float = 60) -> Optional[str]:
    """The job's SLURM state (RUNNING, COMPLETING, ...); None for submitit's local executor or
    when squeue does not answer in ``timeout_s`` seconds (then the job tries to requeue itself)."""
    if job_env.cluster != "slurm":
        return None
    from anchorformer.dist.slurm import SlurmUnanswered, job_state  # the dist package imports torch: in the job only

    try:
        return job_state(job_env.job_id, timeout_s=timeout_s)
    except SlurmUnanswered:
        return None


def _setup_process(dist_env: DistEnv) -> None:
    """Per-process settings launch/train.py also makes: rank-tagged logs (rank 0 at INFO, the
    others at WARNING) and DeepSpeed's accelerator matching the backend."""
    logging.basicConfig(level=logging.INFO if dist_env.is_main else logging.WARNING, force=True,
                        format=f"%(asctime)s [rank {dist_env.rank}] %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if dist_env.backend == "nccl" else "cpu")


def _export_local_rendezvous(job_env: submitit.JobEnvironment) -> None:
    """Give the local executor's tasks the torchrun variables that ``dist.env.detect`` reads."""
    from anchorformer.dist.env import slurm_port  # imports torch: only inside the job

    port = slurm_port(int(job_env.job_id))  # the local job id is the controller's pid
    os.environ.update(RANK=str(job_env.global_rank), WORLD_SIZE=str(job_env.num_tasks),
                      LOCAL_RANK=str(job_env.local_rank),
                      LOCAL_WORLD_SIZE=str(job_env.num_tasks // job_env.num_nodes),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
