"""COCO-format instance data (an instances JSON + an image folder) for the detection stage.

Each sample is ``(image, target)``: a float image in [0, 1] (C, H, W) at its stored size and a
torchvision detection target (``boxes`` xyxy in pixels, ``labels`` in 1..K, ``masks`` (N, H, W)
uint8, ``image_id``). Resizing and normalisation happen inside the detector (multi-scale
training sizes); the reader adds the horizontal flip. Crowd and degenerate boxes are left out of
training targets (COCOeval still sees them in the ground truth). An image that is missing or cannot
be decoded is skipped and counted (``missing_image``, ``decode_error``), never fatal.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from anchorformer.data.dense import SkippedSample, drop_skipped, skip_sample
from anchorformer.data.stages import SkipCounter

__all__ = ["CocoInstances", "DetectionBatch", "collate_detection"]

logger = logging.getLogger(__name__)


@dataclass
class DetectionBatch:
    """A list of images of different sizes, their targets, and the samples skipped, by reason."""

    images: List[torch.Tensor]
    targets: List[Dict[str, torch.Tensor]]
    skips: Dict[str, int]


def collate_detection(samples: List[Tuple[torch.Tensor, Dict[str, torch.Tensor]] | SkippedSample]
                      ) -> DetectionBatch:
    """DataLoader collate function: keeps images as a list (sizes differ) and drops the samples
    the reader skipped, counting them by reason."""
    kept, skips = drop_skipped(samples)
    return DetectionBatch(images=[image for image, _ in kept], targets=[target for _, target in kept], skips=skips)


class CocoInstances(Dataset):
    """COCO instances reader.

    Args:
        annotation_file: the instances JSON (``instances_val2017.json`` layout).
        image_dir: folder holding the images named by ``file_name``.
        train: training mode: random horizontal flips and images without usable annotations left
            out; evaluation mode keeps every image in file order.
        hflip: flip probability in training mode.

    Raises:
        ValueError: the annotation file is missing, not JSON, or not in COCO instances layout.
    """

    def __init__(self, annotation_file: str | Path, image_dir: str | Path, train: bool, hflip: float = 0.5) -> None:
        self.annotation_file = Path(annotation_file)
        self.image_dir = Path(image_dir)
        if not self.image_dir.is_dir():
            raise ValueError(f"COCO image folder {self.image_dir} does not exist; point the data options at the "
                             "folder holding the images (e.g. coco/val2017)")
        data = _read_instances(self.annotation_file)
        self.category_ids = sorted(category["id"] for category in data["categories"])
        self._label_of = {category_id: i + 1 for i, category_id in enumerate(self.category_ids)}
        annotations: Dict[int, List[Dict[str, Any]]] = {}
        for annotation in data["annotations"]:
            annotations.setdefault(annotation["image_id"], []).append(annotation)
        images = sorted(data["images"], key=lambda image: image["id"])
        if train:
            images = [image for image in images
                      if any(self._usable(a) for a in annotations.get(image["id"], []))]
        if not images:
            raise ValueError(f"{self.annotation_file} has no {'annotated ' if train else ''}images")
        self.images = images
        self._annotations = annotations
        self.train = train
        self.hflip = hflip
        self.skip_counter = SkipCounter(where=f"COCO reader {self.annotation_file.name}")

    @property
    def num_classes(self) -> int:
        """Object categories (the detector adds a background class)."""
        return len(self.category_ids)

    def category_id(self, label: int) -> int:
        """The COCO category id of a contiguous label 1..K."""
        return self.category_ids[label - 1]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]] | SkippedSample:
        info = self.images[index]
        path = self.image_dir / info["file_name"]
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except FileNotFoundError:
            return skip_sample(self.skip_counter, "missing_image", f"image {path} does not exist")
        except (OSError, ValueError) as err:
            return skip_sample(self.skip_counter, "decode_error", f"image {path}: {err!r}")
        width, height = image.size
        if (width, height) != (info["width"], info["height"]):
            logger.debug("%s is %dx%d, the JSON says %dx%d; using the file's size",
                         path, width, height, info["width"], info["height"])
        usable = [a for a in self._annotations.get(info["id"], []) if self._usable(a)]
        target = self._target(usable, info["id"], height, width)
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
        # torch's generator: DataLoader re-seeds it per worker and epoch from the main process.
        if self.train and torch.rand(()).item() < self.hflip:
            pixels, target = _flip(pixels, target)
        return pixels, target

    def _usable(self, annotation: Dict[str, Any]) -> bool:
        _, _, w, h = annotation["bbox"]
        return not annotation.get("iscrowd", 0) and w >= 1 and h >= 1 and annotation["category_id"] in self._label_of

    def _target(self, annotations: List[Dict[str, Any]], image_id: int, height: int, width: int
                ) -> Dict[str, torch.Tensor]:
        boxes = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(0, width)
        boxes[:, 1::2].clamp_(0, height)
        masks = np.zeros((len(annotations), height, width), dtype=np.uint8)
        for i, annotation in enumerate(annotations):
            masks[i] = _decode_mask(annotation["segmentation"], height, width)
        return {
            "boxes": boxes,
            "labels": torch.tensor([self._label_of[a["category_id"]] for a in annotations], dtype=torch.int64),
            "masks": torch.from_numpy(masks),
            "image_id": torch.tensor(image_id, dtype=torch.int64),
        }


def _flip(pixels: torch.Tensor, target: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    width = pixels.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    return pixels.flip(-1), dict(target, boxes=boxes, masks=target["masks"].flip(-1))


def _decode_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Polygons, uncompressed RLE or compressed RLE -> a (H, W) binary mask."""
    if isinstance(segmentation, list):
        rles = mask_utils.frPyObjects(segmentation, height, width)
        rle = mask_utils.merge(rles)
    elif isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle)


def _read_instances(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"COCO annotation file {path} does not exist; point the data options at an instances "
                         "JSON (e.g. coco/annotations/instances_val2017.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"COCO annotation file {path} is not valid JSON ({err}); is it truncated?") from err
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(data.get(key), list)]
    if missing:
        raise ValueError(f"{path} is not a COCO instances file: it lacks the list(s) {missing}")
    return data
