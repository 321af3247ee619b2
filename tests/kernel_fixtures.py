"""Shared pieces of the anchor-mix tests: inputs laid out as the layer makes them, one mix with
its gradients, and the relative error against a float64 reference."""
from typing import Optional

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def mix_inputs(shape: tuple, dtype: torch.dtype, anchor_dtype: Optional[torch.dtype] = None, seed: int = 0):
    """Strided inputs on ``DEVICE``: qk and v as the layer makes them (views of one projection),
    anchors stored transposed, and a gradient stored token-major (as merging the heads hands it back).

    Args:
        shape: (batch, heads, tokens, head dim, anchors).
    """
    batch, heads, tokens, head_dim, n_anchors = shape
    generator = torch.Generator().manual_seed(seed)
    qk_v = torch.randn(batch, tokens, 2, heads, head_dim, generator=generator, dtype=torch.float64)
    anchors = torch.randn(head_dim, n_anchors, generator=generator, dtype=torch.float64).t()
    grad = torch.randn(batch, tokens, heads, head_dim, generator=generator, dtype=torch.float64).transpose(1, 2)
    qk, v = qk_v.to(DEVICE, dtype).permute(2, 0, 3, 1, 4)
    return qk, anchors.to(DEVICE, anchor_dtype or dtype), v, grad.to(DEVICE, dtype)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in float64."""
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


def mix_with_grads(fn, qk, anchors, v, grad) -> list[torch.Tensor]:
    """[out, d_qk, d_anchors, d_v] of ``fn(qk, anchors, v, dh ** -0.5)`` on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() for t in (qk, anchors, v)]
    out = fn(*leaves, leaves[0].shape[-1] ** -0.5)
    out.backward(grad)
    return [out] + [leaf.grad for leaf in leaves]
