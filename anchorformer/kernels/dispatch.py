"""Choose how anchor attention mixes its tokens: fused Triton kernels, torch.compile of the
PyTorch path, or the PyTorch path itself (``anchorformer.kernels.reference.anchor_mix``).

``auto`` (the default) picks Triton for CUDA tensors when triton imports and the shapes are
supported, else the PyTorch path; inside a model that torch.compile traces, the kernels enter
the graph as custom ops on CUDA and the compiler traces the PyTorch path elsewhere. Force a
backend with :func:`set_backend` or the environment variable ``ANCHORFORMER_ANCHOR_MIX``
(``auto``, ``triton``, ``compile``, ``torch``); the function wins over the variable.

Why these defaults (docs/benchmarks.md has every table):
- CPU: eager PyTorch. On the 2-core build machine, 1 thread (B=8, h=3, dh=64, m=30, fp32;
  section ``anchor-mix-cpu``): n=197 eager 6.1 ms vs compiled 7.0 ms, n=785 27.4 ms vs 26.7 ms,
  and torch.compile costs 5-34 s per new shape. Nothing pays for that.
- CUDA, eager model: Triton. On an H200, AnchorFormer-B training at 224 px, batch 128, runs at
  2973 img/s through the kernels (section ``model-224-cuda``); its 12 layers spend 2.3 ms of GPU
  time per step in them against DeiT-B's 3.7 ms in FlashAttention (``profile-cuda``). The mixing
  op alone (B=32, h=12, ``anchor-mix-cuda``) is 1.37x / 1.07x / 1.54x faster than eager at
  n = 197 / 785 / 4097; torch.compile of it is 1.48x / 1.14x / 1.22x, but a shape change
  recompiles (15 s), so eager models keep the kernels.
- CUDA, compiled model: the kernels as custom ops, 3409 img/s against 3364 img/s with the
  compiler fusing the PyTorch path (AnchorFormer-B, 224 px, ``model-224-compiled*-cuda``).
"""
import collections
import contextlib
import functools
import importlib.util
import logging
import os
from typing import Callable, Optional, Sequence

import torch
from torch.utils.flop_counter import register_flop_formula

from anchorformer.kernels.reference import anchor_mix

__all__ = ["BACKENDS", "ENV_VAR", "set_backend", "requested_backend", "select_backend", "anchor_mix_fast", "backend_calls"]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "compile", "torch")
ENV_VAR = "ANCHORFORMER_ANCHOR_MIX"
_forced_backend: Optional[str] = None
_calls_per_backend: collections.Counter = collections.Counter()
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None  # looked up, not imported


