"""Batched image augmentation on any device: RandAugment / AutoAugment / colour-jitter ops,
normalisation, random erasing and Mixup/CutMix applied to a whole batch at once, each image with
its own parameters.

The parameters are drawn per sample by timm's own transforms (``fast_transforms`` records what
timm would have done to each image); this module does the pixel work the way Pillow does it:
Pillow's formulas, values kept as float32 integers 0..255 and truncated to them after every op
(as each Pillow op returns a uint8 image), Pillow's fill and edge rule for the geometric ops.
Where the pixels can differ from Pillow's by a level or two: the geometric ops interpolate with
``grid_sample`` (bicubic a = -0.75, Pillow's affine bicubic uses a = -1) and round instead of
truncating.

Two consumers: the ``fast`` pipeline runs :func:`apply_ops` and :func:`normalize` in the loader
workers on CPU tensors; ``augment_on=gpu`` ships the uint8 crops and their plan
(:class:`PlannedBatch`) to the training process, where :class:`DeviceAugment` runs everything on
the training device, seeded per batch so that exact resume holds."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F

from anchorformer.data.stages import seeded_rngs

__all__ = ["AUGMENT_OPS", "GEOMETRIC_OPS", "RESAMPLE_CODES", "PlannedBatch", "apply_ops", "normalize",
           "erase_boxes", "DeviceAugment"]

GEOMETRIC_OPS = ("rotate", "shear_x", "shear_y", "translate_x_rel", "translate_y_rel", "translate_x_abs",
                 "translate_y_abs")
"""The ops that move pixels (timm function names); they take a resample mode and a fill colour."""
AUGMENT_OPS = ("auto_contrast", "equalize", "invert", "posterize", "solarize", "solarize_add", "color",
               "contrast", "brightness", "sharpness") + GEOMETRIC_OPS
"""Every op this module implements, by the name of timm's function (``timm.data.auto_augment``);
an op's id in a :class:`PlannedBatch` is its index here."""
RESAMPLE_CODES = {"nearest": 0, "bilinear": 1, "bicubic": 2}
"""Resample modes of the geometric ops as stored in :attr:`PlannedBatch.resample`."""
_GRID_MODES = {code: name for name, code in RESAMPLE_CODES.items()}


@dataclass
class PlannedBatch:
    """A batch of uint8 crops and what remains to be done to each: the augmentation ops, the
    erasing boxes, and the seeds of the batch-level randomness.

    ``ops`` (B, L) int64 holds op ids (``AUGMENT_OPS`` indices, -1 for none) in the order they
    apply, ``args`` (B, L) float64 their timm arguments, ``resample`` (B, L) int64 the geometric
    ops' resample codes; ``erase_boxes`` (B, K, 4) int64 holds (top, left, height, width) of each
    erased box, height 0 for none. ``ops``, ``resample`` and ``erase_boxes`` stay on the CPU (they
    decide which kernels run)."""
    pixels: torch.Tensor
    ops: torch.Tensor
    args: torch.Tensor
    resample: torch.Tensor
    erase_boxes: torch.Tensor
    mix_seed: int = -1
    """seed of the batch's Mixup/CutMix draw (-1: set by the stream before the batch leaves a worker)"""
    noise_seed: int = -1
    """seed of the erasing noise drawn on the device"""

    def __len__(self) -> int:
        return len(self.pixels)

    def pin_memory(self) -> "PlannedBatch":
        """The same batch with its pixels in page-locked memory (DataLoader's ``pin_memory``)."""
        return replace(self, pixels=self.pixels.pin_memory())


def _truncate(values: torch.Tensor) -> torch.Tensor:
    """Pillow's float -> uint8 store: clip to 0..255, truncate."""
    return values.clamp_(0.0, 255.0).floor_()


