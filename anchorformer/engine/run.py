"""One training run from a config: catch stop signals, detect the launcher, lock the run folder,
start the process group, train, record a failure in the run's ledger, and always clean up."""
from __future__ import annotations

import logging
from typing import Optional, Sequence

from anchorformer import dist
from anchorformer.config import ConfigError, RootConfig
from anchorformer.dist.stop_signals import STOP_SIGNALS, StopRequest
from anchorformer.engine import run_lock
from anchorformer.engine.checkpoint import CheckpointError
from anchorformer.engine.failures import Failure, FailureHook, FailureLedger, current_attempt
from anchorformer.engine.preflight import RunPlan, check_run
from anchorformer.engine.step_guard import TrainingDiverged
from anchorformer.engine.trainer import FitResult, Trainer
from anchorformer.engine.warm_start import start_from_vit
from anchorformer.run_folder import RunFolder

__all__ = ["run_training"]

_REFUSALS = (ConfigError, CheckpointError, TrainingDiverged)
"""Errors that end a run on purpose (a bad option or checkpoint, a diverged run): no failure to
record or restart from; a restart would meet them again."""

logger = logging.getLogger(__name__)


def run_training(cfg: RootConfig, stop_signals: Sequence[int] = STOP_SIGNALS, env: Optional[dist.DistEnv] = None,
                 stop: Optional[StopRequest] = None, plan: Optional[RunPlan] = None,
                 on_failure: Optional[FailureHook] = None) -> FitResult:
    """Train ``cfg`` in this process (one rank of the job).

    A stop signal at any moment, from start-up to the last evaluation, makes every rank finish
    its step, write one checkpoint and return 'stopped' (a signal after the last step changes
    nothing: the run completes).

    Args:
        cfg: validated configuration.
        stop_signals: signals that make the trainer checkpoint and return at the next step
            (when ``stop`` is not given; ``()`` for none).
        env: the process's place in the job; default ``dist.detect()`` (nccl when the config
            trains on GPUs, gloo otherwise).
        stop: the caller's installed :class:`StopRequest` (launch/train.py installs one before its
            imports); default: one for ``stop_signals``, installed now and restored at the end.
        plan: the pre-flight's result when the caller ran it (``check_run`` with this launch's
            world size); default: the pre-flight runs here, before any work.
        on_failure: called with the failure this rank recorded in the run's failures ledger when
            an exception ends its training (then the exception propagates) or when the hang
            watchdog ends it (then from the watchdog's thread, before the process exits); a SLURM
            job requeues itself there. Refusals (a bad option or checkpoint, a diverged run) are
            no failure.

    Returns:
        How the run ended.

    Raises:
        RunFolderInUse: another live job holds the run folder (checked before the process group).
    """
    owned = stop is None
    stop = StopRequest(stop_signals).install() if stop is None else stop
    trainer: Optional[Trainer] = None
    lock: Optional[run_lock.LockHolder] = None
    result: Optional[FitResult] = None
    try:
        env = env if env is not None else dist.detect(cuda_available=dist.uses_cuda(cfg.train.device))
        if plan is None:
            plan = check_run(cfg, env.world_size)  # before any work: a bad config, input or batch split fails here
        folder = RunFolder.of(cfg)
        run_lock.check_free(folder, run_lock.LockHolder.this_process())  # at the door: no process group yet
        dist.init(env, timeout_s=cfg.health.collective_timeout_s)
        lock = _lock_run_folder(folder, env)
        # a ViT/DeiT named by model.pretrained_checkpoint: converted once into the run folder, trained from there
        trainer = Trainer(start_from_vit(cfg, folder, env.is_main), env, plan=plan)
        trainer.watchdog.on_hang = on_failure
        stop.forward_to(trainer.request_stop)
        result = trainer.fit()
        if env.is_main:
            logger.info("run %s: %s at epoch %d step %d", trainer.folder.root, result.status,
                        result.epoch, result.step)
        if result.status == "stopped":
            logger.warning("stopped at step %d on %s; the checkpoint is written", result.step,
                           stop.describe() or "another rank's stop signal")
        return result
    except _REFUSALS:
        raise
    except Exception as error:
        failure = _record_crash(error, cfg, env, trainer, plan)
        if on_failure is not None:
            on_failure(failure)
        raise
    finally:
        if owned:
            stop.restore()
        if trainer is not None:
            trainer.close()
        # A SLURM job that stopped requeues itself and takes its lock back: keep it meanwhile.
        if lock is not None and not (result is not None and result.status == "stopped" and lock.slurm_job_id):
            run_lock.release(RunFolder.of(cfg), lock)
        dist.shutdown()


def _lock_run_folder(folder: RunFolder, env: dist.DistEnv) -> Optional[run_lock.LockHolder]:
    """Rank 0 takes the run folder's lock; every rank raises the same refusal if it could not."""
    holder, refusal = None, None
    if env.is_main:
        try:
            holder = run_lock.acquire(folder)
        except run_lock.RunFolderInUse as error:
            refusal = error.detail
    refusal = dist.broadcast_object(refusal)
    if refusal is not None:
        raise run_lock.RunFolderInUse("logging.run_name", refusal)
    return holder


def _record_crash(error: Exception, cfg: RootConfig, env: Optional[dist.DistEnv], trainer: Optional[Trainer],
                  plan: Optional[RunPlan]) -> Failure:
    """Write this rank's record of the exception that ends its training, at the step it reached."""
    rank = env.rank if env is not None else 0
    if trainer is not None:
        attempt, step = trainer.watchdog.attempt, trainer.step
    else:  # before the trainer: no agreed id for launchers that name none (no collective now)
        attempt, step = current_attempt(agree=False), plan.resume.meta.step if plan and plan.resume else 0
    failure = Failure.now(attempt, "crash", f"{type(error).__name__}: {error}", step, rank)
    ledger = FailureLedger(RunFolder.of(cfg))
    try:
        ledger.record(failure)
    except OSError as write_error:
        logger.error("cannot record the failure in the failures ledger: %s", write_error)
    logger.error("training failed: %s", failure.describe())
    return failure
