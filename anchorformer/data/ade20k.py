"""ADE20K-format semantic segmentation data: ``images/<split>/*.jpg`` and
``annotations/<split>/*.png`` (same stem), 150 classes.

Labels follow the usual ``reduce_zero_label``: value 0 ("other") becomes the ignore index 255 and
1..150 become classes 0..149; any value above ``num_classes`` is ignored too. Training samples
get mmsegmentation's standard pipeline: random rescale (ratio 0.5-2 of the base size), random
crop, horizontal flip, photometric distortion, padding to the crop size (label padded with 255).
Evaluation samples are rescaled to the base size and keep their original-size label, which the
prediction is resized back to. Images stay in [0, 1]; the segmentor normalises. A sample whose
image or label PNG cannot be decoded (``decode_error``) or whose label does not fit its image
(``missing_label``) is skipped and counted, never fatal.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Literal, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import ColorJitter

from anchorformer.data.dense import SkippedSample, drop_skipped, skip_sample
from anchorformer.data.stages import SkipCounter

__all__ = ["IGNORE_INDEX", "ADE20K_NUM_CLASSES", "ADE20KSegmentation", "SegmentationBatch", "collate_segmentation"]

IGNORE_INDEX = 255
"""Label value that contributes to neither the loss nor the metrics."""
ADE20K_NUM_CLASSES = 150

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass
class SegmentationBatch:
    """Training: ``images`` (B, 3, crop, crop) and ``labels`` (B, crop, crop) tensors. Evaluation:
    lists (sizes differ). ``skips`` counts the samples left out, by reason."""

    images: torch.Tensor | List[torch.Tensor]
    labels: torch.Tensor | List[torch.Tensor]
    skips: Dict[str, int]


def collate_segmentation(samples: List[Tuple[torch.Tensor, torch.Tensor] | SkippedSample]) -> SegmentationBatch:
    """DataLoader collate function: stacks same-size samples (training crops), keeps lists
    otherwise, and drops the samples the reader skipped, counting them by reason."""
    kept, skips = drop_skipped(samples)
    images, labels = [image for image, _ in kept], [label for _, label in kept]
    if kept and all(image.shape == images[0].shape for image in images):
        return SegmentationBatch(torch.stack(images), torch.stack(labels), skips)
    return SegmentationBatch(images, labels, skips)


class ADE20KSegmentation(Dataset):
    """ADE20K-layout reader.

    Args:
        root: the dataset folder holding ``images/`` and ``annotations/``.
        split: sub-folder name (``training`` or ``validation``).
        train: training pipeline (random rescale, crop, flip, colour) instead of evaluation.
        base_size: shorter image side in pixels at scale 1 (512 for ADE20K); the longer side is
            capped at 4x this.
        crop_size: square training crop in pixels.
        scale_range: training rescale ratios (min, max) relative to ``base_size``.
        hflip: training flip probability.
        num_classes: classes after reducing label 0 to the ignore index.

    Raises:
        ValueError: missing folders, no images, an image without its label PNG, or bad sizes.
    """

    def __init__(self, root: str | Path, split: Literal["training", "validation"] | str, train: bool,
                 base_size: int = 512, crop_size: int = 512, scale_range: Tuple[float, float] = (0.5, 2.0),
                 hflip: float = 0.5, num_classes: int = ADE20K_NUM_CLASSES) -> None:
        root = Path(root)
        image_dir, label_dir = root / "images" / split, root / "annotations" / split
        for folder in (image_dir, label_dir):
            if not folder.is_dir():
                raise ValueError(f"ADE20K folder {folder} does not exist; the dataset root must hold "
                                 f"images/{split}/*.jpg and annotations/{split}/*.png (ADEChallengeData2016 layout)")
        images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        if not images:
            raise ValueError(f"no images (*.jpg, *.png) in {image_dir}")
        unlabeled = [p.name for p in images if not (label_dir / f"{p.stem}.png").is_file()]
        if unlabeled:
            raise ValueError(f"{len(unlabeled)} image(s) in {image_dir} have no label PNG of the same name in "
                             f"{label_dir}, e.g. {unlabeled[:3]}")
        if base_size < 16 or crop_size < 16:
            raise ValueError(f"base_size and crop_size must be >= 16 pixels, got {base_size} and {crop_size}")
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must satisfy 0 < min <= max, got {scale_range}")
        if num_classes < 1 or num_classes >= IGNORE_INDEX:
            raise ValueError(f"num_classes must be in [1, {IGNORE_INDEX - 1}], got {num_classes}")
        self.samples = [(p, label_dir / f"{p.stem}.png") for p in images]
        self.train = train
        self.base_size, self.crop_size, self.scale_range, self.hflip = base_size, crop_size, scale_range, hflip
        self.num_classes = num_classes
        self._jitter = ColorJitter(brightness=0.125, contrast=0.5, saturation=0.5, hue=0.05)
        self.skip_counter = SkipCounter(where=f"ADE20K reader {split}")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor] | SkippedSample:
        image_path, label_path = self.samples[index]
        try:
            with Image.open(image_path) as opened:
                image = opened.convert("RGB")
            with Image.open(label_path) as opened:
                label = np.array(opened)
        except (OSError, ValueError) as err:
            return skip_sample(self.skip_counter, "decode_error", f"sample {image_path}: {err!r}")
        if label.ndim != 2 or label.shape != (image.height, image.width):
            return skip_sample(self.skip_counter, "missing_label",
                               f"{image_path}: label {label_path} has shape {label.shape}, the image is "
                               f"{image.height}x{image.width} (need one single-channel PNG of the image's size)")
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
        target = self._reduce_zero_label(torch.from_numpy(label.astype(np.int64)))
        if self.train:
            return self._augment(pixels, target)
        return _resize_image(pixels, self._scaled_size(pixels.shape[-2:], 1.0)), target

    def _reduce_zero_label(self, label: torch.Tensor) -> torch.Tensor:
        classes = label - 1
        return torch.where((classes >= 0) & (classes < self.num_classes), classes, torch.full_like(label, IGNORE_INDEX))

    def _scaled_size(self, size: torch.Size, ratio: float) -> Tuple[int, int]:
        height, width = size
        scale = ratio * min(self.base_size / min(height, width), 4 * self.base_size / max(height, width))
        return max(1, round(height * scale)), max(1, round(width * scale))

    def _augment(self, pixels: torch.Tensor, label: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        # torch's generator: DataLoader re-seeds it per worker and epoch from the main process.
        ratio = float(torch.empty(()).uniform_(*self.scale_range))
        size = self._scaled_size(pixels.shape[-2:], ratio)
        pixels = _resize_image(pixels, size)
        label = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()
        top = int(torch.randint(0, max(size[0] - self.crop_size, 0) + 1, ()))
        left = int(torch.randint(0, max(size[1] - self.crop_size, 0) + 1, ()))
        pixels = pixels[:, top:top + self.crop_size, left:left + self.crop_size]
        label = label[top:top + self.crop_size, left:left + self.crop_size]
        if torch.rand(()).item() < self.hflip:
            pixels, label = pixels.flip(-1), label.flip(-1)
        pixels = self._jitter(pixels)
        pad_h, pad_w = self.crop_size - pixels.shape[1], self.crop_size - pixels.shape[2]
        pixels = F.pad(pixels, (0, pad_w, 0, pad_h), value=0.0)
        label = F.pad(label, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
        return pixels, label


def _resize_image(pixels: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    if tuple(pixels.shape[-2:]) == tuple(size):
        return pixels
    return F.interpolate(pixels[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0].clamp_(0, 1)