def _blend(degenerate: torch.Tensor, images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``Image.blend(degenerate, image, factor)``, the core of every ImageEnhance op (float32 maths)."""
    factor = factor.to(torch.float32).view(-1, 1, 1, 1)
    return _truncate(degenerate + factor * (images - degenerate))


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB -> L conversion (ITU-R 601-2 luma in 16-bit fixed point), (n, 1, H, W); exact in
    float32 because every intermediate is an integer below 2**24."""
    red, green, blue = images.unbind(1)
    return torch.floor((red * 19595 + green * 38470 + blue * 7471 + 32768) / 65536).unsqueeze(1)


def _lookup(images: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """Map every value through its image and channel's table, (n, C, 256): ``Image.point``."""
    n, channels, height, width = images.shape
    index = images.reshape(n, channels, height * width).long()
    return tables.to(images.dtype).gather(2, index).view(n, channels, height, width)


def _auto_contrast(images: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    """ImageOps.autocontrast: stretch each channel's range to 0..255 (Pillow's table, in float64)."""
    low = images.amin(dim=(2, 3)).double().unsqueeze(2)
    high = images.amax(dim=(2, 3)).double().unsqueeze(2)
    scale = 255.0 / (high - low).clamp(min=1.0)
    levels = torch.arange(256, device=images.device, dtype=torch.float64)
    tables = torch.where(high > low, (levels * scale - low * scale).floor_().clamp_(0.0, 255.0), levels)
    return _lookup(images, tables)


def _equalize(images: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    """ImageOps.equalize per image and channel: a table from the cumulative histogram."""
    n, channels, height, width = images.shape
    values = images.reshape(n * channels, height * width).long()
    histogram = torch.zeros((n * channels, 256), dtype=torch.int64, device=images.device)
    histogram.scatter_add_(1, values, torch.ones_like(values))
    top = values.amax(dim=1, keepdim=True)
    step = (height * width - histogram.gather(1, top)) // 255
    before = histogram.cumsum(1) - histogram
    tables = ((step // 2 + before) // step.clamp(min=1)).clamp_(max=255)
    identity = ((histogram > 0).sum(1, keepdim=True) <= 1) | (step == 0)
    tables = torch.where(identity, torch.arange(256, device=images.device), tables)
    return _lookup(images, tables.view(n, channels, 256))


def _invert(images: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    return 255.0 - images


def _posterize(images: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the top ``bits`` bits (0 gives black, 8 or more the image unchanged)."""
    step = torch.pow(2.0, (8 - bits).clamp(0, 8)).to(images.dtype).view(-1, 1, 1, 1)
    return torch.floor(images / step) * step


def _solarize(images: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    threshold = threshold.to(images.dtype).view(-1, 1, 1, 1)
    return torch.where(images < threshold, images, 255.0 - images)


def _solarize_add(images: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    """timm's solarize_add: add ``add`` to values below 128 (threshold timm's default), clip at 255."""
    add = add.to(images.dtype).view(-1, 1, 1, 1)
    return torch.where(images < 128.0, (images + add).clamp_(max=255.0), images)


def _color(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(_grayscale(images), images, factor)


def _contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Contrast: blend with the grey of the rounded mean luma."""
    mean = torch.floor(_grayscale(images).double().mean(dim=(2, 3), keepdim=True) + 0.5)
    return _blend(mean.to(images.dtype), images, factor)


def _brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(torch.zeros_like(images), images, factor)


def _sharpness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Sharpness: blend with ImageFilter.SMOOTH (3x3 ones with centre 5, over 13,
    rounded); Pillow's filter leaves the one-pixel border as it was."""
    rows = images[:, :, :-2] + images[:, :, 1:-1] + images[:, :, 2:]
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]  # 3x3 sums of the interior, exact in float32
    degenerate = images.clone()
    interior = degenerate[:, :, 1:-1, 1:-1]
    interior.mul_(4.0).add_(box).div_(13.0).add_(0.5).floor_()
    return _blend(degenerate, images, factor)


def _affine_matrices(kind: str, arg: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pillow's affine data (a, b, c, d, e, f) of each geometric op, (n, 6) float64: an output
    pixel at (x, y) reads the input at (a x + b y + c, d x + e y + f), pixel edges at integers."""
    one, zero = torch.ones_like(arg), torch.zeros_like(arg)
    if kind == "rotate":
        # Image.rotate about the centre (w / 2, h / 2), as an affine map from output to input.
        angle = -arg * (math.pi / 180.0)
        cos, sin = torch.cos(angle), torch.sin(angle)
        centre_x, centre_y = width / 2.0, height / 2.0
        shift_x = cos * -centre_x + sin * -centre_y + centre_x
        shift_y = -sin * -centre_x + cos * -centre_y + centre_y
        return torch.stack([cos, sin, shift_x, -sin, cos, shift_y], dim=1)
    shifts = {"shear_x": (one, arg, zero, zero, one, zero), "shear_y": (one, zero, zero, arg, one, zero),
              "translate_x_rel": (one, zero, arg * width, zero, one, zero),
              "translate_y_rel": (one, zero, zero, zero, one, arg * height),
              "translate_x_abs": (one, zero, arg, zero, one, zero),
              "translate_y_abs": (one, zero, zero, zero, one, arg)}
    return torch.stack(shifts[kind], dim=1)


def _affine(images: torch.Tensor, matrices: torch.Tensor, resample: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """``Image.transform(AFFINE)`` with per-image matrices: output pixels whose source lies outside
    the image get ``fill``; inside, neighbours past the edge repeat the edge, and interpolated
    values are truncated to integers (Pillow's rules)."""
    n, channels, height, width = images.shape
    a, b, c, d, e, f = matrices.unbind(1)
    # Pillow's map in pixel-edge coordinates, rewritten for affine_grid's [-1, 1] pixel centres.
    theta = torch.stack([
        torch.stack([a, b * height / width, a + b * height / width + 2 * c / width - 1], dim=1),
        torch.stack([d * width / height, e, d * width / height + e + 2 * f / height - 1], dim=1)], dim=1)
    fill = fill.to(images.device, images.dtype).view(1, channels, 1, 1)
    out = torch.empty_like(images)
    for code in resample.unique().tolist():
        rows = (resample == code).nonzero().squeeze(1)
        if len(rows) == n:
            rows = slice(None)
        # float64 coordinates, as Pillow computes them: a whole-pixel shift stays exact.
        grid = F.affine_grid(theta[rows].to(images.device), [len(resample[rows]), channels, height, width],
                             align_corners=False)
        inside = ((grid >= -1.0) & (grid < 1.0)).all(dim=-1).unsqueeze(1)
        if _GRID_MODES[code] == "nearest":
            # The pixel the source point falls in (grid_sample would round ties to even); the nudge
            # keeps a source point on a pixel edge in the pixel to its right, as Pillow's floor does.
            cols = ((grid[..., 0] + 1.0) * (width / 2.0) + 1e-9).floor_().long().clamp_(0, width - 1)
            lines = ((grid[..., 1] + 1.0) * (height / 2.0) + 1e-9).floor_().long().clamp_(0, height - 1)
            index = (lines * width + cols).flatten(1).unsqueeze(1).expand(-1, channels, -1)
            values = images[rows].flatten(2).gather(2, index).view(-1, channels, height, width)
        else:
            values = F.grid_sample(images[rows], grid.to(images.dtype), mode=_GRID_MODES[code],
                                   padding_mode="border", align_corners=False)
            # A whole number computed as 2.9999998 must stay 3: truncate after a small nudge.
            values = values.add_(1e-3).floor_().clamp_(0.0, 255.0)
        out[rows] = torch.where(inside, values, fill)
    return out


_PIXEL_OPS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "auto_contrast": _auto_contrast, "equalize": _equalize, "invert": _invert, "posterize": _posterize,
    "solarize": _solarize, "solarize_add": _solarize_add, "color": _color, "contrast": _contrast,
    "brightness": _brightness, "sharpness": _sharpness,
}


def _apply_op(kind: str, images: torch.Tensor, arg: torch.Tensor, resample: torch.Tensor,
              fill: torch.Tensor) -> torch.Tensor:
    if kind in GEOMETRIC_OPS:
        return _affine(images, _affine_matrices(kind, arg, images.shape[2], images.shape[3]), resample, fill)
    return _PIXEL_OPS[kind](images, arg)


def apply_ops(images: torch.Tensor, ops: torch.Tensor, args: torch.Tensor, resample: torch.Tensor,
              fill: torch.Tensor) -> torch.Tensor:
    """Apply each image's ops in order, one batched call per (layer, op) over the images that drew it.

    Args:
        images: float32 (B, 3, H, W) holding integers 0..255, on any device (changed in place).
        ops, args, resample: the plan (see :class:`PlannedBatch`); ``ops`` and ``resample`` on the CPU.
        fill: (3,) colour of the area the geometric ops uncover, 0..255.

    Returns:
        ``images``, augmented.
    """
    for layer in range(ops.shape[1]):
        column = ops[:, layer]
        for op_id in column.unique().tolist():
            if op_id < 0:
                continue
            rows = (column == op_id).nonzero().squeeze(1)
            on_device = rows.to(images.device)
            arg = args[rows, layer].to(images.device)
            images[on_device] = _apply_op(AUGMENT_OPS[op_id], images[on_device], arg, resample[rows, layer], fill)
    return images


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``ToTensor`` + ``Normalize`` of a batch of 0..255 values with timm's float32 operations
    (divide by 255, subtract the mean, divide by the std); a float32 batch is changed in place."""
    mean = mean.to(images.device, torch.float32).view(1, -1, 1, 1)
    std = std.to(images.device, torch.float32).view(1, -1, 1, 1)
    return images.float().div_(255.0).sub_(mean).div_(std)


def erase_boxes(images: torch.Tensor, boxes: torch.Tensor, mode: str, generator: torch.Generator) -> torch.Tensor:
    """Fill each (top, left, height, width) box of ``boxes`` (B, K, 4) with timm's random-erasing
    fill: per-pixel standard normals (``pixel``), one normal colour per box (``rand``) or 0
    (``const``), drawn from ``generator`` (on the images' device). Boxes of height 0 are unused."""
    if not bool((boxes[..., 2] > 0).any()):
        return images
    n, channels, height, width = images.shape
    boxes = boxes.to(images.device)
    top, left, box_height, box_width = boxes.unbind(-1)
    rows = torch.arange(height, device=images.device)
    cols = torch.arange(width, device=images.device)
    in_rows = (rows >= top[..., None]) & (rows < (top + box_height)[..., None])
    in_cols = (cols >= left[..., None]) & (cols < (left + box_width)[..., None])
    masks = in_rows[..., :, None] & in_cols[..., None, :]  # (B, K, H, W)
    if mode == "pixel":
        noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
        return torch.where(masks.any(dim=1, keepdim=True), noise, images)
    for box in range(boxes.shape[1]):
        if mode == "rand":
            colour = torch.randn((n, channels, 1, 1), generator=generator, device=images.device, dtype=images.dtype)
        else:
            colour = torch.zeros((), device=images.device, dtype=images.dtype)
        images = torch.where(masks[:, box].unsqueeze(1), colour, images)
    return images


class DeviceAugment:
    """``data.augment_on=gpu``: turn a :class:`PlannedBatch` into training images on the device.

    Moves the uint8 crops to ``device``, applies their ops, normalises, erases, and mixes the
    batch with timm's Mixup under the batch's seed, exactly as the CPU pipelines order them. Every
    random draw is seeded from the batch, so a batch augments the same way after a resume.

    Args:
        fill: (3,) fill colour of the geometric ops, 0..255.
        mean, std: normalisation (RGB, 0..1 units).
        erase_mode: timm's random-erasing mode (const, rand, pixel).
        mixup: timm's ``Mixup`` (or None): ``(images, int targets) -> (images, soft targets)``.
    """

    def __init__(self, fill: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, erase_mode: str,
                 mixup: Callable | None):
        self.fill, self.mean, self.std = fill, mean, std
        self.erase_mode = erase_mode
        self.mixup = mixup

    def __call__(self, batch: PlannedBatch, targets: torch.Tensor,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Augmented float32 (B, 3, H, W) images and targets (soft with mixup), on ``device``."""
        assert batch.mix_seed >= 0 and batch.noise_seed >= 0, "the stream did not seed this batch"
        images = batch.pixels.to(device, non_blocking=True).to(torch.float32)
        images = apply_ops(images, batch.ops, batch.args, batch.resample, self.fill)
        images = normalize(images, self.mean, self.std)
        generator = torch.Generator(device=images.device).manual_seed(batch.noise_seed)
        images = erase_boxes(images, batch.erase_boxes, self.erase_mode, generator)
        targets = targets.to(device, non_blocking=True)
        if self.mixup is not None:
            with seeded_rngs(batch.mix_seed):
                images, targets = self.mixup(images, targets)
        return images, targets
