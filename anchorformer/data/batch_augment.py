"""Batched image augmentation on any device: RandAugment / AutoAugment / colour-jitter ops,
normalisation, random erasing and Mixup/CutMix applied to a whole batch at once, each image with
its own parameters.

The parameters are drawn per sample by timm's own transforms (``fast_transforms`` records what
timm would have done to each image); this module does the pixel work exactly as Pillow does it,
so that each op gives the same pixels as timm's: Pillow's formulas and rounding, values kept as
float32 integers 0..255 and truncated to them after every op (each Pillow op returns a uint8
image), and for the geometric ops Pillow's affine transform itself (float64 source coordinates,
its cubic with a = -1 or its bilinear, edge pixels repeated, the fill colour outside, nearest in
its 16.16 fixed point). The float64 gathers that exactness takes are cheap on a GPU and slow on a
CPU, where the ``fast`` pipeline keeps Pillow's own ops.

``augment_on=gpu`` ships the uint8 crops and their plan (:class:`PlannedBatch`) to the training
process, where :class:`DeviceAugment` runs the ops, :func:`normalize`, :func:`erase_boxes` and
Mixup on the training device, seeded per batch so that exact resume holds; the ``fast``
pipeline's workers use :func:`normalize` on their CPU batches."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch

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
_RESAMPLE_NAMES = {code: name for name, code in RESAMPLE_CODES.items()}


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


def _levels(images: torch.Tensor) -> torch.Tensor:
    return torch.arange(256, device=images.device, dtype=torch.float64)


def _auto_contrast(images: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    """ImageOps.autocontrast: each channel's range stretched to 0..255 (Pillow's table, in float64)."""
    low = images.amin(dim=(2, 3)).double().unsqueeze(2)
    high = images.amax(dim=(2, 3)).double().unsqueeze(2)
    scale = 255.0 / (high - low).clamp(min=1.0)
    levels = _levels(images)
    return torch.where(high > low, (levels * scale - low * scale).floor_().clamp_(0.0, 255.0), levels)


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
    return torch.where(identity, _levels(images), tables.double()).view(n, channels, 256)


def _invert(images: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    return (255.0 - _levels(images)).expand(len(images), images.shape[1], 256)


def _posterize(images: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the top ``bits`` bits (0 gives black, 8 or more the image unchanged)."""
    step = torch.pow(2.0, (8 - bits).clamp(0, 8)).view(-1, 1, 1)
    return (torch.floor(_levels(images) / step) * step).expand(-1, images.shape[1], 256)


def _solarize(images: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    levels = _levels(images)
    return torch.where(levels < threshold.view(-1, 1, 1), levels, 255.0 - levels).expand(-1, images.shape[1], 256)


def _solarize_add(images: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    """timm's solarize_add: add ``add`` to values below 128 (timm's threshold), clip at 255."""
    levels = _levels(images)
    added = (levels + add.view(-1, 1, 1)).clamp_(max=255.0)
    return torch.where(levels < 128.0, added, levels).expand(-1, images.shape[1], 256)


_POINT_OPS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "auto_contrast": _auto_contrast, "equalize": _equalize, "invert": _invert, "posterize": _posterize,
    "solarize": _solarize, "solarize_add": _solarize_add}
"""Ops that map each value through a table (``Image.point``): images (k, C, H, W) and arguments
(k,) -> float64 tables (k, C, 256)."""


def _color(images: torch.Tensor) -> torch.Tensor:
    return _grayscale(images)


def _contrast(images: torch.Tensor) -> torch.Tensor:
    """The grey of the rounded mean luma."""
    return torch.floor(_grayscale(images).double().mean(dim=(2, 3), keepdim=True) + 0.5).to(images.dtype)


def _brightness(images: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), device=images.device, dtype=images.dtype)


def _sharpness(images: torch.Tensor) -> torch.Tensor:
    """ImageFilter.SMOOTH (3x3 ones with centre 5, over 13, rounded); Pillow's filter leaves the
    one-pixel border as it was."""
    rows = images[:, :, :-2] + images[:, :, 1:-1] + images[:, :, 2:]
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]  # 3x3 sums of the interior, exact in float32
    degenerate = images.clone()
    interior = degenerate[:, :, 1:-1, 1:-1]
    interior.mul_(4.0).add_(box).div_(13.0).add_(0.5).floor_()
    return degenerate


_ENHANCE_OPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "color": _color, "contrast": _contrast, "brightness": _brightness, "sharpness": _sharpness}
"""ImageEnhance ops: each blends the image with its degenerate image (images -> degenerate)."""


def _rows_of(kinds: list[str], kind: str, device: torch.device) -> torch.Tensor:
    return torch.tensor([row for row, name in enumerate(kinds) if name == kind], device=device)


