"""Checkpoints: DeepSpeed's sharded format plus our own per-rank trainer state, written so that a
crash at any moment leaves the previous checkpoint usable.

Layout of ``{run}/checkpoints``::

    step_{N}/            DeepSpeed tag folder (model, optimizer partitions, client state)
      meta.json          model signature, ZeRO stage, world size (checked before loading)
      trainer_shared.pt  main rank's state needed by every rank (EMA of whole weights)
      trainer_rank{r}.pt rank r's data-stream position, RNG states, EMA partitions
    latest               name of the newest complete tag, replaced only after all ranks wrote
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from anchorformer import dist
from anchorformer.atomic import atomic_torch_save, atomic_write_bytes
from anchorformer.config import CheckpointConfig

__all__ = ["CheckpointError", "Checkpointer", "model_signature"]

logger = logging.getLogger(__name__)

_TAG = re.compile(r"step_(\d+)")
LATEST = "latest"
META = "meta.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed by this run (missing, another model, another layout)."""


def model_signature(model: nn.Module, model_name: str) -> dict[str, Any]:
    """Identity of a network's parameters: name, count and a hash of every (name, shape)."""
    shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    digest = hashlib.sha256(repr(shapes).encode()).hexdigest()[:16]
    return {"model": model_name, "num_params": sum(p.numel() for p in model.parameters()),
            "param_hash": digest}


