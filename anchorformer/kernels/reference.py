"""The PyTorch anchor mix: the maths of anchor attention in plain tensor ops, the path taken
where the fused kernels do not run and the reference they are tested against.

For one head, with ``qk`` the (n, dh) tokens that serve as queries AND keys, ``U`` the (m, dh)
anchors shared by the heads of a layer and ``v`` the (n, dh) values:

    A      = softmax_over_anchors(qk @ U^T * dh**-0.5)     (n, m)  token -> anchor
    Lambda = A summed over tokens                          (m,)    anchor degree
    out    = A @ ((A^T @ v) / Lambda)                      (n, dh) anchor -> token

``out = S @ v`` with ``S = A diag(1/Lambda) A^T``, a symmetric, row-stochastic n x n matrix that is
never formed. An anchor whose degree underflows to 0 contributes nothing (1/0 -> 0).
"""
import torch

__all__ = ["anchor_mix"]


def _safe_reciprocal(x: torch.Tensor) -> torch.Tensor:
    """1 / x where x > 0, else 0, with a finite gradient everywhere (no inf * 0 = NaN)."""
    positive = x > 0
    return torch.where(positive, 1.0 / torch.where(positive, x, torch.ones_like(x)), torch.zeros_like(x))


def anchor_mix(qk: torch.Tensor, anchors: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Mix the values through the anchors: ``A @ ((A^T @ v) / Lambda)`` for every batch and head.

    The anchor softmax and the token-sum Lambda run in (at least) float32 whatever the input dtype,
    so the layer is safe under bf16/fp16 autocast; the products run in the input dtype (tensor
    cores accumulate in fp32). The scale is applied to ``qk`` before the product so that the
    low-precision logits never exceed the softmax's range.

    Args:
        qk: (B, h, n, dh) tokens serving as queries and keys.
        anchors: (m, dh) anchor weight, shared by the heads.
        v: (B, h, n, dh) values.
        scale: logit scale, dh ** -0.5 in the paper.

    Returns:
        (B, h, n, dh) tensor in the dtype of ``v``.
    """
    logits = torch.matmul(qk * scale, anchors.to(qk.dtype).t())  # (B, h, n, m)
    accum_dtype = torch.promote_types(logits.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    assign = torch.softmax(logits.to(accum_dtype), dim=-1)  # token -> anchor
    inv_degree = _safe_reciprocal(assign.sum(dim=-2))  # (B, h, m)
    assign_lp = assign.to(v.dtype)
    context = torch.matmul(assign_lp.transpose(-2, -1), v)  # (B, h, m, dh): anchors gather tokens
    context = (context.to(accum_dtype) * inv_degree.unsqueeze(-1)).to(v.dtype)
    return torch.matmul(assign_lp, context)  # (B, h, n, dh): tokens read the anchors back
