"""The run's side of the anchor-mix backend (``train.anchor_mix``): a forced backend judged before
any work, and ``auto``'s decisions made once, the same on every rank and across a resume.

``kernels.autotune`` times the backends of each call shape the first time a process meets it. A
run must not let its ranks (or its resumed self) decide apart: before the first step rank 0
measures the shapes the classifier trains and evaluates with, on synthetic tensors and before the
loader workers start, every rank pins rank 0's table, and the table goes into each checkpoint's
meta, summary.json and TensorBoard; a resume pins the checkpoint's table first, so it takes the
path the interrupted run took. Shapes no one measured up front (a dense task's image sizes, the
last partial validation batch) are measured where they first occur, on each rank.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

from anchorformer import dist
from anchorformer.config import RootConfig
from anchorformer.kernels import autotune, requested_backend, set_backend, unavailable_reason
from anchorformer.models import AnchorAttention

__all__ = ["MixShape", "mix_shapes", "forced_backend_refusal", "select", "agree"]

logger = logging.getLogger(__name__)

_TOKEN_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "bf16-mixed": torch.bfloat16, "fp16": torch.float16}
"""The dtype of the mixed tokens under each train.precision (bf16-mixed: autocast's bf16)."""
_ANCHOR_DTYPES = {**_TOKEN_DTYPES, "bf16-mixed": torch.float32}
"""The dtype of the anchor weight (bf16-mixed keeps fp32 weights)."""


@dataclass(frozen=True)
class MixShape:
    """The mixing op's shape in a model's anchor layers (all of them: one width and anchor count)."""

    heads: int
    head_dim: int
    anchors: int
    tokens: Optional[int]
    """Tokens per image, prefix tokens included; None where the image size varies (dense tasks)."""


def mix_shapes(model: nn.Module) -> list[MixShape]:
    """The distinct mixing shapes of ``model``'s anchor layers (none for a model without any)."""
    patches = getattr(getattr(model, "patch_embed", None), "num_patches", None)
    tokens = patches + model.num_prefix_tokens if patches is not None and not getattr(model, "dynamic_img_size", True) \
        else None
    shapes = {MixShape(layer.num_heads, layer.head_dim, layer.num_anchors, tokens)
              for layer in model.modules() if isinstance(layer, AnchorAttention)}
    return sorted(shapes, key=lambda shape: (shape.heads, shape.head_dim, shape.anchors))


def forced_backend_refusal(network: nn.Module, cfg: RootConfig, device: str) -> Optional[str]:
    """Why the ``train.anchor_mix`` backend cannot run ``network``'s anchor layers on ``device``
    at ``train.precision``; None when it can (or for ``auto``, or a network without anchor layers)."""
    backend = cfg.train.anchor_mix
    if backend == "auto":
        return None
    precision = cfg.train.precision
    for shape in mix_shapes(network):
        reason = unavailable_reason(backend, device, _TOKEN_DTYPES[precision], shape.head_dim, shape.anchors,
                                    _ANCHOR_DTYPES[precision])
        if reason is not None:
            return reason
    return None


def select(cfg: RootConfig) -> None:
    """Make ``train.anchor_mix`` this process's backend (``auto``: the environment's default,
    ``$ANCHORFORMER_ANCHOR_MIX`` or measured)."""
    set_backend(None if cfg.train.anchor_mix == "auto" else cfg.train.anchor_mix)


def agree(model: nn.Module, cfg: RootConfig, device: torch.device, is_main: bool,
          recorded: Sequence[dict[str, Any]] = (), eval_batches: Sequence[int] = ()) -> list[dict[str, Any]]:
    """Make ``auto``'s decisions for the classifier's training and evaluation shapes, the same on
    every rank (a collective): a checkpoint's ``recorded`` table first (entries of this device
    type), then rank 0 measures what is still open, then every rank pins rank 0's table.

    Args:
        eval_batches: batch sizes of forward-only calls besides the micro-batch's (the anchor probe).

    Returns:
        Every decision of this process (``kernels.autotune.decisions()``).
    """
    if requested_backend() != "auto":
        return autotune.decisions()
    autotune.pin([entry for entry in recorded if entry.get("device") == device.type])
    if is_main:
        token_dtype, anchor_dtype = _TOKEN_DTYPES[cfg.train.precision], _ANCHOR_DTYPES[cfg.train.precision]
        for shape in mix_shapes(model):
            if shape.tokens is None:
                continue  # measured where each image size first occurs
            micro = cfg.train.micro_batch_size
            for batch, train in ((micro, True), *((size, False) for size in dict.fromkeys((micro, *eval_batches)))):
                autotune.measure(batch, shape.heads, shape.tokens, shape.head_dim, shape.anchors, token_dtype, device,
                                 train, anchor_dtype)
    table = dist.broadcast_object(autotune.decisions() if is_main else None)
    if not is_main:
        autotune.pin(table)
    if table and is_main:
        logger.info("anchor-mix backends (train.anchor_mix=auto):\n%s", autotune.format_table(table))
    return autotune.decisions()
