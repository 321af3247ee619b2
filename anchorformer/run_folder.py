"""The run folder: the name of every file a run writes, the checkpoint layout, and the typed
metadata of a checkpoint. Every module that reads or writes a run asks this one; none spells a
name of its own.

    {logging.output_dir}/{logging.run_name}/   RunFolder(root), RunFolder.of(cfg)
      config.yaml            .config         the resolved config (a folder holding it is a run)
      summary.json           .summary        how the run ended (the trainer)
      tensorboard/           .tensorboard    event files
      run.lock               .lock           the job that uses the folder (engine/run_lock.py)
      slurm/                 .slurm          submitit's pickles and logs (launch/submit.py)
      slurm_job_id.txt       .slurm_job_id   the last job submitted for the run
      eval/                  .evaluations    launch/eval.py results
      export/                .exports        tools/export.py's default outputs
      init/from_vit.safetensors .warm_start  the ViT/DeiT the run starts from, as an AnchorFormer
      linear_baseline.json   .baseline       the linear classifier on pixels beside a small run
      failures/              .failures       the failures ledger: one record per start and rank
        {attempt}_rank{r}.json .failure_record(attempt, r)  what ended that start on rank r (engine/failures.py)
      heartbeats/            .heartbeats     the hang watchdog's proof of life of each rank
        rank{r}.json         .heartbeat(r)   host, pid, step, time (engine/watchdog.py)
      hang/                  .hang           Python stacks of every thread, written when a run hangs
        {attempt}_rank{r}.txt .hang_stacks(attempt, r)
      checkpoints/           .checkpoints    a CheckpointFolder:
        latest                               the newest complete tag, replaced after every rank wrote
        step_{N}/                            a CheckpointTag: DeepSpeed's model/optimizer files and
          meta.json                          CheckpointMeta: what a resume checks
          trainer_shared.pt                  the shared components' states (main rank)
          trainer_rank{r}.pt                 rank r's components' states
          universal/                         DeepSpeed's universal form, made by the first reshard

The EMA's entry in ``trainer_rank{r}.pt`` (:class:`EmaLayout`) is part of the layout: the trainer
writes it and conversion reads it without the trainer.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from anchorformer.atomic import atomic_write_bytes
from anchorformer.config import RootConfig

if TYPE_CHECKING:
    import torch

__all__ = ["RunFolder", "CheckpointFolder", "CheckpointTag", "CheckpointMeta", "CheckpointMetaError", "EmaLayout",
           "META_VERSION"]


@dataclass(frozen=True)
class RunFolder:
    """The folder of one run and the paths of what it holds."""

    root: Path

    @classmethod
    def of(cls, cfg: RootConfig) -> RunFolder:
        """The run folder of a config: ``{logging.output_dir}/{logging.run_name}`` (``run`` when unnamed)."""
        return cls(Path(cfg.logging.output_dir) / (cfg.logging.run_name or "run"))

    def absolute(self) -> RunFolder:
        """The same folder by its absolute path (for a job that may run from elsewhere)."""
        return RunFolder(self.root.absolute())

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def lock(self) -> Path:
        return self.root / "run.lock"

    @property
    def slurm(self) -> Path:
        return self.root / "slurm"

    @property
    def slurm_job_id(self) -> Path:
        return self.root / "slurm_job_id.txt"

    @property
    def evaluations(self) -> Path:
        return self.root / "eval"

    @property
    def exports(self) -> Path:
        return self.root / "export"

    @property
    def failures(self) -> Path:
        return self.root / "failures"

    def failure_record(self, attempt: str, rank: int) -> Path:
        """What ended start ``attempt`` (a launcher's id of one start of the run) on rank ``rank``."""
        return self.failures / f"{attempt}_rank{rank}.json"

    @property
    def heartbeats(self) -> Path:
        return self.root / "heartbeats"

    def heartbeat(self, rank: int) -> Path:
        """Rank ``rank``'s newest proof of life."""
        return self.heartbeats / f"rank{rank}.json"

    @property
    def hang(self) -> Path:
        return self.root / "hang"

    def hang_stacks(self, attempt: str, rank: int) -> Path:
        """Rank ``rank``'s Python stacks when start ``attempt`` hung."""
        return self.hang / f"{attempt}_rank{rank}.txt"

    @property
    def baseline(self) -> Path:
        """The linear baseline beside a small run (engine/baseline.py)."""
        return self.root / "linear_baseline.json"

    @property
    def warm_start(self) -> Path:
        """The AnchorFormer export of the ViT/DeiT the run starts from (engine/warm_start.py)."""
        return self.root / "init" / "from_vit.safetensors"

    @property
    def checkpoints(self) -> CheckpointFolder:
        return CheckpointFolder(self.root / "checkpoints")

    def is_run(self) -> bool:
        """Whether the folder holds a run of this framework (its resolved config)."""
        return self.config.is_file()


_TAG = re.compile(r"step_(\d+)")


@dataclass(frozen=True)
class CheckpointTag:
    """One checkpoint: a DeepSpeed tag folder with the trainer's files beside DeepSpeed's."""

    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def meta(self) -> Path:
        return self.path / "meta.json"

    @property
    def shared_state(self) -> Path:
        return self.path / "trainer_shared.pt"

    def rank_state(self, rank: int) -> Path:
        """Rank ``rank``'s components (data position, random generators, EMA chunk)."""
        return self.path / f"trainer_rank{rank}.pt"

    def rank_states(self) -> list[Path]:
        """Every rank's file present, in rank order."""
        found = [(int(m.group(1)), p) for p in self.path.glob("trainer_rank*.pt")
                 if (m := re.fullmatch(r"trainer_rank(\d+)\.pt", p.name))]
        return [path for _, path in sorted(found)]

    @property
    def universal(self) -> Path:
        return self.path / "universal"

    def is_complete(self) -> bool:
        """Whether the trainer finished writing it (the meta is written last of the tag's files)."""
        return self.meta.is_file()


@dataclass(frozen=True)
class CheckpointFolder:
    """A run's ``checkpoints`` folder: tags ``step_{N}`` and the ``latest`` pointer."""

    path: Path

    @property
    def latest_pointer(self) -> Path:
        return self.path / "latest"

    def tag(self, step: int) -> CheckpointTag:
        """The checkpoint written after optimizer step ``step``."""
        return CheckpointTag(self.path / f"step_{step}")

    def tags(self) -> list[CheckpointTag]:
        """Every tag folder present, oldest step first."""
        if not self.path.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.path.iterdir() if p.is_dir() and (m := _TAG.fullmatch(p.name))]
        return [CheckpointTag(path) for _, path in sorted(found)]

    def has_latest(self) -> bool:
        return self.latest_pointer.is_file()

    def latest(self) -> CheckpointTag:
        """The tag ``latest`` names.

        Raises:
            CheckpointMetaError: when there is no pointer, or it names an incomplete tag.
        """
        if not self.has_latest():
            raise CheckpointMetaError(f"{self.path} has no '{self.latest_pointer.name}' file: no checkpoint was "
                                      "completed there")
        name = self.latest_pointer.read_text().strip()
        tag = CheckpointTag(self.path / name)
        if not tag.is_complete():
            raise CheckpointMetaError(f"{self.latest_pointer} names {name!r}, but {tag.path} is not a complete "
                                      "checkpoint")
        return tag

    def point_latest_at(self, tag: CheckpointTag) -> None:
        """Make ``latest`` name ``tag`` (atomically: a reader sees the old or the new name)."""
        atomic_write_bytes(self.latest_pointer, tag.name.encode())


