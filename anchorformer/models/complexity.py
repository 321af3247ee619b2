"""Closed-form parameter and MAC counts for AnchorFormer and for the DeiT of the same size.

Used by ``tools/model_stats.py`` (next to torch's FlopCounterMode, which must agree) and by the
trainer's MFU (FLOPs per image = 2 x MACs, x3 for forward + backward).

Only matrix products count as MACs (the convention of FlopCounterMode and of papers); softmax,
norms, activations and the 1/Lambda scaling are elementwise and left out.
"""
from dataclasses import dataclass
from typing import Any, Tuple

import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["VitShape", "shape_of", "param_count", "forward_macs", "measure"]


@dataclass(frozen=True)
class VitShape:
    """The numbers that fix a plain ViT's size."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    num_classes: int
    in_chans: int = 3
    mlp_ratio: float = 4.0
    num_anchors: int = 0  # 0: full softmax attention (DeiT); m > 0: anchor attention
    distilled: bool = False

    @property
    def num_prefix_tokens(self) -> int:
        return 2 if self.distilled else 1

    @property
    def hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)


def shape_of(model: nn.Module) -> VitShape:
    """Read the shape of a timm VisionTransformer (AnchorFormer or DeiT) off the module."""
    return VitShape(
        embed_dim=model.embed_dim,
        depth=len(model.blocks),
        num_heads=model.blocks[0].attn.num_heads,
        patch_size=model.patch_embed.patch_size[0],
        num_classes=model.num_classes,
        in_chans=model.patch_embed.proj.in_channels,
        mlp_ratio=model.blocks[0].mlp.fc1.out_features / model.embed_dim,
        num_anchors=getattr(model, "num_anchors", 0),
        distilled=model.num_prefix_tokens == 2,
    )


def _attention_params(s: VitShape) -> int:
    d = s.embed_dim
    if s.num_anchors:  # qk_v (no bias), anchors (no bias), proj
        return d * 2 * d + (d // s.num_heads) * s.num_anchors + d * d + d
    return d * 3 * d + 3 * d + d * d + d  # qkv with bias, proj


def param_count(s: VitShape, img_size: int) -> int:
    """Exact number of parameters of the model built at ``img_size``."""
    d, tokens = s.embed_dim, (img_size // s.patch_size) ** 2 + s.num_prefix_tokens
    patch_embed = s.in_chans * s.patch_size ** 2 * d + d
    block = 2 * d + _attention_params(s) + 2 * d + d * s.hidden + s.hidden + s.hidden * d + d
    heads = (2 if s.distilled else 1) * (d * s.num_classes + s.num_classes) if s.num_classes else 0
    return patch_embed + s.num_prefix_tokens * d + tokens * d + s.depth * block + 2 * d + heads


def forward_macs(s: VitShape, img_size: int) -> int:
    """Multiply-accumulates of one forward pass on one ``img_size`` x ``img_size`` image."""
    d, patches = s.embed_dim, (img_size // s.patch_size) ** 2
    n = patches + s.num_prefix_tokens
    patch_embed = patches * d * s.in_chans * s.patch_size ** 2
    if s.num_anchors:  # qk_v, anchor logits, A^T V, A @ context, proj
        attention = n * d * 2 * d + 3 * n * d * s.num_anchors + n * d * d
    else:  # qkv, Q K^T, attn @ V, proj
        attention = n * d * 3 * d + 2 * n * n * d + n * d * d
    mlp = 2 * n * d * s.hidden
    heads = (2 if s.distilled else 1) * d * s.num_classes
    return patch_embed + s.depth * (attention + mlp) + heads


def measure(name: str, img_size: int, **kwargs: Any) -> Tuple[VitShape, int, int]:
    """Build timm model ``name`` at ``img_size`` on the meta device (no memory, no compute) and
    count its parameters and, with torch's FlopCounterMode, the MACs of one forward pass.

    Returns:
        (shape, parameters, forward MACs per image).
    """
    with torch.device("meta"):
        model = timm.create_model(name, img_size=img_size, **kwargs)
        image = torch.empty(1, 3, img_size, img_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(image)
    return shape_of(model), sum(p.numel() for p in model.parameters()), counter.get_total_flops() // 2
