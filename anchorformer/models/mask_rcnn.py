"""Mask R-CNN on AnchorFormer: the backbone and its simple feature pyramid (``backbone.py``) under
torchvision's Mask R-CNN heads (RPN, box head, mask head), the network of the detection stage.

Mask R-CNN: "Mask R-CNN", arXiv 1703.06870. A plain ViT with anchor attention stays global at
1024 px (O(n*m) instead of O(n^2)), where ViTDet needs windowed attention.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

from .backbone import AnchorFormerBackbone, DenseModelMixin

__all__ = ["AnchorFormerMaskRCNN", "build_detector"]


class AnchorFormerMaskRCNN(DenseModelMixin, MaskRCNN):
    """torchvision's Mask R-CNN on an :class:`AnchorFormerBackbone`, with the timm-style methods the
    trainer uses (layer-wise lr decay groups, no weight decay on tokens, activation checkpointing)."""


def build_detector(model_name: str, num_classes: int, image_size: int, train_scales: Sequence[int],
                   weights: Optional[str] = None, model_kwargs: Optional[Dict[str, Any]] = None,
                   out_channels: int = 256, mask_head_channels: int = 256, rois_per_image: int = 512,
                   detections_per_image: int = 100,
                   mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD
                   ) -> AnchorFormerMaskRCNN:
    """Mask R-CNN on an AnchorFormer backbone.

    Args:
        model_name: timm name of the backbone (``anchorformer_base_patch16_224``).
        num_classes: object categories, without background.
        image_size: longest image side after resizing, in pixels; also the backbone's pos_embed
            size.
        train_scales: shorter-side sizes drawn at random in training; the last is used in
            evaluation.
        weights: backbone export from ``tools/convert_checkpoint.py`` (None: random init).
        model_kwargs: architecture overrides for ``timm.create_model``.
        out_channels: channels of the feature pyramid (and of the box head's input).
        mask_head_channels: width of the mask head's four 3x3 convolutions.
        rois_per_image: region proposals sampled per image for the box and mask heads in training.
        detections_per_image: detections kept per image at inference.
        mean: per-channel mean of the backbone's pre-training (RGB, [0, 1] units).
        std: per-channel std of the backbone's pre-training.

    Returns:
        A torchvision ``MaskRCNN``: ``model(images, targets)`` gives a dict of losses in training
        mode, ``model(images)`` a list of detections in eval mode.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 object category, got {num_classes}")
    if not train_scales or min(train_scales) < 32 or max(train_scales) > image_size:
        raise ValueError(f"train_scales must be shorter-side sizes in [32, image_size={image_size}], "
                         f"got {list(train_scales)}")
    backbone = AnchorFormerBackbone(model_name, img_size=image_size, out_channels=out_channels,
                                    extra_pool_level=True, weights=weights, model_kwargs=model_kwargs)
    # Box head: torchvision's default two 1024-wide fully connected layers.
    return AnchorFormerMaskRCNN(
        backbone, num_classes=None, box_predictor=FastRCNNPredictor(1024, num_classes + 1),
        min_size=tuple(train_scales), max_size=image_size, image_mean=list(mean), image_std=list(std),
        box_detections_per_img=detections_per_image, box_batch_size_per_image=rois_per_image,
        mask_head=MaskRCNNHeads(out_channels, (mask_head_channels,) * 4, dilation=1),
        mask_predictor=MaskRCNNPredictor(mask_head_channels, mask_head_channels, num_classes + 1))
