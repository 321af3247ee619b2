"""Detection stage: the Mask R-CNN network (``anchorformer.models.mask_rcnn``) trained on
COCO-format data, its loss, and its evaluation with pycocotools (bbox and segm AP).

Augmentation is the classic multi-scale training (the shorter side drawn from ``train_scales``,
the longer side capped at ``image_size``) plus horizontal flips; evaluation uses the largest
scale. Boxes and masks come back at the original image size.
"""
from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from anchorformer.config import RootConfig
from anchorformer.data.coco import CocoInstances, DetectionBatch, collate_detection
from anchorformer.data.dense import MapTrainStream, eval_loader
from anchorformer.dist import collectives
from anchorformer.dist.zero import whole_parameters
from anchorformer.models.mask_rcnn import build_detector
from anchorformer.tasks.base import Runtime
from anchorformer.tasks.dense_common import task_options
from anchorformer.tasks.preflight import check_exists, meta_network

__all__ = ["DetectionTask", "detection_loss", "move_batch", "predict_coco_results", "coco_metrics",
           "evaluate_detection"]

logger = logging.getLogger(__name__)

_AP_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def move_batch(batch: DetectionBatch, device: torch.device, dtype: torch.dtype = torch.float32
               ) -> Tuple[List[torch.Tensor], List[Dict[str, torch.Tensor]]]:
    """Images (as ``dtype``) and targets of a batch on ``device``."""
    images = [image.to(device, dtype=dtype, non_blocking=True) for image in batch.images]
    targets = [{key: value.to(device, non_blocking=True) for key, value in target.items()} for target in batch.targets]
    return images, targets


def detection_loss(model: nn.Module, batch: DetectionBatch, device: torch.device,
                   dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, Dict[str, float]]:
    """Mask R-CNN's training loss (RPN + box + mask terms, summed) on one batch.

    Args:
        model: the detector in training mode (or the DeepSpeed engine wrapping it).
        batch: a batch from :func:`anchorformer.data.coco.collate_detection`.
        device: where the model lives.
        dtype: dtype of the model's weights (images are cast to it).

    Returns:
        The total loss and each term as a float, for logging.
    """
    images, targets = move_batch(batch, device, dtype)
    losses = model(images, targets)
    total = sum(losses.values())
    return total, {name: float(value.detach()) for name, value in losses.items()}


@torch.no_grad()
def predict_coco_results(model: nn.Module, batches: Iterable[DetectionBatch], dataset: CocoInstances,
                         device: torch.device, dtype: torch.dtype = torch.float32, mask_threshold: float = 0.5
                         ) -> List[Dict[str, Any]]:
    """Run the detector and return COCO result records (bbox in xywh, segmentation as RLE).

    Args:
        model: the detector; it is put in eval mode.
        batches: evaluation batches (this rank's share).
        dataset: the reader, for mapping labels back to category ids.
        device: where the model lives.
        dtype: dtype of the model's weights.
        mask_threshold: probability above which a mask pixel is foreground.

    Returns:
        One dict per detection: ``image_id``, ``category_id``, ``bbox``, ``score``, ``segmentation``.
    """
    model.eval()
    results: List[Dict[str, Any]] = []
    skipped = 0
    with whole_parameters(model):
        for batch in batches:
            skipped += sum(batch.skips.values())
            images, targets = move_batch(batch, device, dtype)
            for target, output in zip(targets, model(images)):
                results.extend(_to_coco_records(int(target["image_id"]), output, dataset, mask_threshold))
    if skipped:
        logger.warning("%d unreadable evaluation image(s) skipped on this rank; they count as images without "
                       "detections", skipped)
    return results


def _to_coco_records(image_id: int, output: Dict[str, torch.Tensor], dataset: CocoInstances,
                     mask_threshold: float) -> List[Dict[str, Any]]:
    boxes = output["boxes"].float().cpu()
    boxes[:, 2:] -= boxes[:, :2]
    masks = (output["masks"][:, 0].float() > mask_threshold).cpu().numpy().astype(np.uint8)
    records = []
    for box, score, label, mask in zip(boxes.tolist(), output["scores"].tolist(), output["labels"].tolist(), masks):
        rle = mask_utils.encode(np.asfortranarray(mask))
        rle["counts"] = rle["counts"].decode("ascii")
        records.append({"image_id": image_id, "category_id": dataset.category_id(label), "bbox": box,
                        "score": score, "segmentation": rle})
    return records


def coco_metrics(annotation_file: str | Path, results: List[Dict[str, Any]], image_ids: Sequence[int]
                 ) -> Dict[str, float]:
    """bbox and segm AP (in %) of ``results`` against the ground truth, over ``image_ids``.

    Args:
        annotation_file: the instances JSON of the evaluated images.
        results: COCO result records from every rank.
        image_ids: the images that were evaluated.

    Returns:
        ``bbox_AP``, ``bbox_AP50``, ``bbox_AP75``, ``bbox_APs/m/l`` and the same for ``segm_``;
        0 for every entry when there is no detection at all.
    """
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):
        ground_truth = COCO(str(annotation_file))
    metrics: Dict[str, float] = {}
    for iou_type in ("bbox", "segm"):
        if not results:
            metrics.update({f"{iou_type}_{name}": 0.0 for name in _AP_NAMES})
            continue
        with contextlib.redirect_stdout(quiet):
            evaluator = COCOeval(ground_truth, ground_truth.loadRes(results), iou_type)
            evaluator.params.imgIds = sorted(image_ids)
            evaluator.evaluate()
            evaluator.accumulate()
        summary = io.StringIO()
        with contextlib.redirect_stdout(summary):
            evaluator.summarize()
        logger.info("COCO %s evaluation:\n%s", iou_type, summary.getvalue().rstrip())
        # COCOeval reports -1 for an area range without ground truth: shown as 0.
        metrics.update({f"{iou_type}_{name}": max(float(value), 0.0) * 100.0
                        for name, value in zip(_AP_NAMES, evaluator.stats)})
    return metrics


