"""One training run from a config: detect the launcher, start the process group, route stop
signals to the trainer, train, and always clean up."""
from __future__ import annotations

import logging
import signal
from types import FrameType
from typing import Optional, Sequence

from anchorformer import dist
from anchorformer.config import RootConfig
from anchorformer.engine.preflight import check_run
from anchorformer.engine.trainer import FitResult, Trainer

__all__ = ["run_training", "DEFAULT_STOP_SIGNALS"]

logger = logging.getLogger(__name__)

DEFAULT_STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
"""SLURM sends USR1 before the time limit (``--signal``) and TERM on preemption."""


def run_training(cfg: RootConfig, stop_signals: Sequence[signal.Signals] = DEFAULT_STOP_SIGNALS,
                 env: Optional[dist.DistEnv] = None) -> FitResult:
    """Train ``cfg`` in this process (one rank of the job).

    Args:
        cfg: validated configuration.
        stop_signals: signals that make the trainer checkpoint and return at the next step.
        env: the process's place in the job; default ``dist.detect()`` (nccl when the config
            trains on GPUs, gloo otherwise).

    Returns:
        How the run ended.
    """
    env = env if env is not None else dist.detect(cuda_available=dist.uses_cuda(cfg.train.device))
    check_run(cfg, env.world_size)  # before any work: a bad config, input or batch split fails here
    dist.init(env)
    trainer: Optional[Trainer] = None
    previous = {}
    try:
        trainer = Trainer(cfg, env)

        def _on_signal(signum: int, frame: Optional[FrameType]) -> None:
            trainer.request_stop()  # only sets a flag: safe inside a signal handler

        previous = {sig: signal.signal(sig, _on_signal) for sig in stop_signals}
        result = trainer.fit()
        if env.is_main:
            logger.info("run %s: %s at epoch %d step %d", trainer.run_dir, result.status,
                        result.epoch, result.step)
        return result
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if trainer is not None:
            trainer.close()
        dist.shutdown()
