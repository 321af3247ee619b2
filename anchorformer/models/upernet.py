"""UperNet on AnchorFormer: the backbone and its simple feature pyramid (``backbone.py``) under a
UperNet head (+ an auxiliary FCN head on the stride-16 level), the network of the segmentation
stage.

UperNet: "Unified Perceptual Parsing for Scene Understanding", arXiv 1807.10221 (pyramid pooling
on the coarsest level, a top-down FPN, all levels fused at stride 4). Written here compactly:
mmsegmentation's implementation needs mmcv/mmengine, which this project does not depend on.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .backbone import AnchorFormerBackbone, DenseModelMixin

__all__ = ["ConvNormAct", "UperNetHead", "UperNetSegmentor", "resize_bilinear"]


class ConvNormAct(nn.Sequential):
    """Convolution (no bias) -> GroupNorm (up to 32 groups of >= 2 channels, so a 1x1 pooled map works) -> ReLU.

    GroupNorm instead of mmsegmentation's SyncBatchNorm: it does not depend on the per-rank batch
    (2 crops per GPU in the recipes), needs no cross-rank statistics, and has no running-statistics
    buffers that DeepSpeed's bf16/fp16 casting would leave in fp32."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1) -> None:
        super().__init__(nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
                         nn.GroupNorm(math.gcd(32, max(out_channels // 2, 1)), out_channels), nn.ReLU(inplace=True))


def resize_bilinear(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, C, h, w) maps resized to ``size`` (H, W), bilinear without corner alignment (mmsegmentation's
    ``resize``): between the head's levels, and of logits to their labels' size."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class UperNetHead(nn.Module):
    """Pyramid pooling on the coarsest level, top-down FPN, fusion of all levels at the finest
    level's resolution, then a 1x1 classifier.

    Args:
        in_channels: channels of each input level, finest first.
        channels: width of the head.
        num_classes: output classes.
        pool_scales: output sizes of the pyramid pooling module.
        dropout: dropout before the classifier.
    """

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1) -> None:
        super().__init__()
        *fine, coarsest = in_channels
        self.pools = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvNormAct(coarsest, channels))
                                   for scale in pool_scales)
        self.pool_bottleneck = ConvNormAct(coarsest + len(pool_scales) * channels, channels, 3)
        self.laterals = nn.ModuleList(ConvNormAct(c, channels) for c in fine)
        self.fpn_convs = nn.ModuleList(ConvNormAct(channels, channels, 3) for _ in fine)
        self.fuse = ConvNormAct(len(in_channels) * channels, channels, 3)
        self.classifier = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1))

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        *fine, coarsest = features
        pooled = [resize_bilinear(pool(coarsest), coarsest.shape[-2:]) for pool in self.pools]
        levels = [lateral(x) for lateral, x in zip(self.laterals, fine)]
        levels.append(self.pool_bottleneck(torch.cat([coarsest, *pooled], dim=1)))
        for i in range(len(levels) - 1, 0, -1):  # top-down: coarse context into finer levels
            levels[i - 1] = levels[i - 1] + resize_bilinear(levels[i], levels[i - 1].shape[-2:])
        outputs = [conv(x) for conv, x in zip(self.fpn_convs, levels[:-1])] + [levels[-1]]
        size = outputs[0].shape[-2:]
        fused = self.fuse(torch.cat([outputs[0]] + [resize_bilinear(x, size) for x in outputs[1:]], dim=1))
        return self.classifier(fused)


class UperNetSegmentor(DenseModelMixin, nn.Module):
    """AnchorFormer backbone + UperNet (+ auxiliary FCN head during training).

    Takes images in [0, 1] (normalised inside) whose sides are multiples of 32 and returns logits
    at stride 4 (and the auxiliary logits at stride 16 in training mode).

    Args:
        model_name: timm name of the backbone.
        num_classes: output classes.
        image_size: the crop size the backbone's pos_embed is built for, in pixels.
        weights: backbone export from ``tools/convert_checkpoint.py`` (None: random init).
        model_kwargs: architecture overrides for ``timm.create_model``.
        pyramid_channels: channels of each simple-feature-pyramid level.
        head_channels: width of the UperNet head (512 in mmsegmentation's recipes).
        aux_channels: width of the auxiliary head; 0 disables it.
        mean: per-channel mean of the backbone's pre-training (RGB, [0, 1] units).
        std: per-channel std of the backbone's pre-training.
    """

    def __init__(self, model_name: str, num_classes: int, image_size: int, weights: Optional[str] = None,
                 model_kwargs: Optional[dict] = None, pyramid_channels: int = 256, head_channels: int = 512,
                 aux_channels: int = 256, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                 std: Sequence[float] = IMAGENET_DEFAULT_STD) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.backbone = AnchorFormerBackbone(model_name, img_size=image_size, out_channels=pyramid_channels,
                                             weights=weights, model_kwargs=model_kwargs)
        self.decode_head = UperNetHead([pyramid_channels] * 4, head_channels, num_classes)
        self.aux_head = nn.Sequential(ConvNormAct(pyramid_channels, aux_channels, 3), nn.Dropout2d(0.1),
                                      nn.Conv2d(aux_channels, num_classes, 1)) if aux_channels else None
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.num_classes = num_classes

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        # the fp32 statistics must not promote bf16/fp16 images (DeepSpeed casts weights, not buffers)
        features = list(self.backbone(((images - self.mean) / self.std).to(images.dtype)).values())
        logits = self.decode_head(features)
        aux = self.aux_head(features[2]) if self.training and self.aux_head is not None else None
        return logits, aux
