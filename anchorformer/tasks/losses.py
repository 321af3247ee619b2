"""Classification losses: soft-target cross-entropy (mixup), label smoothing, DeiT distillation."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Union

import timm
import torch
import torch.nn.functional as F
from torch import nn

from anchorformer.config import LossConfig

__all__ = ["soft_target_cross_entropy", "ClassificationLoss", "load_teacher"]

logger = logging.getLogger(__name__)

Logits = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum(targets * log_softmax(logits))`` (targets sum to 1 per row)."""
    return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()


class ClassificationLoss(nn.Module):
    """Cross-entropy on hard (int64) or soft (mixup, float) targets, optionally with DeiT
    distillation from a frozen teacher, as DeiT's ``DistillationLoss`` (facebookresearch/deit
    losses.py): ``(1 - alpha) * base(class logits) + alpha * distill(distillation logits)``, the
    teacher fed the same (mixed) images; hard: cross-entropy with the teacher's argmax, soft: KL at
    temperature tau, summed and divided by the logits' element count.

    Args:
        cfg: loss options.
        teacher: frozen teacher network; required when ``cfg.distillation`` is not 'none'.
    """

    def __init__(self, cfg: LossConfig, teacher: Optional[nn.Module] = None):
        super().__init__()
        if cfg.distillation != "none" and teacher is None:
            raise ValueError(f"loss.distillation={cfg.distillation} needs a teacher model")
        self.cfg = cfg
        self.teacher = teacher

    def base(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy against the labels (float logits for a stable softmax in bf16)."""
        logits = logits.float()
        if targets.is_floating_point():
            return soft_target_cross_entropy(logits, targets.float())
        return F.cross_entropy(logits, targets, label_smoothing=self.cfg.label_smoothing)

    def forward(self, outputs: Logits, targets: torch.Tensor,
                images: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Loss of ``outputs`` (logits, or (class-token logits, distillation-token logits) from a
        distilled model in training mode) for ``targets``; ``images`` feed the teacher."""
        class_logits, dist_logits = outputs if isinstance(outputs, tuple) else (outputs, None)
        base = self.base(class_logits, targets)
        if self.cfg.distillation == "none":
            return base
        if dist_logits is None:  # DeiT refuses this too: the class head would be distilled instead
            raise ValueError(f"loss.distillation={self.cfg.distillation} needs the (class, distillation) "
                             f"logits of a model with a distillation token in distilled training mode")
        if images is None:
            raise ValueError("distillation needs the input images for the teacher")
        with torch.no_grad():
            teacher_logits = self.teacher(images).float()
        dist_logits = dist_logits.float()
        if self.cfg.distillation == "soft":
            tau = self.cfg.distillation_tau
            distill = F.kl_div(F.log_softmax(dist_logits / tau, dim=-1),
                               F.log_softmax(teacher_logits / tau, dim=-1),
                               reduction="sum", log_target=True) * (tau * tau) / dist_logits.numel()
        else:
            distill = F.cross_entropy(dist_logits, teacher_logits.argmax(dim=-1))
        alpha = self.cfg.distillation_alpha
        return (1.0 - alpha) * base + alpha * distill


def load_teacher(cfg: LossConfig, num_classes: int, device: torch.device,
                 dtype: torch.dtype) -> Optional[nn.Module]:
    """The frozen teacher named by ``loss.teacher_model`` with weights from
    ``loss.teacher_checkpoint`` (None when distillation is off).

    Raises:
        ValueError: when the checkpoint file is missing or does not fit the teacher.
    """
    if cfg.distillation == "none":
        return None
    path = Path(cfg.teacher_checkpoint or "").expanduser()
    if not path.is_file():
        raise ValueError(f"loss.teacher_checkpoint={str(path)!r} does not exist; point it at the "
                         f"teacher's weights file")
    teacher = timm.create_model(cfg.teacher_model, num_classes=num_classes, **cfg.teacher_kwargs)
    try:
        timm.models.load_checkpoint(teacher, str(path), strict=True)
    except RuntimeError as err:
        raise ValueError(f"loss.teacher_checkpoint={str(path)!r} does not fit "
                         f"loss.teacher_model={cfg.teacher_model!r} with {num_classes} classes: "
                         f"{str(err).splitlines()[0]}") from err
    logger.info("distillation teacher %s loaded from %s", cfg.teacher_model, path)
    teacher.requires_grad_(False)
    return teacher.eval().to(device=device, dtype=dtype)
