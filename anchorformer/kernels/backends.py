"""The anchor mix's concrete backends: what each name runs, and why one cannot run somewhere.

    triton   the fused Triton kernels (``triton_ops``): CUDA tensors, or any under TRITON_INTERPRET=1
    compile  torch.compile of the PyTorch path, compiled once per new shape
    sdpa     two ``F.scaled_dot_product_attention`` calls (``sdpa``)
    torch    the PyTorch path (``reference``), which runs everywhere

Each computes ``reference.anchor_mix`` exactly (up to rounding); the dispatcher picks one.
"""
import functools
from typing import Callable, Optional

import torch

from anchorformer.kernels import triton_ops
from anchorformer.kernels.reference import anchor_mix
from anchorformer.kernels.sdpa import anchor_mix_sdpa

__all__ = ["NAMES", "inputs_reason", "unavailable_reason", "run"]

NAMES = ("triton", "compile", "sdpa", "torch")


def _check_name(name: str) -> None:
    if name not in NAMES:
        raise ValueError(f"unknown anchor-mix backend {name!r}; choose from {list(NAMES)}")


def inputs_reason(name: str, device: torch.device, qk: torch.Tensor, anchors: torch.Tensor,
                  v: torch.Tensor) -> Optional[str]:
    """Why backend ``name`` cannot mix these inputs on ``device``, or None when it can.

    Args:
        name: one of ``NAMES``.
        device: where it would run (the tensors may be on the meta device).
        qk: (B, h, n, dh) tokens; anchors: (m, dh); v: (B, h, n, dh).
    """
    _check_name(name)
    if not all(t.dtype.is_floating_point for t in (qk, anchors, v)):
        return f"dtypes qk={qk.dtype}, v={v.dtype}, anchors={anchors.dtype}: the anchor mix needs floating point"
    if name == "triton":
        return triton_ops.unsupported_reason(device, qk, anchors, v)
    return None


def unavailable_reason(name: str, device: torch.device | str, dtype: torch.dtype, head_dim: int, num_anchors: int,
                       anchor_dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """Why backend ``name`` cannot run a model's anchor mix, asked before any work (a pre-flight).

    Args:
        name: one of ``NAMES``, or ``auto`` (always runs: it falls back to ``torch``).
        device: the device of the run, e.g. ``cuda`` or ``cpu``.
        dtype: dtype of the tokens (bf16 under bf16 autocast or DeepSpeed's bf16 mode).
        head_dim: dh; num_anchors: m.
        anchor_dtype: dtype of the anchor weight when it differs (fp32 weights under autocast).

    Returns:
        A sentence naming the reason, or None when it can run.
    """
    if name == "auto":
        return None
    qk = torch.empty(1, 1, 1, head_dim, dtype=dtype, device="meta")  # shapes and dtypes only, no memory
    anchors = torch.empty(num_anchors, head_dim, dtype=anchor_dtype or dtype, device="meta")
    return inputs_reason(name, torch.device(device), qk, anchors, qk)


@functools.lru_cache(maxsize=1)
def _compiled_anchor_mix() -> Callable[..., torch.Tensor]:
    return torch.compile(anchor_mix)


def _compiled(qk: torch.Tensor, anchors: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return _compiled_anchor_mix()(qk, anchors, v, scale)


_RUNNERS = {"triton": triton_ops.apply, "compile": _compiled, "sdpa": anchor_mix_sdpa, "torch": anchor_mix}


def run(name: str, qk: torch.Tensor, anchors: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """The anchor mix of these inputs through backend ``name`` in eager mode (no check: ask
    :func:`inputs_reason` first)."""
    return _RUNNERS[name](qk, anchors, v, scale)
