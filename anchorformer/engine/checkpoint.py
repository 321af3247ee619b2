"""Checkpoints: one component owns everything that must survive a stop, and resumes it on the
same layout exactly or on another number of ranks or ZeRO stage.

Every piece of state (data stream, EMA, random generators, the trainer's counters) is an object
with ``state_dict()`` / ``load_state_dict()``, registered with the :class:`Checkpointer` as per-rank
or shared, as torchtitan's CheckpointManager takes its states; the DeepSpeed engine writes its own
model and optimizer shards. The Checkpointer owns the folder layout, which file holds what, the
metadata and the compatibility check, the step interval, keep-last-k and ``latest``. Its
:meth:`Checkpointer.load` says whether the run resumed, from what and how.

A checkpoint written on W1 ranks at ZeRO stage Z1 resumes on (W2, Z2), any of 0-3: the model and
optimizer through DeepSpeed's universal form (``engine/reshard.py``, made once beside the
checkpoint); per-rank components through ``load_resharded(states)``, which gets every saved rank's
state when the number of ranks changed (the data stream finishes the epoch from its global
position, the EMA re-cuts its chunks). The same layout keeps the exact path: DeepSpeed's own load
and each rank's own state.

The file layout and the metadata are ``anchorformer.run_folder``'s (:class:`CheckpointFolder`,
:class:`CheckpointMeta`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol

import torch
from torch import nn

from anchorformer import dist
from anchorformer.atomic import atomic_torch_save
from anchorformer.config import CheckpointConfig, RootConfig
from anchorformer.engine import reshard
from anchorformer.run_folder import CheckpointFolder, CheckpointMeta, CheckpointMetaError, CheckpointTag

__all__ = ["CheckpointError", "Checkpointer", "ResumePoint", "Resumed", "RngState", "Stateful", "find_resume_point",
           "model_signature", "run_meta"]

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed by this run (missing, another model or precision)."""


class Stateful(Protocol):
    """What the Checkpointer saves and restores. A per-rank component may also define
    ``load_resharded(states)``: the states every rank saved, when the number of ranks changed."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class RngState:
    """This process's random generators (Python, NumPy, torch) as a per-rank component."""

    def state_dict(self) -> dict[str, Any]:
        return dist.rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        dist.set_rng_state(state)

    def load_resharded(self, states: list[dict[str, Any]]) -> None:
        """On another number of ranks the generators stay as seeded at start: training reseeds
        them every micro-step from (seed, micro-step, rank), so no step depends on their past."""
        logger.debug("random generators of %d saved ranks not restored on %d ranks", len(states), dist.world_size())


def model_signature(model: nn.Module, model_name: str) -> dict[str, Any]:
    """Identity of a network's parameters: name, count and a hash of every (name, shape)."""
    shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    digest = hashlib.sha256(repr(shapes).encode()).hexdigest()[:16]
    return {"model": model_name, "num_params": sum(p.numel() for p in model.parameters()),
            "param_hash": digest}


def run_meta(signature: dict[str, Any], cfg: RootConfig, world_size: int) -> CheckpointMeta:
    """This run as a checkpoint records it (step 0): its model (:func:`model_signature`), precision,
    global batch, optimizer and layout. A resume compares a checkpoint with it; the trainer writes
    it, with the step and epoch, into every checkpoint."""
    return CheckpointMeta(**signature, step=0, epoch=0, precision=cfg.train.precision,
                          global_batch_size=cfg.train.global_batch_size, optimizer=cfg.optim.name,
                          zero_stage=cfg.deepspeed.zero_stage, world_size=world_size)


@dataclass(frozen=True)
class ResumePoint:
    """A checkpoint this run can continue (found and checked, not loaded)."""

    tag: CheckpointTag
    meta: CheckpointMeta
    """What the checkpoint recorded."""