class CheckpointMetaError(ValueError):
    """A checkpoint whose metadata is missing, unreadable or of an unknown version."""


META_VERSION = 2
"""Version 1: the untyped dict of the first trainers (no ``version``; precision, global batch,
optimizer and layout missing in the oldest). Version 2: :class:`CheckpointMeta`."""


@dataclass(frozen=True)
class CheckpointMeta:
    """What a checkpoint says about the run that wrote it; a resume checks it before loading.
    ``None``: not recorded (version 1 checkpoints)."""

    model: str
    """``model.name`` of the run."""
    num_params: int
    """Parameters of the network."""
    param_hash: str
    """Hash of every parameter's (name, shape): the same network, whatever its name."""
    step: int = -1
    """Optimizer steps done (-1: not recorded)."""
    epoch: int = -1
    """Epochs fully done (-1: not recorded)."""
    precision: Optional[str] = None
    """``train.precision``: DeepSpeed stores weights and optimizer state differently in each mode."""
    global_batch_size: Optional[int] = None
    """``train.global_batch_size``: the schedule and the data position count steps of it."""
    optimizer: Optional[str] = None
    """``optim.name``."""
    zero_stage: Optional[int] = None
    """``deepspeed.zero_stage`` of the writer."""
    world_size: Optional[int] = None
    """Ranks of the writer."""
    optimizer_params: tuple[str, ...] = ()
    """Parameter names in the optimizer's order (a reshard maps optimizer state by them)."""
    anchor_mix: tuple[dict[str, Any], ...] = ()
    """The anchor-mix backends the run chose (``kernels.autotune.decisions()``), pinned again on resume."""
    version: int = META_VERSION

    def write(self, tag: CheckpointTag) -> None:
        """Write ``meta.json`` of ``tag`` (atomically)."""
        atomic_write_bytes(tag.meta, json.dumps(asdict(self), indent=2).encode())

    @classmethod
    def read(cls, tag: CheckpointTag) -> CheckpointMeta:
        """The metadata of ``tag``, of any known version.

        Raises:
            CheckpointMetaError: when it is missing, unreadable or of a newer version.
        """
        try:
            data = json.loads(tag.meta.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CheckpointMetaError(f"checkpoint {tag.path} has no readable {tag.meta.name}: {err}") from err
        if not isinstance(data, dict):
            raise CheckpointMetaError(f"{tag.meta} holds a JSON {type(data).__name__}, not a checkpoint's metadata")
        version = data.get("version", 1)
        if version > META_VERSION:
            raise CheckpointMetaError(f"{tag.meta} is of version {version}, newer than this code reads "
                                      f"({META_VERSION}); resume or convert it with the newer version")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["optimizer_params"] = tuple(values.get("optimizer_params") or ())
        values["anchor_mix"] = tuple(values.get("anchor_mix") or ())
        values["version"] = META_VERSION
        try:
            return cls(**values)
        except TypeError as err:  # a required field absent
            raise CheckpointMetaError(f"{tag.meta} lacks what every checkpoint records ({err})") from err


class EmaLayout:
    """The EMA's state in each rank's ``trainer_rank{r}.pt`` under ``ENTRY``: ``decay``, ``updates`` and
    ``chunks``, rank r's equal zero-padded slice of every flattened average (which is the
    average's ZeRO-3 partition), so that every rank's chunks in rank order make it whole.
    Checkpoints written before this layout saved ``shadow``: whole weights on rank 0 only, ZeRO-3
    partitions on every rank; the ranks holding a weight, in rank order, make it whole too."""

    ENTRY = "ema"
    CHUNKS = "chunks"
    LEGACY = "shadow"

    @staticmethod
    def state(decay: float, updates: int, chunks: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The state one rank saves."""
        return {"decay": decay, "updates": updates, EmaLayout.CHUNKS: chunks}

    @staticmethod
    def chunk(state: dict[str, Any], name: str) -> Optional[torch.Tensor]:
        """Rank's saved chunk of average ``name``, flat; None when it has none."""
        chunk = state.get(EmaLayout.CHUNKS, {}).get(name)
        return None if chunk is None else chunk.reshape(-1).float()

    @staticmethod
    def whole(states: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Every average flattened (possibly zero-padded at its end) from all ranks' states in rank
        order, in either layout.

        Raises:
            ValueError: when the states are in no known layout.
        """
        import torch  # here, not at the top: the folder's names need no torch

        for layout in (EmaLayout.CHUNKS, EmaLayout.LEGACY):
            if states and all(layout in state for state in states):
                return {key: torch.cat([state[layout][key].reshape(-1).float()
                                        for state in states if key in state[layout]])
                        for key in states[0][layout]}
        raise ValueError(f"the EMA states are in no known layout (neither '{EmaLayout.CHUNKS}' nor "
                         f"'{EmaLayout.LEGACY}' on every rank)")