def evaluate_detection(model: nn.Module, batches: Iterable[DetectionBatch], dataset: CocoInstances,
                       device: torch.device, dtype: torch.dtype = torch.float32) -> Dict[str, float]:
    """Detect on this rank's share of the validation set, gather every rank's records, and score
    them with COCOeval on rank 0 (the metrics are broadcast, so every rank returns them).

    Args:
        model: the detector (unwrapped module).
        batches: this rank's evaluation batches; together the ranks cover the set once.
        dataset: the evaluation reader.
        device: where the model lives.
        dtype: dtype of the model's weights.

    Returns:
        The metrics of :func:`coco_metrics`; the main one is ``bbox_AP``.
    """
    results = predict_coco_results(model, batches, dataset, device, dtype)
    gathered = collectives.all_gather_objects(results)
    metrics = None
    if collectives.rank() == 0:
        merged = [record for records in gathered for record in records]
        metrics = coco_metrics(dataset.annotation_file, merged, [image["id"] for image in dataset.images])
    return collectives.broadcast_object(metrics)


def _detector(cfg: RootConfig, weights: Optional[str]) -> nn.Module:
    """The network of a detection config, its encoder loaded from ``weights`` (None: initialised)."""
    m, o, a = cfg.model, task_options(cfg, "detection"), cfg.data.augment
    return build_detector(m.name, m.num_classes, o.image_size, o.train_scales, weights=weights,
                          model_kwargs=m.timm_kwargs(classifier=False), out_channels=o.pyramid_channels,
                          mask_head_channels=o.mask_head_channels, rois_per_image=o.rois_per_image,
                          detections_per_image=o.detections_per_image, mean=a.mean, std=a.std)


class DetectionTask:
    """Mask R-CNN fine-tuning on COCO-format data, driven by the trainer (``task: detection``).

    Reads ``cfg.model`` (backbone name, ``num_classes`` = object categories, ``kwargs``,
    ``pretrained_checkpoint`` = a backbone export), ``cfg.detection`` (dataset paths, sizes, head
    widths), ``cfg.data`` (``num_workers``, ``augment.hflip``/``mean``/``std``) and ``cfg.train``.

    Args:
        cfg: the run's configuration.
        runtime: device, dtype and distributed environment.
    """

    main_metric = "bbox_AP"

    @classmethod
    def preflight(cls, cfg: RootConfig, world_size: int) -> nn.Module:
        """The network on the meta device (:func:`tasks.preflight.meta_network`); the annotation
        files and image folders exist.

        Raises:
            ConfigError: naming the key.
        """
        o = task_options(cfg, "detection")
        network = meta_network(cfg.model, lambda: _detector(cfg, weights=None), "detection.image_size")
        for split in ("train", "val"):
            check_exists(str(getattr(o, f"{split}_annotations")), f"detection.{split}_annotations", "file")
            check_exists(str(getattr(o, f"{split}_images")), f"detection.{split}_images", "folder")
        return network

    def __init__(self, cfg: RootConfig, runtime: Runtime) -> None:
        self.cfg, self.runtime = cfg, runtime
        self.options = task_options(cfg, "detection")
        self.val_dataset: Optional[CocoInstances] = None

    def build_model(self) -> nn.Module:
        """Mask R-CNN on the backbone, its encoder loaded from ``model.pretrained_checkpoint``."""
        return _detector(self.cfg, weights=self.cfg.model.pretrained_checkpoint)

    def example_input(self) -> torch.Tensor:
        size = self.options.image_size
        return torch.zeros(1, 3, size, size, device=self.runtime.device, dtype=self.runtime.dtype)

    def build_data(self) -> Dict[str, Any]:
        """This rank's training stream and evaluation batches."""
        o, env = self.options, self.runtime.env
        train = CocoInstances(o.train_annotations, o.train_images, train=True, hflip=self.cfg.data.augment.hflip)
        self.val_dataset = CocoInstances(o.val_annotations, o.val_images, train=False)
        for name, dataset in (("train", train), ("val", self.val_dataset)):
            if dataset.num_classes != self.cfg.model.num_classes:
                raise ValueError(f"{dataset.annotation_file} ({name}) has {dataset.num_classes} categories but "
                                 f"model.num_classes={self.cfg.model.num_classes}; set model.num_classes="
                                 f"{dataset.num_classes}")
        common = dict(rank=env.rank, world_size=env.world_size, num_workers=self.cfg.data.num_workers)
        return {
            "train": MapTrainStream(train, collate_detection, micro_batch_size=self.cfg.train.micro_batch_size,
                                    seed=self.cfg.train.seed, **common),
            "val": eval_loader(self.val_dataset, collate_detection, batch_size=self.cfg.train.micro_batch_size,
                               **common),
        }

    def training_loss(self, model: nn.Module, batch: DetectionBatch) -> Tuple[torch.Tensor, Dict[str, float]]:
        return detection_loss(model, batch, self.runtime.device, self.runtime.dtype)

    def evaluate(self, model: nn.Module, val: Iterable[DetectionBatch]) -> Dict[str, float]:
        """COCO bbox / segm AP (%) over every rank's share; the model is left in training mode."""
        if self.val_dataset is None:
            raise RuntimeError("DetectionTask.evaluate called before build_data")
        metrics = evaluate_detection(model, val, self.val_dataset, self.runtime.device, self.runtime.dtype)
        model.train()
        return metrics