def _check_backend(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown anchor-mix backend {name!r} from {source}; choose from {list(BACKENDS)}")
    return name


def set_backend(name: Optional[str]) -> None:
    """Force the backend of :func:`anchor_mix_fast` for this process; None returns to the
    environment variable (or ``auto``).

    Args:
        name: one of ``BACKENDS`` or None.
    """
    global _forced_backend
    _forced_backend = None if name is None else _check_backend(name, "set_backend()")


def requested_backend() -> str:
    """The backend asked for: :func:`set_backend`'s, else ``$ANCHORFORMER_ANCHOR_MIX``, else ``auto``."""
    if _forced_backend is not None:
        return _forced_backend
    return _check_backend(os.environ.get(ENV_VAR, "auto"), f"${ENV_VAR}")


def backend_calls() -> dict[str, int]:
    """How many times :func:`anchor_mix_fast` ran each backend in this process (benchmarks and
    logs use it to show which path a model really took)."""
    return dict(_calls_per_backend)


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _triton_unsupported_reason(qk: torch.Tensor, anchors: torch.Tensor, v: torch.Tensor) -> Optional[str]:
    if not _TRITON_INSTALLED:
        return "triton is not installed"
    if not (qk.is_cuda or _triton_interpreted()):
        return f"tensors are on {qk.device}, the kernels need CUDA (or TRITON_INTERPRET=1)"
    from anchorformer.kernels import anchor_mix_triton

    return anchor_mix_triton.unsupported_reason(qk, anchors, v)


def select_backend(qk: torch.Tensor, anchors: torch.Tensor, v: torch.Tensor) -> str:
    """The backend that :func:`anchor_mix_fast` uses for these inputs: ``triton``, ``compile`` or ``torch``.

    Args:
        qk: (B, h, n, dh) tokens; anchors: (m, dh); v: (B, h, n, dh).

    Returns:
        The backend name. ``auto`` falls back to ``torch`` where the kernels cannot run; a
        forced ``triton`` raises ValueError naming the reason there instead.
    """
    requested = requested_backend()
    if requested in ("torch", "compile"):
        return requested
    reason = _triton_unsupported_reason(qk, anchors, v)
    if reason is None:
        return "triton"
    if requested == "triton":
        raise ValueError(f"anchor-mix backend 'triton' cannot run: {reason}; set {ENV_VAR}=auto to fall back to PyTorch")
    logger.debug("anchor mix runs the PyTorch path: %s", reason)
    return "torch"


def _kernel_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the tensor's (several GPUs per process)."""
    if tensor.is_cuda and tensor.device.index != torch.cuda.current_device():
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def _launch_forward(qk: torch.Tensor, anchors: torch.Tensor, v: torch.Tensor,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output, C and 1/Lambda of the Triton forward (the kernels round the anchors to the dtype of qk)."""
    from anchorformer.kernels import anchor_mix_triton

    with _kernel_device(qk):
        out, state = anchor_mix_triton.forward(qk, anchors, v, scale)
    return out, state.context, state.inv_degree


def _launch_backward(grad_out: torch.Tensor, qk: torch.Tensor, anchors: torch.Tensor, v: torch.Tensor, scale: float,
                     context: torch.Tensor, inv_degree: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of qk, anchors and v from the Triton backward."""
    from anchorformer.kernels import anchor_mix_triton

    with _kernel_device(qk):
        return anchor_mix_triton.backward(grad_out, qk, anchors, v, scale,
                                          anchor_mix_triton.ForwardState(context, inv_degree))


class _FusedAnchorMix(torch.autograd.Function):
    """The kernels under eager autograd: the shortest path from Python to the launches (the
    custom ops below cost about 0.8 ms more per forward + backward on an H200, see
    docs/benchmarks.md), taken whenever nothing traces or watches the dispatcher."""

    @staticmethod
    def forward(ctx, qk: torch.Tensor, anchors: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        out, context, inv_degree = _launch_forward(qk, anchors, v, scale)
        ctx.save_for_backward(qk, anchors, v, context, inv_degree)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        qk, anchors, v, context, inv_degree = ctx.saved_tensors
        return (*_launch_backward(grad_out, qk, anchors, v, ctx.scale, context, inv_degree), None)


# The same kernels as two torch custom ops, for whatever traces or watches the dispatcher:
# FlopCounterMode counts them with the formulas below (the maths' FLOPs, as for the PyTorch
# path), fake tensors get their shapes, and torch.compile keeps them as opaque calls without a
# graph break. Autograd runs the backward op.
_fused_forward = torch.library.custom_op("anchorformer::anchor_mix_forward", _launch_forward, mutates_args=())


@_fused_forward.register_fake
def _fused_forward_shapes(qk: torch.Tensor, anchors: torch.Tensor, v: torch.Tensor,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from anchorformer.kernels import anchor_mix_triton

    return anchor_mix_triton.forward_outputs_like(qk, anchors)


_fused_backward = torch.library.custom_op("anchorformer::anchor_mix_backward", _launch_backward, mutates_args=())


@_fused_backward.register_fake
def _fused_backward_shapes(grad_out: torch.Tensor, qk: torch.Tensor, anchors: torch.Tensor, v: torch.Tensor,
                           scale: float, context: torch.Tensor,
                           inv_degree: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from anchorformer.kernels import anchor_mix_triton

    return (anchor_mix_triton.token_major_like(qk), torch.empty_like(anchors, memory_format=torch.contiguous_format),
            anchor_mix_triton.token_major_like(v))


def _save_for_backward(ctx, inputs: tuple, output: tuple) -> None:
    qk, anchors, v, scale = inputs
    _, context, inv_degree = output
    ctx.save_for_backward(qk, anchors, v, context, inv_degree)
    ctx.scale = scale
    ctx.mark_non_differentiable(context, inv_degree)


def _backward(ctx, grad_out: torch.Tensor, _grad_context, _grad_inv_degree) -> tuple:
    qk, anchors, v, context, inv_degree = ctx.saved_tensors
    d_qk, d_anchors, d_v = _fused_backward(grad_out, qk, anchors, v, ctx.scale, context, inv_degree)
    return d_qk, d_anchors, d_v, None


_fused_forward.register_autograd(_backward, setup_context=_save_for_backward)


def _mix_macs(qk_shape: Sequence[int], anchors_shape: Sequence[int]) -> int:
    """Multiply-adds of one anchor mix: logits, A^T V and A C, each B h n m dh."""
    batch, heads, tokens, head_dim = qk_shape
    return 3 * batch * heads * tokens * anchors_shape[0] * head_dim


@register_flop_formula(torch.ops.anchorformer.anchor_mix_forward)
def _forward_flops(qk_shape, anchors_shape, v_shape, scale, **kwargs) -> int:
    return 2 * _mix_macs(qk_shape, anchors_shape)


@register_flop_formula(torch.ops.anchorformer.anchor_mix_backward)
def _backward_flops(grad_shape, qk_shape, anchors_shape, *args, **kwargs) -> int:
    return 4 * _mix_macs(qk_shape, anchors_shape)  # each product's two gradients: twice the forward


@functools.lru_cache(maxsize=1)
def _compiled_anchor_mix() -> Callable[..., torch.Tensor]:
    return torch.compile(anchor_mix)


def anchor_mix_fast(qk: torch.Tensor, anchors: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """:func:`~anchorformer.kernels.reference.anchor_mix` (same arguments, same result) through the
    backend :func:`select_backend` picks. Inside a region that torch.compile traces: the kernels as
    custom ops where ``triton`` is requested, or ``auto`` on CUDA; else the PyTorch path (the
    compiler fuses it). Under torch.export (ONNX, .pt2): always the PyTorch path, so that the
    exported graph holds standard ops only and runs anywhere.
    """
    if torch.compiler.is_exporting():
        return anchor_mix(qk, anchors, v, scale)
    if torch.compiler.is_compiling():
        # inside a torch.compile'd model: the kernels as opaque custom ops in the graph where
        # selected (auto: CUDA tensors only), else the compiler traces (and fuses) the PyTorch path
        requested = requested_backend()
        wanted = requested == "triton" or (requested == "auto" and qk.is_cuda)
        if wanted and _triton_unsupported_reason(qk, anchors, v) is None:
            return _fused_forward(qk, anchors, v, scale)[0]
        return anchor_mix(qk, anchors, v, scale)
    backend = select_backend(qk, anchors, v)
    _calls_per_backend[backend] += 1
    if backend == "triton":  # no cast of the anchors: the kernels round them on load
        if torch._C._len_torch_dispatch_stack() > 0:  # e.g. FlopCounterMode: let it see the op
            return _fused_forward(qk, anchors, v, scale)[0]
        return _FusedAnchorMix.apply(qk, anchors, v, scale)
    if backend == "compile":
        return _compiled_anchor_mix()(qk, anchors, v, scale)
    return anchor_mix(qk, anchors, v, scale)
