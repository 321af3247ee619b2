"""The fast training transform (``data.pipeline: fast``): timm's augmentation with less work.

Each sample is decoded straight to a uint8 (3, H, W) tensor (libjpeg-turbo through
torchvision.io), cropped and resized on the tensor, and flipped. Every random choice is made by
timm's own transform objects, built from the same options as the ``pil`` pipeline and consuming
the same random numbers in the same order: the crop box by timm's
``RandomResizedCropAndInterpolation.get_params``, the flip by the same ``torch.rand(1)``, the
erased boxes (and their noise) by timm's ``RandomErasing`` writing into a stand-in. So a sample
seeded like the ``pil`` pipeline's gets the same crop, flip, augmentation ops, magnitudes and
erasing.

``augment_on: cpu``: the auto-augment ops (RandAugment, AutoAugment, AugMix, three-augment) and
colour jitter are timm's and torchvision's own, on a Pillow image of the crop (Pillow's 8-bit ops
are the fastest on a CPU); the batch is normalised once and erased in the worker
(:func:`augment_in_worker`). ``augment_on: gpu``: the ops only record what they would do, and the
worker sends the uint8 crops with that plan (:func:`collate_planned`) for ``batch_augment`` to
apply on the training device."""
from __future__ import annotations

import io
import random
from dataclasses import dataclass, field, replace
from typing import Iterable, Iterator

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from timm.data.auto_augment import NAME_TO_OP, AugmentOp, AutoAugment, RandAugment
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import MaybeToTensor, RandomResizedCropAndInterpolation
from torch.utils.data import get_worker_info
from torchvision import transforms as tv_transforms
from torchvision.io import ImageReadMode, decode_image

from anchorformer.data.batch_augment import AUGMENT_OPS, GEOMETRIC_OPS, RESAMPLE_CODES, PlannedBatch, normalize
from anchorformer.data.stages import derive_seed
from anchorformer.config import AugmentConfig
from anchorformer.data.transforms import build_train_transform

__all__ = ["decode_rgb", "PlannedImage", "FastTrainTransform", "collate_planned", "normalised_batch", "fill_erasures",
           "augment_in_worker", "seed_planned_batches"]

_PIL_RESAMPLE = {Image.Resampling.NEAREST: "nearest", Image.Resampling.BILINEAR: "bilinear",
                 Image.Resampling.BICUBIC: "bicubic"}
_JITTER_OPS = ("brightness", "contrast", "color")  # ColorJitter's fn ids 0-2 as Pillow ops (3 is hue)


def decode_rgb(data: bytes) -> torch.Tensor:
    """Image bytes -> uint8 RGB (3, H, W) tensor: torchvision.io (libjpeg-turbo, libpng, libwebp)
    first, Pillow for the formats it does not read. Grey and palette images become RGB, EXIF
    orientation is ignored (as ``Image.open(...).convert("RGB")`` does).

    Raises:
        OSError, ValueError, Image.DecompressionBombError: bytes neither decoder can read (the
            errors the stream counts as ``decode_error``).
    """
    try:
        pixels = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:
        with Image.open(io.BytesIO(data)) as opened:
            pixels = torch.from_numpy(np.array(opened.convert("RGB"))).permute(2, 0, 1)
    if pixels.shape[1] * pixels.shape[2] > 2 * Image.MAX_IMAGE_PIXELS:
        raise Image.DecompressionBombError(f"image of {pixels.shape[2]}x{pixels.shape[1]} pixels exceeds "
                                           f"twice Pillow's MAX_IMAGE_PIXELS ({Image.MAX_IMAGE_PIXELS})")
    return pixels


@dataclass
class PlannedImage:
    """One cropped uint8 (3, S, S) image and what remains to be done to it: ``ops`` as (op id in
    ``AUGMENT_OPS``, argument, resample code), ``erasures`` as (top, left, height, width, fill)
    with timm's fill tensor."""
    pixels: torch.Tensor
    ops: list[tuple[int, float, int]] = field(default_factory=list)
    erasures: list[tuple[int, int, int, int, torch.Tensor]] = field(default_factory=list)


class _RecordOp:
    """An ``AugmentOp.aug_fn`` that appends what the op would do to the :class:`PlannedImage`
    passed through instead of changing pixels (the draws around it stay timm's)."""

    def __init__(self, kind: str):
        self.op_id = AUGMENT_OPS.index(kind)
        self.geometric = kind in GEOMETRIC_OPS

    def __call__(self, image: PlannedImage, *level_args: float, **kwargs) -> PlannedImage:
        resample = 0
        if self.geometric:
            # timm's geometric ops pick their resample mode this way (auto_augment._interpolation).
            mode = kwargs.get("resample", Image.Resampling.BICUBIC)
            if isinstance(mode, (list, tuple)):
                mode = random.choice(mode)
            resample = RESAMPLE_CODES[_PIL_RESAMPLE[mode]]
        image.ops.append((self.op_id, float(level_args[0]) if level_args else 0.0, resample))
        return image