def _point_ops(images: torch.Tensor, kinds: list[str], args: torch.Tensor) -> torch.Tensor:
    """Every image's point op at once: per-image tables, then one lookup."""
    n, channels, height, width = images.shape
    tables = torch.empty((n, channels, 256), device=images.device, dtype=torch.float64)
    args = args.to(images.device)
    for kind in sorted(set(kinds)):
        rows = _rows_of(kinds, kind, images.device)
        tables[rows] = _POINT_OPS[kind](images[rows], args[rows])
    index = images.reshape(n, channels, height * width).long()
    return tables.to(images.dtype).gather(2, index).view(n, channels, height, width)


def _enhance_ops(images: torch.Tensor, kinds: list[str], factors: torch.Tensor) -> torch.Tensor:
    """Every image's ImageEnhance op at once: its degenerate image, then one blend."""
    degenerate = torch.empty_like(images)
    for kind in sorted(set(kinds)):
        rows = _rows_of(kinds, kind, images.device)
        degenerate[rows] = _ENHANCE_OPS[kind](images[rows])
    return _blend(degenerate, images, factors.to(images.device))


def _rotation(degrees: float, width: int, height: int) -> tuple[float, ...]:
    """``Image.rotate(degrees)``'s affine data about the centre, with Pillow's own arithmetic."""
    angle = -math.radians(degrees % 360.0)
    matrix = [round(math.cos(angle), 15), round(math.sin(angle), 15), 0.0,
              round(-math.sin(angle), 15), round(math.cos(angle), 15), 0.0]
    centre_x, centre_y = width / 2, height / 2
    a, b, c, d, e, f = matrix
    matrix[2] = a * -centre_x + b * -centre_y + c + centre_x
    matrix[5] = d * -centre_x + e * -centre_y + f + centre_y
    return tuple(matrix)


def _affine_data(kind: str, value: float, height: int, width: int) -> tuple[float, ...]:
    """Pillow's affine data (a, b, c, d, e, f) of a geometric op, computed in Python floats as timm
    and Pillow do: an output pixel centre (x, y) reads the input at (a x + b y + c, d x + e y + f),
    pixel edges at integers."""
    if kind == "rotate":
        return _rotation(value, width, height)
    return {"shear_x": (1, value, 0, 0, 1, 0), "shear_y": (1, 0, 0, value, 1, 0),
            "translate_x_rel": (1, 0, value * width, 0, 1, 0), "translate_y_rel": (1, 0, 0, 0, 1, value * height),
            "translate_x_abs": (1, 0, value, 0, 1, 0), "translate_y_abs": (1, 0, 0, 0, 1, value)}[kind]


def _cubic(v1: torch.Tensor, v2: torch.Tensor, v3: torch.Tensor, v4: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Pillow's BICUBIC macro (its affine transforms' cubic, a = -1), term by term in float64."""
    p2 = -v1 + v3
    p3 = 2 * (v1 - v2) + v3 - v4
    p4 = -v1 + v2 - v3 + v4
    return v2 + d * (p2 + d * (p3 + d * p4))


def _taps(images: torch.Tensor, lines: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The pixels at every (line, col) pair around each output pixel, edges repeated, as float64:
    lines (n, H, W, Ty) and cols (n, H, W, Tx) -> (n, C, H, W, Ty, Tx), in one gather."""
    n, channels, height, width = images.shape
    index = lines.clamp(0, height - 1).unsqueeze(-1) * width + cols.clamp(0, width - 1).unsqueeze(-2)
    flat = index.view(n, 1, -1).expand(-1, channels, -1)
    return images.reshape(n, channels, -1).gather(2, flat).view(n, channels, *index.shape[1:]).double()


def _interpolate(images: torch.Tensor, source_x: torch.Tensor, source_y: torch.Tensor, mode: str) -> torch.Tensor:
    """Pillow's bilinear / bicubic filter at each (source_x, source_y) (n, H, W) in pixel-edge
    coordinates: the taps around the point, a pass along x then along y, truncation to 0..255.
    A coordinate on a pixel centre (the axis a shear or translation leaves alone) gives d = 0,
    where Pillow's formulas return that pixel exactly."""
    x, y = source_x - 0.5, source_y - 0.5
    left, top = x.floor(), y.floor()
    dx, dy = (x - left).unsqueeze(1), (y - top).unsqueeze(1)
    offsets = torch.arange(0, 2, device=images.device) if mode == "bilinear" else torch.arange(-1, 3, device=images.device)
    taps = _taps(images, top.long().unsqueeze(-1) + offsets, left.long().unsqueeze(-1) + offsets)
    if mode == "bilinear":
        rows = taps[..., 0] + (taps[..., 1] - taps[..., 0]) * dx.unsqueeze(-1)
        value = rows[..., 0] + (rows[..., 1] - rows[..., 0]) * dy
    else:
        rows = _cubic(*taps.unbind(-1), dx.unsqueeze(-1))
        value = _cubic(*rows.unbind(-1), dy)
    return value.clamp_(0.0, 255.0).floor_().to(images.dtype)


