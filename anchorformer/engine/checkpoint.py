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

Layout of ``{run}/checkpoints``::

    step_{N}/            DeepSpeed tag folder (model, optimizer partitions)
      meta.json          model signature, precision, global batch, layout (checked before loading)
      trainer_shared.pt  the shared components' states (written by the main rank): trainer counters
      trainer_rank{r}.pt rank r's components: data-stream position, random generators, EMA chunk
      universal/         the universal form, made by the first resume on another layout
    latest               name of the newest complete tag, replaced only after all ranks wrote
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol

import torch
from torch import nn

from anchorformer import dist
from anchorformer.atomic import atomic_torch_save, atomic_write_bytes
from anchorformer.config import CheckpointConfig, RootConfig
from anchorformer.engine import reshard

__all__ = ["CheckpointError", "Checkpointer", "Resumed", "RngState", "Stateful", "model_signature", "resume_meta"]

logger = logging.getLogger(__name__)

_TAG = re.compile(r"step_(\d+)")
LATEST = "latest"
META = "meta.json"
SHARED = "trainer_shared.pt"


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


def resume_meta(signature: dict[str, Any], cfg: RootConfig, world_size: int) -> dict[str, Any]:
    """What :meth:`Checkpointer.check` compares a checkpoint with: this run's model
    (:func:`model_signature`), precision, global batch, optimizer and layout; the trainer writes it,
    with the step, into every checkpoint."""
    return {**signature, "precision": cfg.train.precision,
            "global_batch_size": cfg.train.global_batch_size, "optimizer": cfg.optim.name,
            "zero_stage": cfg.deepspeed.zero_stage, "world_size": world_size}


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