def find_resume_point(resume: str, checkpoints: CheckpointFolder, expected: CheckpointMeta) -> Optional[ResumePoint]:
    """The checkpoint ``train.resume`` names, checked against this run.

    Args:
        resume: 'auto' (this run's latest, if any), 'none', a checkpoints folder (its latest) or a
            tag folder.
        checkpoints: this run's checkpoints folder (for 'auto').
        expected: :func:`run_meta` of this run.

    Returns:
        The checkpoint, or None to start fresh.

    Raises:
        CheckpointError: when an explicit path holds no usable checkpoint, or the checkpoint
            cannot be continued by this run (:func:`check`).
    """
    try:
        tag = _find(resume, checkpoints)
        return None if tag is None else ResumePoint(tag, check(CheckpointMeta.read(tag), tag, expected))
    except CheckpointMetaError as err:
        raise CheckpointError(str(err)) from None


def _find(resume: str, checkpoints: CheckpointFolder) -> Optional[CheckpointTag]:
    if resume == "none":
        return None
    if resume == "auto":
        return checkpoints.latest() if checkpoints.has_latest() else None
    path = Path(resume)
    if CheckpointFolder(path).has_latest():
        return CheckpointFolder(path).latest()
    if CheckpointTag(path).is_complete():
        return CheckpointTag(path)
    raise CheckpointError(
        f"train.resume={resume!r} is neither a checkpoints folder with a 'latest' file nor a "
        f"checkpoint tag folder with meta.json; use 'auto', 'none' or such a path")


def check(saved: CheckpointMeta, tag: CheckpointTag, expected: CheckpointMeta) -> CheckpointMeta:
    """Refuse a checkpoint this run cannot continue: another model, precision or global batch, or an
    optimizer whose state cannot move to this run's layout. Another number of ranks or ZeRO stage
    is accepted. Fields an old checkpoint did not record are taken as this run's.

    Returns:
        ``saved``, with the unrecorded fields filled in.

    Raises:
        CheckpointError: naming what differs and how to proceed.
    """
    if (saved.model, saved.num_params, saved.param_hash) != (expected.model, expected.num_params, expected.param_hash):
        raise CheckpointError(
            f"checkpoint {tag.path} holds another model ({saved.model}, {saved.num_params} parameters) than this "
            f"run builds ({expected.model}, {expected.num_params} parameters); resume with the same model.* "
            f"settings, or load its weights as model.pretrained_checkpoint after converting it")
    unrecorded = {name: getattr(expected, name) for name in ("precision", "global_batch_size", "zero_stage", "world_size")
                  if getattr(saved, name) is None}
    if saved.optimizer is None:
        unrecorded["optimizer"] = "adamw"  # the only optimizer before the meta recorded it
    saved = dataclasses.replace(saved, **unrecorded)
    if saved.precision != expected.precision:
        raise CheckpointError(
            f"checkpoint {tag.path} was written with train.precision={saved.precision}; this run uses "
            f"{expected.precision}. DeepSpeed stores weights and optimizer state differently in each mode, so "
            f"resuming needs the same precision: set train.precision={saved.precision}, or convert the checkpoint "
            f"to fp32 weights and start from model.pretrained_checkpoint")
    if saved.global_batch_size != expected.global_batch_size:
        raise CheckpointError(
            f"checkpoint {tag.path} was written with train.global_batch_size={saved.global_batch_size}; this run "
            f"uses {expected.global_batch_size}. The learning-rate schedule and the data position count steps of "
            f"that batch: set train.global_batch_size={saved.global_batch_size} (train.micro_batch_size and the "
            f"number of processes may change; the accumulation adapts)")
    same_layout = (saved.world_size, saved.zero_stage) == (expected.world_size, expected.zero_stage)
    if not same_layout and saved.optimizer != "adamw":
        raise CheckpointError(
            f"checkpoint {tag.path} was written with optim.name={saved.optimizer} on {saved.world_size} ranks at "
            f"ZeRO stage {saved.zero_stage}; only AdamW's state moves to another layout (this run: "
            f"{expected.world_size} ranks, stage {expected.zero_stage}). Resume with "
            f"deepspeed.zero_stage={saved.zero_stage} on {saved.world_size} processes")
    return saved