def _nearest(images: torch.Tensor, matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pillow's nearest-neighbour affine transform (16.16 fixed-point source coordinates): the
    values and where the source lies inside the image."""
    n, _, height, width = images.shape
    fixed = torch.floor(matrices * 65536.0 + 0.5).long()
    a, b, d, e = (fixed[:, i].view(n, 1, 1) for i in (0, 1, 3, 4))
    c = torch.floor((matrices[:, 2] + matrices[:, 0] * 0.5 + matrices[:, 1] * 0.5) * 65536.0 + 0.5).long().view(n, 1, 1)
    f = torch.floor((matrices[:, 5] + matrices[:, 3] * 0.5 + matrices[:, 4] * 0.5) * 65536.0 + 0.5).long().view(n, 1, 1)
    xs = torch.arange(width, device=images.device).view(1, 1, width)
    ys = torch.arange(height, device=images.device).view(1, height, 1)
    cols, lines = (c + ys * b + xs * a) >> 16, (f + ys * e + xs * d) >> 16
    inside = (cols >= 0) & (cols < width) & (lines >= 0) & (lines < height)
    values = _taps(images, lines.unsqueeze(-1), cols.unsqueeze(-1))[..., 0, 0].to(images.dtype)
    return values, inside


def _affine(images: torch.Tensor, matrices: torch.Tensor, resample: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """``Image.transform(AFFINE)`` with per-image matrices (n, 6) and resample codes (n,), as Pillow
    computes it: float64 source coordinates of each pixel centre, the fill colour where the source
    lies outside the image, the filter's taps with the edge repeated, truncation to uint8 values."""
    n, channels, height, width = images.shape
    fill = fill.to(images.device, images.dtype).view(1, channels, 1, 1)
    out = torch.empty_like(images)
    for code in resample.unique().tolist():
        rows = (resample == code).nonzero().squeeze(1)
        chosen, on_device = matrices[rows].to(images.device, torch.float64), rows.to(images.device)
        if _RESAMPLE_NAMES[code] == "nearest":
            values, inside = _nearest(images[on_device], chosen)
        else:
            a, b, c, d, e, f = (column.view(-1, 1, 1) for column in chosen.unbind(1))
            centre_x = torch.arange(width, device=images.device, dtype=torch.float64).view(1, 1, width) + 0.5
            centre_y = torch.arange(height, device=images.device, dtype=torch.float64).view(1, height, 1) + 0.5
            source_x, source_y = a * centre_x + b * centre_y + c, d * centre_x + e * centre_y + f
            values = _interpolate(images[on_device], source_x, source_y, _RESAMPLE_NAMES[code])
            inside = (source_x >= 0) & (source_x < width) & (source_y >= 0) & (source_y < height)
        out[on_device] = torch.where(inside.unsqueeze(1), values, fill)
    return out


def apply_ops(images: torch.Tensor, ops: torch.Tensor, args: torch.Tensor, resample: torch.Tensor,
              fill: torch.Tensor) -> torch.Tensor:
    """Apply each image's ops in order. Per layer, the images whose op is a point op, an
    ImageEnhance op or a geometric op are each done in one pass (a few dozen kernels per layer,
    whatever the mix of ops).

    Args:
        images: float32 (B, 3, H, W) holding integers 0..255, on any device (changed in place).
        ops, args, resample: the plan (see :class:`PlannedBatch`), on the CPU.
        fill: (3,) colour of the area the geometric ops uncover, 0..255.

    Returns:
        ``images``, augmented.
    """
    height, width = images.shape[2:]
    for layer in range(ops.shape[1]):
        kinds = [AUGMENT_OPS[op_id] if op_id >= 0 else None for op_id in ops[:, layer].tolist()]
        for family in (_POINT_OPS, _ENHANCE_OPS, GEOMETRIC_OPS):
            rows = [row for row, kind in enumerate(kinds) if kind in family]
            if not rows:
                continue
            index = torch.tensor(rows)
            on_device, chosen, values = index.to(images.device), [kinds[row] for row in rows], args[index, layer]
            if family is _POINT_OPS:
                changed = _point_ops(images[on_device], chosen, values)
            elif family is _ENHANCE_OPS:
                changed = _enhance_ops(images[on_device], chosen, values)
            else:
                matrices = torch.tensor([_affine_data(kind, value, height, width)
                                         for kind, value in zip(chosen, values.tolist())], dtype=torch.float64)
                changed = _affine(images[on_device], matrices, resample[index, layer], fill)
            images[on_device] = changed
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
