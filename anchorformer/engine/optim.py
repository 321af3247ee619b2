"""Optimizer, parameter groups and the per-step learning-rate schedule."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn

from anchorformer.config import OptimConfig, RootConfig, ScheduleConfig

__all__ = ["SkippableStep", "AdamW", "SGD", "param_groups", "build_optimizer", "peak_lr",
           "LrSchedule", "set_lr"]

logger = logging.getLogger(__name__)


class SkippableStep:
    """Optimizer mixin: while ``skip_step`` is true, ``step()`` changes nothing (no update, no
    moment update). Every ZeRO stage ends in the basic optimizer's ``step()``, so this is where a
    step with a non-finite loss is dropped uniformly."""

    skip_step: bool = False

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        if self.skip_step:
            return None
        return super().step(closure)  # type: ignore[misc]


class AdamW(SkippableStep, torch.optim.AdamW):
    """torch AdamW whose step can be skipped."""


class SGD(SkippableStep, torch.optim.SGD):
    """torch SGD (Nesterov off) whose step can be skipped."""


def param_groups(model: nn.Module, optim: OptimConfig) -> list[dict[str, Any]]:
    """Parameter groups: no weight decay for 1-d parameters (norms, biases) and the names in the
    model's ``no_weight_decay()`` (cls/dist tokens, pos_embed); with ``layer_decay < 1`` each
    block's group carries ``lr_scale = layer_decay ** (depth - block)`` via ``group_matcher``.

    Args:
        model: the network (before DeepSpeed wraps it).
        optim: optimizer options.

    Returns:
        Groups for a torch optimizer, each with ``weight_decay`` and ``lr_scale``.
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    if optim.layer_decay < 1.0:
        groups = param_groups_layer_decay(model, weight_decay=optim.weight_decay,
                                          no_weight_decay_list=skip, layer_decay=optim.layer_decay)
    else:
        groups = param_groups_weight_decay(model, weight_decay=optim.weight_decay,
                                           no_weight_decay_list=skip)
    for group in groups:
        group.setdefault("lr_scale", 1.0)
    return groups


def build_optimizer(model: nn.Module, optim: OptimConfig, fused: bool = False) -> torch.optim.Optimizer:
    """The torch optimizer handed to ``deepspeed.initialize`` (which wraps it per ZeRO stage);
    ``fused`` selects torch's single-kernel implementation (GPUs)."""
    groups = param_groups(model, optim)
    if optim.name == "adamw":
        return AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps,
                     weight_decay=optim.weight_decay, fused=fused or None)
    return SGD(groups, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay,
               fused=fused or None)


def peak_lr(cfg: RootConfig) -> float:
    """Peak learning rate: ``optim.lr`` scaled linearly from ``optim.lr_reference_batch`` to the
    global batch (DeiT: 5e-4 x batch / 512); unscaled when the reference is 0."""
    reference = cfg.optim.lr_reference_batch
    lr = cfg.optim.lr * cfg.train.global_batch_size / reference if reference else cfg.optim.lr
    logger.info("peak lr %.3g (optim.lr %.3g, global batch %d, reference batch %s)", lr,
                cfg.optim.lr, cfg.train.global_batch_size, reference or "none")
    return lr


@dataclass(frozen=True)
class LrSchedule:
    """Per-optimizer-step learning rate: linear warm-up, then cosine decay (or constant)."""

    peak: float
    """Learning rate at the end of the warm-up."""
    warmup_steps: int
    """Steps of linear warm-up from warmup_lr."""
    total_steps: int
    """Steps of the whole run (the cosine reaches min_lr here)."""
    warmup_lr: float
    """Learning rate at step 0."""
    min_lr: float
    """Final learning rate of the cosine."""
    decay: str = "cosine"
    """'cosine' or 'constant' after the warm-up."""

    @classmethod
    def from_config(cls, schedule: ScheduleConfig, peak: float, steps_per_epoch: int,
                    total_steps: int) -> "LrSchedule":
        """Schedule for ``schedule`` with epochs converted to optimizer steps."""
        warmup = min(round(schedule.warmup_epochs * steps_per_epoch), max(total_steps - 1, 0))
        return cls(peak, warmup, total_steps, schedule.warmup_lr, schedule.min_lr, schedule.decay)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr + (self.peak - self.warmup_lr) * step / self.warmup_steps
        if self.decay == "constant":
            return self.peak
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        return self.min_lr + 0.5 * (self.peak - self.min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to ``lr x group['lr_scale']`` (layer-wise decay)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
