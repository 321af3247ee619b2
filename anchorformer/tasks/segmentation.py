"""Segmentation stage: AnchorFormer backbone -> simple feature pyramid -> UperNet head (+ an
auxiliary FCN head on the stride-16 level), cross-entropy with ignore index 255, mIoU and pixel
accuracy, whole-image and sliding-window inference.

UperNet: "Unified Perceptual Parsing for Scene Understanding", arXiv 1807.10221 (pyramid pooling
on the coarsest level, a top-down FPN, all levels fused at stride 4). Written here compactly:
mmsegmentation's implementation needs mmcv/mmengine, which this project does not depend on.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, Iterable, List, Literal, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from anchorformer.config import RootConfig
from anchorformer.data.ade20k import IGNORE_INDEX, ADE20KSegmentation, SegmentationBatch, collate_segmentation
from anchorformer.data.dense import MapTrainStream, eval_loader
from anchorformer.dist import collectives
from anchorformer.dist.zero import whole_parameters
from anchorformer.models.backbone import AnchorFormerBackbone, DenseModelMixin
from anchorformer.tasks.base import Runtime
from anchorformer.tasks.dense_common import encoder_kwargs, task_options

__all__ = ["SegmentationTask", "ConvNormAct", "UperNetHead", "UperNetSegmentor", "segmentation_loss", "predict_logits",
           "SegmentationMetrics", "evaluate_segmentation"]

logger = logging.getLogger(__name__)

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_SIZE_DIVISOR = 32  # the coarsest pyramid level is stride 32


class ConvNormAct(nn.Sequential):
    """Convolution (no bias) -> GroupNorm (up to 32 groups of >= 2 channels, so a 1x1 pooled map works) -> ReLU.

    GroupNorm instead of mmsegmentation's SyncBatchNorm: it does not depend on the per-rank batch
    (2 crops per GPU in the recipes), needs no cross-rank statistics, and has no running-statistics
    buffers that DeepSpeed's bf16/fp16 casting would leave in fp32."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1) -> None:
        super().__init__(nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
                         nn.GroupNorm(math.gcd(32, max(out_channels // 2, 1)), out_channels), nn.ReLU(inplace=True))


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
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
        pooled = [_resize(pool(coarsest), coarsest.shape[-2:]) for pool in self.pools]
        levels = [lateral(x) for lateral, x in zip(self.laterals, fine)]
        levels.append(self.pool_bottleneck(torch.cat([coarsest, *pooled], dim=1)))
        for i in range(len(levels) - 1, 0, -1):  # top-down: coarse context into finer levels
            levels[i - 1] = levels[i - 1] + _resize(levels[i], levels[i - 1].shape[-2:])
        outputs = [conv(x) for conv, x in zip(self.fpn_convs, levels[:-1])] + [levels[-1]]
        size = outputs[0].shape[-2:]
        fused = self.fuse(torch.cat([outputs[0]] + [_resize(x, size) for x in outputs[1:]], dim=1))
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
                 aux_channels: int = 256, mean: Sequence[float] = _IMAGENET_MEAN,
                 std: Sequence[float] = _IMAGENET_STD) -> None:
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


def segmentation_loss(model: nn.Module, batch: SegmentationBatch, device: torch.device, aux_weight: float = 0.4,
                      dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, Dict[str, float]]:
    """Cross-entropy (ignore index 255) of the upsampled logits, plus ``aux_weight`` times the
    auxiliary head's.

    Args:
        model: the segmentor in training mode (or the DeepSpeed engine wrapping it).
        batch: a training batch (stacked crops).
        device: where the model lives.
        aux_weight: weight of the auxiliary loss.
        dtype: dtype of the model's weights (images are cast to it; the loss is computed in fp32).

    Returns:
        The total loss and its terms as floats, for logging.
    """
    images = batch.images.to(device, dtype=dtype, non_blocking=True)
    labels = batch.labels.to(device, non_blocking=True)
    logits, aux = model(images)
    logits, aux = logits.float(), None if aux is None else aux.float()
    terms = {"loss_seg": F.cross_entropy(_resize(logits, labels.shape[-2:]), labels, ignore_index=IGNORE_INDEX)}
    if aux is not None:
        terms["loss_aux"] = aux_weight * F.cross_entropy(_resize(aux, labels.shape[-2:]), labels,
                                                         ignore_index=IGNORE_INDEX)
    total = sum(terms.values())
    return total, {name: float(value.detach()) for name, value in terms.items()}


@torch.no_grad()
def predict_logits(model: nn.Module, image: torch.Tensor, mode: Literal["whole", "slide"] = "whole",
                   crop_size: int = 512, stride: int = 341) -> torch.Tensor:
    """Class logits of one image at its own resolution.

    Args:
        model: the segmentor in eval mode.
        image: (3, H, W) in [0, 1], on the model's device.
        mode: ``whole`` runs the image at once (padded to a multiple of 32); ``slide`` runs
            ``crop_size`` windows every ``stride`` pixels and averages overlapping logits.
        crop_size: sliding window side in pixels.
        stride: sliding window step in pixels (<= crop_size).

    Returns:
        (num_classes, H, W) logits.
    """
    height, width = image.shape[-2:]
    if mode == "whole":
        return _padded_logits(model, image[None], _round_up(height), _round_up(width))[0, :, :height, :width]
    if mode != "slide":
        raise ValueError(f"inference mode must be 'whole' or 'slide', got {mode!r}")
    if not 0 < stride <= crop_size:
        raise ValueError(f"sliding-window stride must be in (0, crop_size={crop_size}], got {stride}")
    crop_size = _round_up(crop_size)
    logits: Optional[torch.Tensor] = None
    counts = torch.zeros(1, height, width, device=image.device)
    for top in _window_starts(height, crop_size, stride):
        for left in _window_starts(width, crop_size, stride):
            window = image[None, :, top:top + crop_size, left:left + crop_size]
            h, w = window.shape[-2:]
            window_logits = _padded_logits(model, window, crop_size, crop_size)[0, :, :h, :w]
            if logits is None:
                logits = window_logits.new_zeros(window_logits.shape[0], height, width)
            logits[:, top:top + h, left:left + w] += window_logits
            counts[:, top:top + h, left:left + w] += 1
    return logits / counts


def _round_up(size: int) -> int:
    return -(-size // _SIZE_DIVISOR) * _SIZE_DIVISOR


def _window_starts(size: int, crop: int, stride: int) -> List[int]:
    """Window offsets covering [0, size): every ``stride``, the last one flush with the end."""
    if size <= crop:
        return [0]
    starts = list(range(0, size - crop, stride))
    return starts + [size - crop]


def _padded_logits(model: nn.Module, images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Logits at the padded size (height, width) of images padded bottom/right with zeros."""
    padded = F.pad(images, (0, width - images.shape[-1], 0, height - images.shape[-2]))
    logits, _ = model(padded)
    return _resize(logits.float(), (height, width))


class SegmentationMetrics:
    """Per-class intersection, union and label areas accumulated over a dataset.

    Args:
        num_classes: classes; label ``ignore_index`` is left out.
        ignore_index: label value without a class.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.areas = torch.zeros(3, num_classes, dtype=torch.float64)  # intersection, union, label

    def update(self, prediction: torch.Tensor, label: torch.Tensor) -> None:
        """Add one image (or a batch): predicted and true class maps of the same shape."""
        valid = label != self.ignore_index
        prediction, label = prediction[valid].cpu(), label[valid].cpu()
        bins = dict(minlength=self.num_classes)
        intersection = torch.bincount(label[prediction == label], **bins).double()
        predicted = torch.bincount(prediction, **bins).double()
        labelled = torch.bincount(label, **bins).double()
        self.areas += torch.stack([intersection, predicted + labelled - intersection, labelled])

    def compute(self) -> Dict[str, float]:
        """``mIoU``, ``mAcc`` (over classes that occur in labels or predictions) and ``aAcc``
        (pixel accuracy), in %."""
        intersection, union, labelled = self.areas
        present = union > 0
        iou = intersection[present] / union[present]
        in_labels = labelled > 0
        accuracy = intersection[in_labels] / labelled[in_labels]
        return {
            "mIoU": float(iou.mean()) * 100.0 if present.any() else 0.0,
            "mAcc": float(accuracy.mean()) * 100.0 if in_labels.any() else 0.0,
            "aAcc": float(intersection.sum() / labelled.sum()) * 100.0 if labelled.sum() > 0 else 0.0,
        }


def evaluate_segmentation(model: nn.Module, batches: Iterable[SegmentationBatch], num_classes: int,
                          device: torch.device, mode: Literal["whole", "slide"] = "whole", crop_size: int = 512,
                          stride: int = 341, dtype: torch.dtype = torch.float32) -> Dict[str, float]:
    """mIoU, mAcc and aAcc over every rank's share of the validation set.

    Each image is predicted at its evaluation size (see :func:`predict_logits`), the logits are
    resized to the original label's size, and areas are summed over ranks.

    Args:
        model: the segmentor (unwrapped module); it is put in eval mode.
        batches: this rank's evaluation batches (lists of images and labels).
        num_classes: classes.
        device: where the model lives.
        mode: ``whole`` or ``slide`` inference.
        crop_size: sliding window side.
        stride: sliding window step.
        dtype: dtype of the model's weights (images are cast to it).

    Returns:
        The metrics of :meth:`SegmentationMetrics.compute`; the main one is ``mIoU``.
    """
    model.eval()
    metrics = SegmentationMetrics(num_classes)
    skipped = 0
    with whole_parameters(model):
        for batch in batches:
            skipped += sum(batch.skips.values())
            for image, label in zip(batch.images, batch.labels):
                logits = predict_logits(model, image.to(device, dtype=dtype), mode, crop_size, stride)
                metrics.update(_resize(logits[None], label.shape[-2:])[0].argmax(0), label.to(device))
    if skipped:
        logger.warning("%d unreadable evaluation image(s) skipped on this rank; the metrics leave them out", skipped)
    collectives.sum_across_ranks(metrics.areas)
    return metrics.compute()


class SegmentationTask:
    """UperNet fine-tuning on ADE20K-format data, driven by the trainer (``task: segmentation``).

    Reads ``cfg.model`` (backbone name, ``num_classes``, ``kwargs``, ``pretrained_checkpoint`` = a
    backbone export), ``cfg.segmentation`` (dataset root, crop and base sizes, inference mode, head
    widths), ``cfg.data`` (``num_workers``, ``augment.hflip``/``mean``/``std``) and ``cfg.train``.

    Args:
        cfg: the run's configuration.
        runtime: device, dtype and distributed environment.
    """

    main_metric = "mIoU"

    def __init__(self, cfg: RootConfig, runtime: Runtime) -> None:
        self.cfg, self.runtime = cfg, runtime
        self.options = task_options(cfg, "segmentation")

    def build_model(self) -> nn.Module:
        """UperNet on the backbone, its encoder loaded from ``model.pretrained_checkpoint``."""
        m, o, a = self.cfg.model, self.options, self.cfg.data.augment
        return UperNetSegmentor(m.name, m.num_classes, o.crop_size, weights=m.pretrained_checkpoint,
                                model_kwargs=encoder_kwargs(m), pyramid_channels=o.pyramid_channels,
                                head_channels=o.head_channels,
                                aux_channels=o.aux_channels if o.aux_weight > 0 else 0,  # weight 0 disables the head
                                mean=a.mean, std=a.std)

    def example_input(self) -> torch.Tensor:
        size = self.options.crop_size
        return torch.zeros(1, 3, size, size, device=self.runtime.device, dtype=self.runtime.dtype)

    def build_data(self) -> Dict[str, Any]:
        """This rank's training stream and evaluation batches (one image per batch)."""
        o, env = self.options, self.runtime.env
        sizes = dict(base_size=o.base_size, crop_size=o.crop_size, num_classes=self.cfg.model.num_classes)
        train = ADE20KSegmentation(o.root, o.train_split, train=True, scale_range=o.scale_range,
                                   hflip=self.cfg.data.augment.hflip, **sizes)
        val = ADE20KSegmentation(o.root, o.val_split, train=False, **sizes)
        common = dict(rank=env.rank, world_size=env.world_size, num_workers=self.cfg.data.num_workers)
        return {
            "train": MapTrainStream(train, collate_segmentation, micro_batch_size=self.cfg.train.micro_batch_size,
                                    seed=self.cfg.train.seed, **common),
            "val": eval_loader(val, collate_segmentation, batch_size=1, **common),
        }

    def training_loss(self, model: nn.Module, batch: SegmentationBatch) -> Tuple[torch.Tensor, Dict[str, float]]:
        return segmentation_loss(model, batch, self.runtime.device, self.options.aux_weight, self.runtime.dtype)

    def evaluate(self, model: nn.Module, val: Iterable[SegmentationBatch]) -> Dict[str, float]:
        """mIoU, mAcc and aAcc (%) over every rank's share; the model is left in training mode."""
        o = self.options
        metrics = evaluate_segmentation(model, val, self.cfg.model.num_classes, self.runtime.device, o.inference,
                                        o.crop_size, o.slide_stride, self.runtime.dtype)
        model.train()
        return metrics