class Checkpointer:
    """Saves and finds checkpoints of one run.

    Args:
        directory: the run's checkpoints folder.
        cfg: interval and retention options.
        is_main: whether this rank writes the shared files (rank 0).
    """

    def __init__(self, directory: Path, cfg: CheckpointConfig, is_main: bool):
        self.directory = Path(directory)
        self.cfg = cfg
        self.is_main = is_main

    def due(self, step: int) -> bool:
        """Whether the step interval asks for a checkpoint after optimizer step ``step``."""
        return self.cfg.every_steps > 0 and step % self.cfg.every_steps == 0

    def save(self, engine: Any, step: int, client_state: dict[str, Any], meta: dict[str, Any],
             rank_state: dict[str, Any], shared_state: dict[str, Any]) -> Path:
        """Write checkpoint ``step_{step}`` on every rank (a collective), then move ``latest``.

        Args:
            engine: the DeepSpeed engine.
            step: optimizer steps done.
            client_state: small state every rank needs (epoch, step, best metric, config).
            meta: signature checked before a resume (see :meth:`check`).
            rank_state: this rank's own state (data position, RNG, EMA partitions).
            shared_state: state the main rank writes for all (ignored on other ranks).

        Returns:
            The tag folder.
        """
        tag = f"step_{step}"
        tag_dir = self.directory / tag
        engine.save_checkpoint(str(self.directory), tag=tag, client_state=client_state,
                               save_latest=False)
        atomic_torch_save(rank_state, tag_dir / f"trainer_rank{dist.rank()}.pt")
        if self.is_main:
            atomic_torch_save(shared_state, tag_dir / "trainer_shared.pt")
            atomic_write_bytes(tag_dir / META, json.dumps(meta, indent=2).encode())
        dist.barrier()  # every rank's files are complete before `latest` names this tag
        if self.is_main:
            atomic_write_bytes(self.directory / LATEST, tag.encode())
            self._prune(keep=tag)
        dist.barrier()
        logger.info("checkpoint %s written", tag_dir)
        return tag_dir

    def find(self, resume: str) -> Optional[Path]:
        """The tag folder to resume from.

        Args:
            resume: 'auto' (this run's latest, if any), 'none', a checkpoints folder (its latest)
                or a tag folder.

        Returns:
            The tag folder, or None to start fresh.

        Raises:
            CheckpointError: when an explicit path holds no usable checkpoint.
        """
        if resume == "none":
            return None
        if resume == "auto":
            return self._latest(self.directory) if (self.directory / LATEST).is_file() else None
        path = Path(resume)
        if (path / LATEST).is_file():
            return self._latest(path)
        if (path / META).is_file():
            return path
        raise CheckpointError(
            f"train.resume={resume!r} is neither a checkpoints folder with a '{LATEST}' file nor a "
            f"checkpoint tag folder with {META}; use 'auto', 'none' or such a path")

    @staticmethod
    def check(tag_dir: Path, expected: dict[str, Any]) -> None:
        """Refuse a checkpoint written by another model, in another ZeRO layout or precision.

        Raises:
            CheckpointError: naming what differs and how to proceed.
        """
        try:
            saved = json.loads((tag_dir / META).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CheckpointError(f"checkpoint {tag_dir} has no readable {META}: {err}") from err
        for key in ("model", "num_params", "param_hash"):
            if saved.get(key) != expected[key]:
                raise CheckpointError(
                    f"checkpoint {tag_dir} holds another model ({saved.get('model')}, "
                    f"{saved.get('num_params')} parameters) than this run builds "
                    f"({expected['model']}, {expected['num_params']} parameters); resume with the "
                    f"same model.* settings, or load its weights as model.pretrained_checkpoint "
                    f"after converting it")
        for key in ("zero_stage", "world_size"):
            if saved.get(key) != expected[key]:
                raise CheckpointError(
                    f"checkpoint {tag_dir} was written with ZeRO stage {saved.get('zero_stage')} on "
                    f"{saved.get('world_size')} ranks; this run uses stage {expected['zero_stage']} "
                    f"on {expected['world_size']} ranks. Exact resume needs the same ZeRO layout "
                    f"(deepspeed.zero_stage and the number of processes); to change it, convert the "
                    f"checkpoint to fp32 weights and start from model.pretrained_checkpoint")
        precision = saved.get("precision", expected["precision"])  # older checkpoints did not record it
        if precision != expected["precision"]:
            raise CheckpointError(
                f"checkpoint {tag_dir} was written with train.precision={precision}; this run uses "
                f"{expected['precision']}. DeepSpeed stores weights and optimizer state differently in "
                f"each mode, so exact resume needs the same precision: set train.precision={precision}, "
                f"or convert the checkpoint to fp32 weights and start from model.pretrained_checkpoint")

    def load(self, engine: Any, tag_dir: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """Load model and optimizer into ``engine`` and read back the trainer state.

        Returns:
            (client_state, this rank's state, the shared state).
        """
        load_path, client_state = engine.load_checkpoint(
            str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True,
            load_lr_scheduler_states=False, load_module_strict=True)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint files in {tag_dir}")
        rank_file = tag_dir / f"trainer_rank{dist.rank()}.pt"
        if not rank_file.is_file():
            raise CheckpointError(f"{rank_file} is missing: the checkpoint is incomplete")
        rank_state = torch.load(rank_file, map_location="cpu", weights_only=False)
        shared_state = torch.load(tag_dir / "trainer_shared.pt", map_location="cpu", weights_only=False)
        logger.info("resumed from %s (step %s)", tag_dir, client_state.get("step"))
        return client_state, rank_state, shared_state

    def _latest(self, directory: Path) -> Path:
        tag = (directory / LATEST).read_text().strip()
        tag_dir = directory / tag
        if not (tag_dir / META).is_file():
            raise CheckpointError(f"{directory / LATEST} names {tag!r}, but {tag_dir} is not a "
                                  f"complete checkpoint")
        return tag_dir

    def _prune(self, keep: str) -> None:
        """Delete all but the newest ``keep_last`` tags (never the one just written)."""
        if self.cfg.keep_last == 0:
            return
        tags = sorted((int(m.group(1)), p) for p in self.directory.iterdir()
                      if p.is_dir() and (m := _TAG.fullmatch(p.name)))
        for _, path in tags[: max(len(tags) - self.cfg.keep_last, 0)]:
            if path.name != keep:
                shutil.rmtree(path, ignore_errors=True)
                logger.info("removed old checkpoint %s", path)
