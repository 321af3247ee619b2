"""The pre-flight: every check of a run that needs more than the config itself (the model's
constructor, the files it names, the launch's world size, the checkpoint it resumes), done once
per start before any work: no process group, no run folder, no model weights. ``launch/train.py``
and ``launch/submit.py`` call :func:`check_run` right after ``config.load``; ``run_training`` calls
it when its caller did not. Each refusal is a :class:`ConfigError` naming the key.

The task judges its own inputs and builds its network on the meta device (``Task.preflight``), so
the model's real constructor judges ``model.*`` and the checkpoint signature of ``train.resume``
is computed without weights.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from anchorformer import dist
from anchorformer.config import ConfigError, RootConfig, check_world_size
from anchorformer.engine.anchor_mix import forced_backend_refusal
from anchorformer.engine.checkpoint import CheckpointError, ResumePoint, find_resume_point, model_signature, run_meta
from anchorformer.engine.warm_start import check_vit_source, vit_source_of
from anchorformer.run_folder import RunFolder
from anchorformer.tasks import task_class

__all__ = ["RunPlan", "check_run"]


@dataclass(frozen=True)
class RunPlan:
    """What the pre-flight found out for the run it passed."""

    resume: Optional[ResumePoint]
    """The checkpoint ``train.resume`` names, checked against this run; None starts fresh."""


def check_run(cfg: RootConfig, world_size: int) -> RunPlan:
    """Refuse a run that would fail after start-up, before anything is started or written.

    Args:
        cfg: the loaded configuration.
        world_size: the number of training processes the launch will start (the launcher's
            ``dist.detect().world_size``; ``launch/submit.py``: nodes x tasks per node).

    Returns:
        The plan the trainer follows (the checkpoint to resume).

    Raises:
        ConfigError: naming the key to change and how.
    """
    check_world_size(cfg, world_size)
    network = task_class(cfg.task).preflight(cfg, world_size)
    device = "cuda" if dist.uses_cuda(cfg.train.device) else "cpu"
    refusal = forced_backend_refusal(network, cfg, device)
    if refusal is not None:
        raise ConfigError("train.anchor_mix", f"{cfg.train.anchor_mix} cannot run on this {device} run: {refusal}; "
                                              f"use auto (the fastest that runs) or another backend")
    folder = RunFolder.of(cfg)
    if not folder.warm_start.is_file():  # a resumed run has its ViT export: nothing to read again
        source = vit_source_of(cfg)
        if source is not None:
            check_vit_source(source, network)
    _check_writable(folder.root, "logging.output_dir")
    expected = run_meta(model_signature(network, cfg.model.name), cfg, world_size)
    try:
        resume = find_resume_point(cfg.train.resume, folder.checkpoints, expected)
    except CheckpointError as err:
        raise ConfigError("train.resume", " ".join(str(err).split())) from None
    return RunPlan(resume=resume)


def _check_writable(folder: Path, key: str) -> None:
    """Refuse a folder that cannot be created or written, without creating it: a probe folder is
    made and removed in its nearest existing ancestor."""
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(key, f"{existing} is a file, so the run folder {folder} cannot be created there; "
                               f"choose another {key}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".anchorformer-write-probe-", dir=existing))
    except OSError as err:
        raise ConfigError(key, f"the run folder {folder} cannot be created: {existing} is not writable "
                               f"({err.strerror}); choose a writable {key}") from None