class _ErasingTarget:
    """Stands in for the normalised (3, H, W) tensor timm's ``RandomErasing`` writes into and
    keeps each box it writes with its fill."""
    dtype = torch.float32

    def __init__(self, image: PlannedImage):
        self.image = image

    def size(self) -> torch.Size:
        return torch.Size((3, *self.image.pixels.shape[1:]))

    def __setitem__(self, key: tuple[slice, slice, slice], fill: torch.Tensor) -> None:
        _, rows, cols = key
        self.image.erasures.append((rows.start, cols.start, rows.stop - rows.start, cols.stop - cols.start, fill))


def _record_ops(augment: RandAugment | AutoAugment) -> list[AugmentOp]:
    """Make each op of ``augment`` record itself instead of changing pixels; returns the ops."""
    ops = list(augment.ops) if isinstance(augment, RandAugment) else [op for sub in augment.policy for op in sub]
    for op in ops:
        kind = NAME_TO_OP[op.name].__name__
        if kind not in AUGMENT_OPS:
            raise ValueError(f"data.augment_on=gpu does not implement timm's {op.name} op; use data.augment_on=cpu "
                             f"for this augmentation policy")
        op.aug_fn = _RecordOp(kind)
    return ops


def _to_pil(pixels: torch.Tensor) -> Image.Image:
    return Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy())  # a contiguous copy is the fast one


def _from_pil(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)  # asarray is read-only


class FastTrainTransform:
    """uint8 (3, H, W) image -> :class:`PlannedImage`: timm's training transform with the crop and
    flip done on the tensor, the normalisation and erasing left for the batch.

    Args:
        augment: the augmentation options (``data.augment``, as the ``pil`` pipeline takes them).
        image_size: side of the crop, pixels (``data.image_size``).
        on_device: record the auto-augment ops and colour jitter in the plan (``augment_on: gpu``)
            instead of applying them to the crop with Pillow.

    Raises:
        ValueError: with ``on_device``, for the augmentations ``batch_augment`` does not implement
            (three-augment, AugMix, colour jitter of hue), naming ``data.augment_on=cpu``.
    """

    def __init__(self, augment: AugmentConfig, image_size: int, on_device: bool):
        self.on_device = on_device
        self.crop: RandomResizedCropAndInterpolation | None = None
        self.hflip = 0.0
        self.pil_steps: list = []
        self.augment: RandAugment | AutoAugment | None = None
        self.jitter: tv_transforms.ColorJitter | None = None
        self.erasing: RandomErasing | None = None
        self.fill = torch.tensor([128.0, 128.0, 128.0])
        for step in build_train_transform(augment, image_size).transforms:
            if isinstance(step, RandomResizedCropAndInterpolation):
                self.crop = step
            elif isinstance(step, tv_transforms.RandomHorizontalFlip):
                self.hflip = step.p
            elif isinstance(step, tv_transforms.Normalize):
                self.mean, self.std = torch.as_tensor(step.mean).float(), torch.as_tensor(step.std).float()
            elif isinstance(step, RandomErasing):
                self.erasing = step
            elif isinstance(step, MaybeToTensor):
                continue
            elif not on_device:
                self.pil_steps.append(step)  # timm's / torchvision's own op on the Pillow crop
            elif isinstance(step, (RandAugment, AutoAugment)):
                self.fill = torch.tensor([float(value) for value in _record_ops(step)[0].kwargs["fillcolor"]])
                self.augment = step
            elif isinstance(step, tv_transforms.ColorJitter) and step.hue is None:
                self.jitter = step
            else:
                raise ValueError(f"data.augment_on=gpu does not implement {step!r} (from auto_augment="
                                 f"{augment.auto_augment!r}, three_augment={augment.three_augment}, color_jitter="
                                 f"{augment.color_jitter}); use data.augment_on=cpu")
        assert self.crop is not None, "timm's training transform starts with RandomResizedCropAndInterpolation"
        self.erase_mode = self.erasing.mode if self.erasing is not None else None

    def __call__(self, pixels: torch.Tensor) -> PlannedImage:
        """Crop, flip and augment or plan one image, drawing from the RNGs in timm's order."""
        return self.plan(self.augment_pixels(self.crop_and_flip(pixels)))

    def crop_and_flip(self, pixels: torch.Tensor) -> torch.Tensor:
        """timm's random resized crop (its box and interpolation draws), resized on the tensor with
        antialiasing as Pillow resizes, then the horizontal flip."""
        crop = self.crop
        top, left, height, width = crop.get_params(pixels, crop.scale, crop.ratio)
        interpolation = crop.interpolation
        if isinstance(interpolation, (tuple, list)):
            interpolation = random.choice(interpolation)
        pixels = TF.resized_crop(pixels, top, left, height, width, list(crop.size), interpolation=interpolation,
                                 antialias=True)
        if self.hflip > 0 and torch.rand(1) < self.hflip:
            pixels = pixels.flip(-1)
        return pixels

    def augment_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """``augment_on: cpu``: timm's auto-augment / colour jitter on a Pillow image of the crop."""
        if not self.pil_steps:
            return pixels
        image = _to_pil(pixels)
        for step in self.pil_steps:
            image = step(image)
        return _from_pil(image)

    def plan(self, pixels: torch.Tensor) -> PlannedImage:
        """What is left for the batch: the recorded ops (``augment_on: gpu``) and timm's erasing."""
        planned = PlannedImage(pixels)
        if self.augment is not None:
            self.augment(planned)
        if self.jitter is not None:
            self._plan_jitter(planned)
        if self.erasing is not None:
            self.erasing(_ErasingTarget(planned))
        return planned

    def _plan_jitter(self, image: PlannedImage) -> None:
        """torchvision's ColorJitter draws, its brightness / contrast / saturation as Pillow ops."""
        jitter = self.jitter
        order, *factors = jitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
        for fn_id in order.tolist():
            if fn_id < len(_JITTER_OPS) and factors[fn_id] is not None:
                image.ops.append((AUGMENT_OPS.index(_JITTER_OPS[fn_id]), float(factors[fn_id]), 0))