@dataclass(frozen=True)
class Resumed:
    """Where a run resumed from, and how."""

    tag_dir: Path
    step: int
    world_size: int
    """Ranks of the run that wrote the checkpoint."""
    zero_stage: int
    """ZeRO stage of the run that wrote the checkpoint."""
    resharded: bool
    """Whether it was written on another number of ranks or ZeRO stage."""
    conversion_s: Optional[float]
    """Seconds the universal conversion took in this resume (None: not needed, or made before)."""
    anchor_mix: tuple[dict[str, Any], ...] = ()
    """The anchor-mix decisions the checkpoint recorded (the resumed run pins them)."""


class Checkpointer:
    """Saves and loads the checkpoints of one run.

    Args:
        folder: the run's checkpoints folder.
        cfg: interval and retention options.
        is_main: whether this rank writes the shared files (rank 0).
    """

    def __init__(self, folder: CheckpointFolder, cfg: CheckpointConfig, is_main: bool):
        self.folder = folder
        self.cfg = cfg
        self.is_main = is_main
        self._components: dict[str, tuple[Stateful, bool]] = {}
        self._engine: Any = None
        self._optimizer: Optional[torch.optim.Optimizer] = None
        self._optimizer_params: list[str] = []

    def register(self, shared: dict[str, Optional[Stateful]], per_rank: dict[str, Optional[Stateful]]) -> None:
        """Save and restore these components under their names (None ones are left out): the main
        rank's state for all (``shared``), or each rank its own (``per_rank``)."""
        for components, is_per_rank in ((shared, False), (per_rank, True)):
            for name, component in components.items():
                assert name not in self._components, f"checkpoint component {name!r} registered twice"
                if component is not None:
                    self._components[name] = (component, is_per_rank)

    def register_engine(self, engine: Any, optimizer: torch.optim.Optimizer, optimizer_params: list[str]) -> None:
        """The DeepSpeed engine whose model and optimizer shards the checkpoints hold.

        Args:
            engine: the engine.
            optimizer: the torch optimizer it wraps (its parameter groups' settings are this run's).
            optimizer_params: the parameter names in that optimizer's order (``reshard.optimizer_param_names``).
        """
        self._engine, self._optimizer, self._optimizer_params = engine, optimizer, optimizer_params

    def due(self, step: int) -> bool:
        """Whether the step interval asks for a checkpoint after optimizer step ``step``."""
        return self.cfg.every_steps > 0 and step % self.cfg.every_steps == 0

    def latest(self) -> Optional[CheckpointTag]:
        """The checkpoint this run's ``latest`` names, if any."""
        return self.folder.latest() if self.folder.has_latest() else None

    def save(self, meta: CheckpointMeta, client_state: dict[str, Any]) -> CheckpointTag:
        """Write checkpoint ``step_{meta.step}`` on every rank (a collective), then move ``latest``.

        Args:
            meta: this run at the step (:func:`run_meta` with the step and epoch).
            client_state: recorded in DeepSpeed's model-states file for conversion tools (the
                config); not read back by a resume.

        Returns:
            The checkpoint.
        """
        tag = self.folder.tag(meta.step)
        self._engine.save_checkpoint(str(self.folder.path), tag=tag.name, client_state=client_state,
                                     save_latest=False)
        own = {name: component.state_dict() for name, (component, per_rank) in self._components.items() if per_rank}
        atomic_torch_save(own, tag.rank_state(dist.rank()))
        if self.is_main:
            shared = {name: component.state_dict()
                      for name, (component, per_rank) in self._components.items() if not per_rank}
            atomic_torch_save(shared, tag.shared_state)
            dataclasses.replace(meta, optimizer_params=tuple(self._optimizer_params)).write(tag)
        dist.barrier()  # every rank's files are complete before `latest` names this tag
        if self.is_main:
            self.folder.point_latest_at(tag)
            self._prune(keep=tag)
        dist.barrier()
        logger.info("checkpoint %s written", tag.path)
        return tag

    def load(self, point: ResumePoint, expected: CheckpointMeta) -> Resumed:
        """Resume from ``point`` (checked by :func:`find_resume_point`): the engine's model and
        optimizer, then every registered component (a collective).

        Args:
            point: the checkpoint and what it recorded.
            expected: :func:`run_meta` of this run.

        Returns:
            Where and how it resumed.

        Raises:
            CheckpointError: when the checkpoint is incomplete or a component cannot move to this layout.
        """
        tag, saved = point.tag, point.meta
        same_ranks = saved.world_size == expected.world_size
        resharded = not same_ranks or saved.zero_stage != expected.zero_stage
        conversion_s = self._load_engine(tag, saved) if resharded else self._load_engine_exactly(tag)
        shared = self._read(tag.shared_state)
        ranks = [dist.rank()] if same_ranks else list(range(saved.world_size))
        per_rank = [self._read(tag.rank_state(rank)) for rank in ranks]
        for name, (component, is_per_rank) in self._components.items():
            states = per_rank if is_per_rank else [shared]
            if any(name not in state for state in states):
                raise CheckpointError(f"checkpoint {tag.path} holds no saved {name!r} state: it was written without "
                                      f"it (train.ema.enabled=false, for 'ema') or by an older version; resume "
                                      f"without it or start fresh (train.resume=none)")
            if not is_per_rank or same_ranks:
                component.load_state_dict(states[0][name])
            elif hasattr(component, "load_resharded"):
                component.load_resharded([state[name] for state in states])
            else:
                raise CheckpointError(f"the {name!r} state of checkpoint {tag.path} cannot move from "
                                      f"{saved.world_size} to {expected.world_size} ranks; resume on "
                                      f"{saved.world_size} processes")
        how = (f"written on {saved.world_size} ranks at ZeRO stage {saved.zero_stage}, resharded to "
               f"{expected.world_size} ranks at stage {expected.zero_stage}") if resharded else "same layout"
        logger.info("resumed from %s (step %d, %s)", tag.path, saved.step, how)
        return Resumed(tag.path, saved.step, saved.world_size, saved.zero_stage, resharded, conversion_s,
                       saved.anchor_mix)

    def _load_engine_exactly(self, tag: CheckpointTag) -> None:
        load_path, _ = self._engine.load_checkpoint(str(tag.path.parent), tag=tag.name, load_optimizer_states=True,
                                                    load_lr_scheduler_states=False, load_module_strict=True)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint files in {tag.path}")

    def _load_engine(self, tag: CheckpointTag, saved: CheckpointMeta) -> Optional[float]:
        """Load the model and optimizer from the universal form of ``tag`` (made by the main rank if
        it is not there yet); returns the seconds the conversion took."""
        names = list(saved.optimizer_params) or self._optimizer_params  # older checkpoints did not record them
        outcome: Any = None
        if self.is_main:
            try:
                outcome = reshard.universal_checkpoint(tag, saved.zero_stage, names)
            except (OSError, RuntimeError, KeyError, ValueError, AssertionError) as err:
                outcome = f"cannot convert {tag.path} to DeepSpeed's universal form ({type(err).__name__}: {err})"
        outcome = dist.broadcast_object(outcome)
        if isinstance(outcome, str):
            raise CheckpointError(outcome + f"; resume on {saved.world_size} processes at deepspeed.zero_stage="
                                            f"{saved.zero_stage}")
        folder, seconds = outcome
        reshard.load_universal(self._engine, self._optimizer, Path(folder), names)
        return seconds

    @staticmethod
    def _read(path: Path) -> dict[str, Any]:
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: the checkpoint is incomplete")
        return torch.load(path, map_location="cpu", weights_only=False)

    def _prune(self, keep: CheckpointTag) -> None:
        """Delete all but the newest ``keep_last`` tags (never the one just written)."""
        if self.cfg.keep_last == 0:
            return
        tags = self.folder.tags()
        for tag in tags[: max(len(tags) - self.cfg.keep_last, 0)]:
            if tag != keep:
                shutil.rmtree(tag.path, ignore_errors=True)
                logger.info("removed old checkpoint %s", tag.path)
