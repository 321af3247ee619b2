"""AnchorFormer as a dense-prediction backbone: the plain ViT's last feature map (stride 16) ->
a ViTDet simple feature pyramid (strides 4, 8, 16, 32), shared by the detection and segmentation
stages.

ViTDet: "Exploring Plain Vision Transformer Backbones for Object Detection", arXiv 2203.16527.
A plain backbone keeps global (anchor) attention at any resolution; only the last map is used, and
the pyramid is built from it with deconvolutions and pooling, not from intermediate layers.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Optional

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d

from .anchorformer import checkpoint_filter_fn  # (the package import registers the models with timm)
from .errors import require

__all__ = ["PYRAMID_STRIDES", "TOOLBOX_PREFIX", "SimpleFeaturePyramid", "AnchorFormerBackbone", "DenseModelMixin",
           "load_backbone_weights", "read_weights"]

logger = logging.getLogger(__name__)

PYRAMID_STRIDES = (4, 8, 16, 32)
"""Strides of the pyramid levels, in pixels, for a patch-16 backbone."""

_CLASSIFIER_PREFIXES = ("head.", "head_dist.", "fc_norm.")
TOOLBOX_PREFIX = "backbone."
"""Key prefix of the mmdetection / mmsegmentation layout of backbone weights."""


class SimpleFeaturePyramid(nn.Module):
    """Multi-scale maps from one stride-16 map (ViTDet's simple feature pyramid).

    Scales 4x and 2x use transposed convolutions, 1x is the map itself, 0.5x max-pools; each level
    then gets a 1x1 and a 3x3 convolution to ``out_channels``, with channel LayerNorms.

    Args:
        in_channels: channels of the input map (the backbone's width).
        out_channels: channels of every output level.
    """

    def __init__(self, in_channels: int, out_channels: int = 256) -> None:
        super().__init__()
        half, quarter = in_channels // 2, in_channels // 4
        self.scales = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(in_channels, half, 2, stride=2), LayerNorm2d(half), nn.GELU(),
                          nn.ConvTranspose2d(half, quarter, 2, stride=2)),
            nn.ConvTranspose2d(in_channels, half, 2, stride=2),
            nn.Identity(),
            nn.MaxPool2d(2, stride=2),
        ])
        self.outputs = nn.ModuleList([
            nn.Sequential(nn.Conv2d(channels, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                          nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                          LayerNorm2d(out_channels))
            for channels in (quarter, half, in_channels, in_channels)
        ])
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [output(scale(x)) for scale, output in zip(self.scales, self.outputs)]


class AnchorFormerBackbone(nn.Module):
    """AnchorFormer encoder + simple feature pyramid, returning ``{"0": stride 4, ..., "3": stride
    32}`` (and ``"pool"``, stride 64, with ``extra_pool_level``: the extra level Mask R-CNN's RPN
    expects).

    Args:
        model_name: a registered timm model name (``anchorformer_base_patch16_224``).
        img_size: the fine-tuning resolution the stored ``pos_embed`` is sized for (inputs of other
            sizes are resampled on the fly).
        out_channels: channels of every pyramid level.
        extra_pool_level: add the stride-64 ``"pool"`` level (detection).
        weights: a backbone or classification export (see :func:`read_weights`); ``None`` keeps
            the random initialisation.
        model_kwargs: architecture overrides for ``timm.create_model`` (``embed_dim``, ``depth``...).
    """

    def __init__(self, model_name: str, img_size: int, out_channels: int = 256, extra_pool_level: bool = False,
                 weights: Optional[str] = None, model_kwargs: Optional[Dict[str, Any]] = None) -> None:
        super().__init__()
        self.encoder = timm.create_model(model_name, img_size=img_size, dynamic_img_size=True, num_classes=0,
                                         **(model_kwargs or {}))
        patch = self.encoder.patch_embed.patch_size
        require(tuple(patch) == (16, 16), "patch_size", f"the simple feature pyramid assumes patch size 16 (strides "
                                                         f"{PYRAMID_STRIDES}), got {tuple(patch)} for {model_name}")
        if weights is not None:
            load_backbone_weights(self.encoder, read_weights(weights))
        # Only the last block's map is used: the final norm and the head are dropped so that no
        # parameter is left without a gradient (ZeRO stages 2-3 dislike unused parameters).
        self.encoder.prune_intermediate_layers(indices=1, prune_norm=True, prune_head=True)
        self.pyramid = SimpleFeaturePyramid(self.encoder.embed_dim, out_channels)
        self.out_channels = out_channels
        self.extra_pool_level = extra_pool_level

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the encoder's blocks in the backward pass."""
        self.encoder.set_grad_checkpointing(enable)

    def forward(self, images: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        (last,) = self.encoder.forward_intermediates(images, indices=1, output_fmt="NCHW", intermediates_only=True)
        levels = self.pyramid(last)
        features = OrderedDict((str(i), level) for i, level in enumerate(levels))
        if self.extra_pool_level:
            features["pool"] = F.max_pool2d(levels[-1], kernel_size=1, stride=2)
        return features


class DenseModelMixin:
    """The timm model contract the trainer relies on, for a network whose ``self.backbone`` is an
    :class:`AnchorFormerBackbone`: no weight decay on the encoder's tokens and pos_embed,
    layer-wise lr decay groups (stem, one group per block, then everything else: pyramid and heads
    at the full lr), activation checkpointing of the encoder."""

    _ENCODER = r"^backbone\.encoder\."

    def no_weight_decay(self) -> set:
        return {f"backbone.encoder.{name}" for name in self.backbone.encoder.no_weight_decay()}

    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return {"stem": self._ENCODER + r"(?:cls_token|reg_token|dist_token|pos_embed|patch_embed)",
                "blocks": self._ENCODER + r"blocks\.(\d+)" if coarse else [(self._ENCODER + r"blocks\.(\d+)", None)]}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)


def read_weights(path: str | Path) -> Dict[str, torch.Tensor]:
    """The tensors of a converted checkpoint (``tools/convert_checkpoint.py`` output: safetensors in
    our layout or the toolbox layout with ``backbone.``) or of a plain ``.pt``/``.pth`` state dict.

    Args:
        path: the weights file.

    Returns:
        A flat name -> tensor dict, as stored.

    Raises:
        ValueError: the file is missing or cannot be read as weights.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"backbone weights {path} do not exist; produce them with "
                         f"`python tools/convert_checkpoint.py RUN_DIR --format backbone --output {path}`")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors, pickle and zip errors have no common base class
        raise ValueError(f"cannot read backbone weights {path}: {err}; is the file complete? "
                         "re-export it with tools/convert_checkpoint.py") from err


def load_backbone_weights(encoder: nn.Module, state_dict: Dict[str, torch.Tensor]) -> None:
    """Load exported weights into an AnchorFormer encoder built with ``num_classes=0``.

    The toolbox ``backbone.`` prefix and classifier weights are dropped (with a log line); every
    other key must match (``checkpoint_filter_fn`` resamples ``pos_embed`` and raises a
    ``ValueError`` listing missing, unexpected and mis-shaped keys).

    Args:
        encoder: the timm AnchorFormer model.
        state_dict: exported weights.
    """
    if state_dict and all(key.startswith(TOOLBOX_PREFIX) for key in state_dict):
        state_dict = {key[len(TOOLBOX_PREFIX):]: value for key, value in state_dict.items()}
    dropped = sorted(key for key in state_dict if key.startswith(_CLASSIFIER_PREFIXES))
    if dropped:
        logger.info("backbone: ignoring classifier weights %s", dropped)
    state_dict = {key: value for key, value in state_dict.items() if key not in dropped}
    encoder.load_state_dict(checkpoint_filter_fn(state_dict, encoder), strict=True)