def collate_planned(images: list[PlannedImage]) -> PlannedBatch:
    """Stack planned images into a :class:`PlannedBatch` (the erasing fills are left behind: the
    device draws its own)."""
    layers = max((len(image.ops) for image in images), default=0)
    boxes = max((len(image.erasures) for image in images), default=0)
    ops = torch.full((len(images), layers), -1, dtype=torch.int64)
    args = torch.zeros((len(images), layers), dtype=torch.float64)
    resample = torch.zeros((len(images), layers), dtype=torch.int64)
    erase_boxes = torch.zeros((len(images), boxes, 4), dtype=torch.int64)
    for row, image in enumerate(images):
        for layer, (op_id, arg, mode) in enumerate(image.ops):
            ops[row, layer], args[row, layer], resample[row, layer] = op_id, arg, mode
        for box, erasure in enumerate(image.erasures):
            erase_boxes[row, box] = torch.tensor(erasure[:4])
    pixels = torch.stack([image.pixels for image in images],
                         out=_batch_buffer((len(images), *images[0].pixels.shape), torch.uint8))
    return PlannedBatch(pixels, ops, args, resample, erase_boxes)


def _batch_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty batch tensor; in a loader worker it is made in shared memory, so that handing it
    to the training process does not copy it (the DataLoader moves other tensors there first)."""
    buffer = torch.empty(shape, dtype=dtype)
    return buffer.share_memory_() if get_worker_info() is not None else buffer


def fill_erasures(images: torch.Tensor, planned: list[PlannedImage]) -> torch.Tensor:
    """Write timm's erasing fills into the normalised batch (in place)."""
    for row, image in enumerate(planned):
        for top, left, height, width, fill in image.erasures:
            images[row, :, top:top + height, left:left + width] = fill
    return images


def normalised_batch(pixels: torch.Tensor, transform: FastTrainTransform) -> torch.Tensor:
    """uint8 (B, 3, S, S) crops -> the normalised float32 batch (in shared memory inside a worker)."""
    out = _batch_buffer(tuple(pixels.shape), torch.float32).copy_(pixels)
    return normalize(out, transform.mean, transform.std)


def augment_in_worker(images: list[PlannedImage], transform: FastTrainTransform) -> torch.Tensor:
    """``augment_on: cpu``: stack, normalise once and erase the batch, in the worker.

    Returns:
        Normalised float32 (B, 3, S, S) images, as the ``pil`` pipeline's transform + stack gives.
    """
    assert not any(image.ops for image in images), "augment_on=cpu applies the ops to the crop itself"
    pixels = torch.stack([image.pixels for image in images])
    return fill_erasures(normalised_batch(pixels, transform), images)


def seed_planned_batches(batches: Iterable[tuple], seed_parts: tuple) -> Iterator[tuple]:
    """``augment_on: gpu``: give each batch the seeds of its device-side draws, from ``seed_parts``
    and the batch number (the Mixup seed is the one the CPU pipelines mix that batch with)."""
    for planned, targets, keys, meta in batches:
        planned = replace(planned, mix_seed=derive_seed(*seed_parts, meta.batch),
                          noise_seed=derive_seed(*seed_parts, meta.batch, "erase"))
        yield planned, targets, keys, meta
