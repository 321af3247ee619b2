"""The contract between the trainer and what it trains. The trainer is generic over a
:class:`Task`: classification, detection and segmentation differ only in their model, data, loss
and evaluation. ``TASKS`` maps ``cfg.task`` to the class (imported lazily)."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Iterable, Protocol, runtime_checkable

import torch
from torch import nn

from anchorformer.config import RootConfig
from anchorformer.dist import DistEnv

__all__ = ["Runtime", "TrainStreamLike", "Task", "TASKS", "task_class", "build_task"]


@dataclass(frozen=True)
class Runtime:
    """Where a task's tensors live."""

    env: DistEnv
    """This process's place in the job."""
    device: torch.device
    """Device of the model and of every batch."""
    dtype: torch.dtype
    """Dtype of the model's weights and floating inputs (bf16 / fp16 / fp32)."""


@runtime_checkable
class TrainStreamLike(Protocol):
    """What the trainer needs from a training stream (anchorformer.data.TrainStream fits)."""

    steps_per_epoch: int

    def set_epoch(self, epoch: int) -> None: ...
    def __iter__(self) -> Any: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def skip_counts(self) -> dict[str, int]: ...


class Task(Protocol):
    """One kind of training. Built as ``task_class(cfg.task)(cfg, runtime)``.

    ``main_metric`` names the key of :meth:`evaluate`'s result used to pick the best checkpoint
    (higher is better).
    """

    main_metric: str

    @classmethod
    def preflight(cls, cfg: RootConfig, world_size: int) -> nn.Module:
        """Refuse a run of this task that would fail after start-up, before any work: every input
        it reads (files, shards against ``world_size`` readers, a teacher) and its network, built
        on the meta device by its real constructor and returned (a resume's signature is computed
        from it). Raises ``ConfigError`` naming the key (``tasks.preflight`` has the pieces)."""

    def build_model(self) -> nn.Module:
        """The network on the CPU, weights initialised (and pre-trained weights loaded)."""

    def example_input(self) -> Any:
        """One input sample with batch size 1 on ``runtime.device`` (FLOP counting)."""

    def build_data(self) -> dict[str, Any]:
        """``{"train": TrainStreamLike, "val": iterable of batches}`` for this rank."""

    def training_loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """Forward ``batch`` through ``model`` (the DeepSpeed engine) and return the scalar loss
        to back-propagate and extra values to log (already Python floats; may be empty)."""

    def evaluate(self, model: nn.Module, val: Iterable[Any]) -> dict[str, float]:
        """Metrics over the whole validation set, reduced over ranks (identical on every rank).
        Every rank must run the same number of forwards (see ``dist.in_lockstep``)."""


TASKS: dict[str, str] = {
    "classification": "anchorformer.tasks.classification:ClassificationTask",
    "detection": "anchorformer.tasks.detection:DetectionTask",
    "segmentation": "anchorformer.tasks.segmentation:SegmentationTask",
}
"""Task name -> ``module:Class``, imported on first use."""


def task_class(name: str) -> type:
    """The task class registered as ``name``.

    Raises:
        ValueError: for an unknown name, or a registered task whose module is not installed.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    module_name, class_name = TASKS[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        raise ValueError(f"task {name!r} is registered but {module_name} is not available in this "
                         f"installation") from err
    return getattr(module, class_name)


def build_task(cfg: RootConfig, runtime: Runtime) -> Task:
    """The task named by ``cfg.task``, constructed for this process."""
    return task_class(cfg.task)(cfg, runtime)
