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

__all__ = ["AdamW", "SGD", "skip_step_where", "param_groups", "build_optimizer", "peak_lr", "LrSchedule",
           "set_lr"]

logger = logging.getLogger(__name__)


class AdamW(torch.optim.AdamW):
    """torch's AdamW, always with its fused kernel (one launch per step on GPUs, vectorised on the
    CPU), the implementation that honours :func:`skip_step_where`."""

    def __init__(self, params: Any, **kwargs: Any):
        super().__init__(params, fused=True, **kwargs)


class SGD(torch.optim.SGD):
    """torch's SGD (Nesterov off) with its fused kernel, whose momentum buffers start at zero:
    torch's fused kernel allocates them uninitialised at the first step and, when
    :func:`skip_step_where` skips that step, would keep the garbage. ``0 * momentum + grad`` is
    exactly the first step's ``buffer = grad``, so nothing else changes."""

    def __init__(self, params: Any, **kwargs: Any):
        super().__init__(params, fused=True, **kwargs)
        self._buffers_ready = False

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        if not self._buffers_ready:  # once: ZeRO hands the optimizer its partitions before the first step
            for group in self.param_groups:
                if group["momentum"]:
                    for param in group["params"]:
                        self.state[param].setdefault("momentum_buffer", torch.zeros_like(param))
            self._buffers_ready = True
        return super().step(closure)


def skip_step_where(optimizer: torch.optim.Optimizer, skip: torch.Tensor, device: torch.device) -> None:
    """Make the optimizer's next ``step()`` change nothing (weights, moments, step counts) where
    ``skip`` is 1, decided on the device: the host never reads the flag.

    torch's fused AdamW / SGD kernels read ``optimizer.found_inf`` as ``GradScaler`` sets it. Every
    ZeRO stage ends in this basic optimizer's ``step()`` (DeepSpeed's wrappers call it on their fp32
    partitions, ZeRO-3 once per sub-group), so this drops a step uniformly.

    Args:
        optimizer: the optimizer of :func:`build_optimizer`.
        skip: 0-dim float tensor, 1.0 to skip and 0.0 to apply the step.
        device: where the optimizer's state lives: the training device, or the CPU under
            ``deepspeed.offload_optimizer=cpu`` (the flag is then copied there, waiting for the
            device: the offloaded update waits for it anyway).
    """
    optimizer.found_inf = skip if skip.device == device else skip.to(device)


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


def build_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    """The torch optimizer handed to ``deepspeed.initialize`` (which wraps it per ZeRO stage):
    fused AdamW or SGD, whose step :func:`skip_step_where` can drop on the device."""
    groups = param_groups(model, optim)
    if optim.name == "adamw":
        return AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay)
    return SGD(groups, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)


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
