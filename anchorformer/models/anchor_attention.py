"""Anchor attention: tokens -> m learned anchors -> tokens, in O(n * m) instead of O(n^2).

Paper: "Differentiable Anchor Attention for Efficient Vision Transformer", arXiv 2505.16463.
Reference code: github.com/hyzhang98/AnchorFormer (model/AnchorViT.py).

For one head, with ``qk`` the (n, dh) tokens that serve as queries AND keys, ``U`` the (m, dh)
anchors shared by the heads of a layer and ``v`` the (n, dh) values:

    A      = softmax_over_anchors(qk @ U^T * dh**-0.5)     (n, m)  token -> anchor
    Lambda = A summed over tokens                          (m,)    anchor degree
    out    = A @ ((A^T @ v) / Lambda)                      (n, dh) anchor -> token

``out = S @ v`` with ``S = A diag(1/Lambda) A^T``, a symmetric, row-stochastic n x n matrix that is
never formed. An anchor whose degree underflows to 0 contributes nothing (1/0 -> 0).
"""
from typing import Optional

import torch
import torch.nn as nn

from anchorformer.kernels.dispatch import anchor_mix_fast

__all__ = ["AnchorAttention", "anchor_mix"]


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


class AnchorAttention(nn.Module):
    """Multi-head anchor attention, a drop-in for timm's ``Attention`` in a ViT block.

    Args:
        dim: token width D.
        num_heads: heads h; D must be divisible by h (head dim dh = D / h).
        num_anchors: anchors m per layer, shared by the heads (30 in the paper).
        proj_drop: dropout after the output projection.
        proj_bias: bias on the output projection (True in the paper).
        The other arguments are those timm's ``Block`` passes to any attention layer: ``qkv_bias``
        is ignored (the authors' input projection is bias-free), ``qk_norm``, ``scale_norm`` and
        ``attn_drop`` must keep their defaults (anchor attention has none of them).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        num_anchors: int = 30,
        proj_drop: float = 0.0,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        norm_layer: Optional[type] = None,
        depth: int = 0,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads != 0:
            raise ValueError(f"embed_dim={dim} must be divisible by num_heads={num_heads}")
        if num_anchors < 1:
            raise ValueError(f"num_anchors must be >= 1, got num_anchors={num_anchors}")
        if qk_norm or scale_norm or attn_drop:
            raise ValueError("AnchorAttention has no qk_norm, no scale_norm and no attention dropout "
                             "(set attn_drop_rate=0)")
        # qkv_bias is ignored: the authors' input projection is bias-free even where DeiT asks for one.
        # norm_layer and depth are what timm's Block passes to every attention layer; unused here.
        del qkv_bias, norm_layer, depth
        factory = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.num_anchors = num_anchors
        self.scale = self.head_dim ** -0.5
        self.qk_v = nn.Linear(dim, 2 * dim, bias=False, **factory)
        self.anchors = nn.Linear(self.head_dim, num_anchors, bias=False, **factory)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **factory)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
    ) -> torch.Tensor:
        """(B, n, D) -> (B, n, D). ``attn_mask``/``is_causal`` exist for timm's Block signature."""
        if attn_mask is not None or is_causal:
            raise ValueError("AnchorAttention supports neither attn_mask nor is_causal")
        batch, tokens, dim = x.shape
        qk, v = self.qk_v(x).reshape(batch, tokens, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = anchor_mix_fast(qk, self.anchors.weight, v, self.scale)  # fused Triton kernels on CUDA
        out = out.transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, num_anchors={self.num_anchors}"
