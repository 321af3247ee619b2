"""The fused Triton kernels (``anchor_mix_triton``) as PyTorch ops: an ``autograd.Function`` for
eager autograd and two custom ops for whatever traces or watches the dispatcher.

:func:`apply` is the eager entry: the ``autograd.Function`` (the fewest host instructions per
launch) unless a dispatch mode watches (FlopCounterMode, fake tensors), which then sees the custom
ops ``anchorformer::anchor_mix_forward`` / ``_backward``; :func:`custom_op_forward` is the entry
inside a graph that torch.compile traces. The custom ops carry FLOP formulas (the maths' FLOPs, as
for the PyTorch path) and their outputs' shapes, so they stay one opaque node in a compiled graph.
Importing this module does not import triton (the kernels load on first launch).
"""
import contextlib
import importlib.util
import os
from typing import Optional, Sequence

import torch
from torch.utils.flop_counter import register_flop_formula

__all__ = ["unsupported_reason", "apply", "custom_op_forward"]

_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None  # looked up, not imported


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def unsupported_reason(device: torch.device, qk: torch.Tensor, anchors: torch.Tensor,
                       v: torch.Tensor) -> Optional[str]:
    """Why the kernels cannot run these inputs on ``device``, or None when they can.

    Args:
        device: where they would run (the tensors may be on the meta device, to ask before any work).
        qk: (B, h, n, dh) tokens; anchors: (m, dh); v: (B, h, n, dh).

    Returns:
        A sentence naming the reason, or None.
    """
    if not _TRITON_INSTALLED:
        return "triton is not installed"
    if not (device.type == "cuda" or _interpreted()):
        return f"tensors are on {device}, the kernels need CUDA (or TRITON_INTERPRET=1)"
    from anchorformer.kernels import anchor_mix_triton

    return anchor_mix_triton.unsupported_reason(qk, anchors, v)


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



def apply(qk: torch.Tensor, anchors: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """The kernels' anchor mix in eager mode (no cast of the anchors: the kernels round them on load)."""
    if torch._C._len_torch_dispatch_stack() > 0:  # e.g. FlopCounterMode: let it see the op
        return _fused_forward(qk, anchors, v, scale)[0]
    return _FusedAnchorMix.apply(qk, anchors, v, scale)


def custom_op_forward(qk: torch.Tensor, anchors: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """The kernels' anchor mix as the custom op, for graphs that torch.compile traces."""
    return _fused_forward(qk, anchors, v, scale)[0]
