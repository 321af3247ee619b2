"""Segmentation stage: the UperNet network (``anchorformer.models.upernet``) trained with
cross-entropy (ignore index 255), evaluated by mIoU and pixel accuracy with whole-image or
sliding-window inference.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, List, Literal, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from anchorformer.config import RootConfig
from anchorformer.data.ade20k import IGNORE_INDEX, ADE20KSegmentation, SegmentationBatch, collate_segmentation
from anchorformer.data.dense import MapTrainStream, eval_loader
from anchorformer.dist import collectives
from anchorformer.dist.zero import whole_parameters
from anchorformer.models.upernet import UperNetSegmentor, resize_bilinear
from anchorformer.tasks.base import Runtime
from anchorformer.tasks.dense_common import task_options
from anchorformer.tasks.preflight import check_exists, meta_network

__all__ = ["SegmentationTask", "segmentation_loss", "predict_logits", "SegmentationMetrics", "evaluate_segmentation"]

logger = logging.getLogger(__name__)

_SIZE_DIVISOR = 32  # the coarsest pyramid level is stride 32


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
    terms = {"loss_seg": F.cross_entropy(resize_bilinear(logits, labels.shape[-2:]), labels, ignore_index=IGNORE_INDEX)}
    if aux is not None:
        terms["loss_aux"] = aux_weight * F.cross_entropy(resize_bilinear(aux, labels.shape[-2:]), labels,
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
    return resize_bilinear(logits.float(), (height, width))


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
                metrics.update(resize_bilinear(logits[None], label.shape[-2:])[0].argmax(0), label.to(device))
    if skipped:
        logger.warning("%d unreadable evaluation image(s) skipped on this rank; the metrics leave them out", skipped)
    collectives.sum_across_ranks(metrics.areas)
    return metrics.compute()


def _segmentor(cfg: RootConfig, weights: Optional[str]) -> nn.Module:
    """The network of a segmentation config, its encoder loaded from ``weights`` (None: initialised)."""
    m, o, a = cfg.model, task_options(cfg, "segmentation"), cfg.data.augment
    return UperNetSegmentor(m.name, m.num_classes, o.crop_size, weights=weights,
                            model_kwargs=m.timm_kwargs(classifier=False), pyramid_channels=o.pyramid_channels,
                            head_channels=o.head_channels,
                            aux_channels=o.aux_channels if o.aux_weight > 0 else 0,  # weight 0 disables the head
                            mean=a.mean, std=a.std)


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

    @classmethod
    def preflight(cls, cfg: RootConfig, world_size: int) -> nn.Module:
        """The network on the meta device (:func:`tasks.preflight.meta_network`); the dataset root exists.

        Raises:
            ConfigError: naming the key.
        """
        network = meta_network(cfg.model, lambda: _segmentor(cfg, weights=None), "segmentation.crop_size")
        check_exists(str(task_options(cfg, "segmentation").root), "segmentation.root", "folder")
        return network

    def __init__(self, cfg: RootConfig, runtime: Runtime) -> None:
        self.cfg, self.runtime = cfg, runtime
        self.options = task_options(cfg, "segmentation")

    def build_model(self) -> nn.Module:
        """UperNet on the backbone, its encoder loaded from ``model.pretrained_checkpoint``."""
        return _segmentor(self.cfg, weights=self.cfg.model.pretrained_checkpoint)

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
