"""Anchor attention: tokens -> m learned anchors -> tokens, in O(n * m) instead of O(n^2).

Paper: "Differentiable Anchor Attention for Efficient Vision Transformer", arXiv 2505.16463.
Reference code: github.com/hyzhang98/AnchorFormer (model/AnchorViT.py).

The layer projects the tokens to ``qk`` and ``v`` per head and mixes them through m learned
anchors: ``anchorformer.kernels.reference.anchor_mix`` holds the maths, and the layer runs it through
``anchorformer.kernels.anchor_mix_fast`` (the backend measured fastest for each shape).

Tracing: ``torch.fx`` records ``anchor_mix_fast`` and the mask check as single calls (they are
``torch.fx.wrap``-ped), so a traced graph still runs the dispatcher's backend and still refuses
masks; TorchScript, of the model or of such a graph, compiles ``anchor_mix_fast`` to the PyTorch
``anchor_mix`` (the dispatcher is plain Python).
"""
from typing import Optional

import torch
import torch.nn as nn

from anchorformer.kernels import anchor_mix_fast
from anchorformer.models.errors import require

__all__ = ["AnchorAttention"]

torch.fx.wrap("anchor_mix_fast")  # one graph node: the traced graph runs the dispatcher's fast path


def _refuse_masks(attn_mask: Optional[torch.Tensor], is_causal: bool) -> None:
    """Anchor attention mixes every token with every other: there is no mask to apply."""
    if attn_mask is not None or is_causal:
        raise ValueError("AnchorAttention supports neither attn_mask nor is_causal")


torch.fx.wrap("_refuse_masks")  # checked when the graph runs, not on tracing proxies


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
        require(isinstance(num_heads, int) and num_heads >= 1, "num_heads",
                f"num_heads must be an integer >= 1, got num_heads={num_heads!r}")
        require(dim % num_heads == 0, "embed_dim", f"embed_dim={dim} must be divisible by num_heads={num_heads}")
        require(isinstance(num_anchors, int) and num_anchors >= 1, "num_anchors",
                f"num_anchors must be an integer >= 1, got num_anchors={num_anchors!r}")
        require(not qk_norm, "qk_norm", "AnchorAttention has no qk_norm; leave qk_norm=False")
        require(not scale_norm, "scale_attn_norm", "AnchorAttention has no scale_norm; leave scale_attn_norm=False")
        require(not attn_drop, "attn_drop_rate", "AnchorAttention has no attention dropout; set attn_drop_rate=0")
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
        _refuse_masks(attn_mask, is_causal)
        batch, tokens, dim = x.shape
        qk_v = self.qk_v(x).reshape(batch, tokens, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        qk, v = qk_v.unbind(0)
        out = anchor_mix_fast(qk, self.anchors.weight, v, self.scale)  # the measured fastest backend
        out = out.transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, num_anchors={self.num_anchors}"