class Checkpointer:
    """Saves, finds and loads the checkpoints of one run.

    Args:
        directory: the run's checkpoints folder.
        cfg: interval and retention options.
        is_main: whether this rank writes the shared files (rank 0).
    """

    def __init__(self, directory: Path, cfg: CheckpointConfig, is_main: bool):
        self.directory = Path(directory)
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

    def save(self, step: int, meta: dict[str, Any], client_state: dict[str, Any]) -> Path:
        """Write checkpoint ``step_{step}`` on every rank (a collective), then move ``latest``.

        Args:
            step: optimizer steps done.
            meta: what a resume checks (:func:`resume_meta` plus the step and epoch).
            client_state: recorded in DeepSpeed's model-states file for conversion tools (the
                config); not read back by a resume.

        Returns:
            The tag folder.
        """
        tag = f"step_{step}"
        tag_dir = self.directory / tag
        self._engine.save_checkpoint(str(self.directory), tag=tag, client_state=client_state, save_latest=False)
        own = {name: component.state_dict() for name, (component, per_rank) in self._components.items() if per_rank}
        atomic_torch_save(own, tag_dir / f"trainer_rank{dist.rank()}.pt")
        if self.is_main:
            shared = {name: component.state_dict()
                      for name, (component, per_rank) in self._components.items() if not per_rank}
            atomic_torch_save(shared, tag_dir / SHARED)
            meta = {**meta, "optimizer_params": self._optimizer_params}
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
    def check(tag_dir: Path, expected: dict[str, Any]) -> dict[str, Any]:
        """Refuse a checkpoint this run cannot continue: another model, precision or global batch,
        or an optimizer whose state cannot move to this run's layout. Another number of ranks or
        ZeRO stage is accepted.

        Args:
            tag_dir: the checkpoint.
            expected: :func:`resume_meta` of this run.

        Returns:
            The checkpoint's metadata.

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
        precision = saved.get("precision", expected["precision"])  # older checkpoints did not record it
        if precision != expected["precision"]:
            raise CheckpointError(
                f"checkpoint {tag_dir} was written with train.precision={precision}; this run uses "
                f"{expected['precision']}. DeepSpeed stores weights and optimizer state differently in "
                f"each mode, so resuming needs the same precision: set train.precision={precision}, "
                f"or convert the checkpoint to fp32 weights and start from model.pretrained_checkpoint")
        batch = saved.get("global_batch_size", expected["global_batch_size"])
        if batch != expected["global_batch_size"]:
            raise CheckpointError(
                f"checkpoint {tag_dir} was written with train.global_batch_size={batch}; this run uses "
                f"{expected['global_batch_size']}. The learning-rate schedule and the data position count "
                f"steps of that batch: set train.global_batch_size={batch} (train.micro_batch_size and the "
                f"number of processes may change; the accumulation adapts)")
        layout = (saved.get("world_size"), saved.get("zero_stage"))
        optimizer = saved.get("optimizer", "adamw")
        if layout != (expected["world_size"], expected["zero_stage"]) and optimizer != "adamw":
            raise CheckpointError(
                f"checkpoint {tag_dir} was written with optim.name={optimizer} on {layout[0]} ranks at ZeRO "
                f"stage {layout[1]}; only AdamW's state moves to another layout (this run: "
                f"{expected['world_size']} ranks, stage {expected['zero_stage']}). Resume with "
                f"deepspeed.zero_stage={layout[1]} on {layout[0]} processes")
        return saved

    def load(self, resume: str, expected: dict[str, Any]) -> Optional[Resumed]:
        """Resume from the checkpoint ``resume`` names (see :meth:`find`), if any: the engine's
        model and optimizer, then every registered component (a collective).

        Args:
            resume: ``train.resume``.
            expected: :func:`resume_meta` of this run.

        Returns:
            Where and how it resumed; None when there was nothing to resume from.

        Raises:
            CheckpointError: when the checkpoint cannot be resumed by this run or is incomplete.
        """
        tag_dir = self.find(resume)
        if tag_dir is None:
            return None
        saved = self.check(tag_dir, expected)
        same_ranks = saved["world_size"] == expected["world_size"]
        resharded = not same_ranks or saved["zero_stage"] != expected["zero_stage"]
        conversion_s = self._load_engine(tag_dir, saved) if resharded else self._load_engine_exactly(tag_dir)
        shared = self._read(tag_dir / SHARED)
        ranks = [dist.rank()] if same_ranks else list(range(saved["world_size"]))
        per_rank = [self._read(tag_dir / f"trainer_rank{rank}.pt") for rank in ranks]
        for name, (component, is_per_rank) in self._components.items():
            states = per_rank if is_per_rank else [shared]
            if any(name not in state for state in states):
                raise CheckpointError(f"checkpoint {tag_dir} holds no saved {name!r} state: it was written without "
                                      f"it (train.ema.enabled=false, for 'ema') or by an older version; resume "
                                      f"without it or start fresh (train.resume=none)")
            if not is_per_rank or same_ranks:
                component.load_state_dict(states[0][name])
            elif hasattr(component, "load_resharded"):
                component.load_resharded([state[name] for state in states])
            else:
                raise CheckpointError(f"the {name!r} state of checkpoint {tag_dir} cannot move from "
                                      f"{saved['world_size']} to {expected['world_size']} ranks; resume on "
                                      f"{saved['world_size']} processes")
        step = int(saved.get("step", -1))
        how = (f"written on {saved['world_size']} ranks at ZeRO stage {saved['zero_stage']}, resharded to "
               f"{expected['world_size']} ranks at stage {expected['zero_stage']}") if resharded else "same layout"
        logger.info("resumed from %s (step %d, %s)", tag_dir, step, how)
        return Resumed(tag_dir, step, saved["world_size"], saved["zero_stage"], resharded, conversion_s)

    def _load_engine_exactly(self, tag_dir: Path) -> None:
        load_path, _ = self._engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True,
                                                    load_lr_scheduler_states=False, load_module_strict=True)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint files in {tag_dir}")

    def _load_engine(self, tag_dir: Path, saved: dict[str, Any]) -> Optional[float]:
        """Load the model and optimizer from the universal form of ``tag_dir`` (made by the main
        rank if it is not there yet); returns the seconds the conversion took."""
        names = saved.get("optimizer_params") or self._optimizer_params  # older checkpoints did not record them
        outcome: Any = None
        if self.is_main:
            try:
                outcome = reshard.universal_checkpoint(tag_dir, saved["zero_stage"], names)
            except (OSError, RuntimeError, KeyError, ValueError, AssertionError) as err:
                outcome = f"cannot convert {tag_dir} to DeepSpeed's universal form ({type(err).__name__}: {err})"
        outcome = dist.broadcast_object(outcome)
        if isinstance(outcome, str):
            raise CheckpointError(outcome + f"; resume on {saved['world_size']} processes at deepspeed.zero_stage="
                                            f"{saved['zero_stage']}")
        folder, seconds = outcome
        reshard.load_universal(self._engine, self._optimizer, Path(folder), names)
        return seconds

    @staticmethod
    def _read(path: Path) -> dict[str, Any]:
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: the checkpoint is incomplete")
        return torch.load(path, map_location="cpu", weights_only=False)

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
