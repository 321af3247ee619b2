"""Pictures of what an AnchorFormer sees and what its anchors do, as uint8 arrays (numpy and PIL
only): a grid of input images denormalised, and per layer the anchor maps of
``anchor_diagnostics`` beside and over the images. HWC arrays go to TensorBoard
(``add_image(..., dataformats="HWC")``) and to PNG files alike."""
from __future__ import annotations

import colorsys
import math
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from .anchor_diagnostics import AnchorDiagnostics, AnchorMaps

__all__ = ["anchor_palette", "denormalise", "image_grid", "input_grid", "anchor_map_picture", "anchor_pictures",
           "MAP_COLUMNS"]

MAP_COLUMNS = ("image", "strongest anchor", "cls row of S over image")
"""The columns of an anchor-map picture, one row per image (the anchor map sits beside its image:
an overlay would hide the palette's colours)."""

# inferno, sampled at 9 evenly spaced points: dark = low, bright yellow = high; readable in grey too
_HEAT = np.array([(0, 0, 4), (31, 12, 72), (85, 15, 109), (136, 34, 106), (186, 54, 85), (227, 89, 51),
                  (249, 140, 10), (249, 201, 50), (252, 255, 164)], dtype=np.float64)
_GAP = 2  # pixels between the panels of a grid


def anchor_palette(num_anchors: int) -> np.ndarray:
    """(m, 3) uint8 colours; anchor j has the same colour in every layer, step and run (golden-ratio
    hue steps keep neighbouring indices apart; alternating brightness separates close hues)."""
    colours = [colorsys.hsv_to_rgb((j * 0.618033988749895) % 1.0, 0.85 if j % 2 else 0.6, 0.95 if j % 3 else 0.7)
               for j in range(num_anchors)]
    return np.round(np.array(colours).reshape(num_anchors, 3) * 255).astype(np.uint8)


def denormalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(B, C, H, W) normalised images -> (B, H, W, 3) uint8 (one channel is repeated to three).

    Args:
        images: as the model receives them, ``(pixel / 255 - mean) / std``.
        mean, std: the normalisation, one value per channel.
    """
    images = images.detach().to("cpu", torch.float32)
    channels = images.shape[1]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"{channels}-channel images need one mean and std per channel, got mean={list(mean)} "
                         f"std={list(std)}")
    pixels = images * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    pixels = (pixels.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return np.repeat(pixels, 3, axis=-1) if channels == 1 else pixels[..., :3]


def _resize(picture: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize: patches stay sharp squares (whole factors by repetition, the
    common case and several times faster than PIL; others, e.g. padded grids, by PIL)."""
    rows, columns = picture.shape[:2]
    if height % rows == 0 and width % columns == 0:
        return picture.repeat(height // rows, axis=0).repeat(width // columns, axis=1)
    return np.asarray(Image.fromarray(picture).resize((width, height), Image.NEAREST))


def image_grid(panels: np.ndarray, columns: int) -> np.ndarray:
    """(N, H, W, 3) uint8 panels -> one (rows * H, columns * W, 3) picture, row-major, with gaps."""
    count, height, width, _ = panels.shape
    rows = math.ceil(count / columns)
    grid = np.full((rows * (height + _GAP) - _GAP, columns * (width + _GAP) - _GAP, 3), 255, dtype=np.uint8)
    for index in range(count):
        top, left = (index // columns) * (height + _GAP), (index % columns) * (width + _GAP)
        grid[top : top + height, left : left + width] = panels[index]
    return grid


def _magnified(images: np.ndarray, min_size: int) -> np.ndarray:
    """Each image scaled up by a whole factor until its shorter side reaches ``min_size``."""
    factor = max(1, math.ceil(min_size / min(images.shape[1:3])))
    return images.repeat(factor, axis=1).repeat(factor, axis=2) if factor > 1 else images


def input_grid(images: torch.Tensor, mean: Sequence[float], std: Sequence[float], max_images: int = 32,
               columns: int = 8, min_size: int = 48) -> np.ndarray:
    """Training images exactly as the model receives them (augmented, mixed), denormalised, in a
    grid: (H, W, 3) uint8.

    Args:
        images: (B, C, H, W) normalised batch.
        mean, std: the normalisation (``data.augment.mean`` / ``std``).
        max_images: the first this many images.
        columns: images per row.
        min_size: small images are scaled up (nearest) to at least this many pixels.
    """
    pictures = _magnified(denormalise(images[:max_images], mean, std), min_size)
    return image_grid(pictures, min(columns, len(pictures)))


def _blend(under: np.ndarray, over: np.ndarray, over_share: int = 141) -> np.ndarray:
    """``over`` at ``over_share`` / 256 over ``under``, in integers (uint8 stays exact and fast)."""
    return ((under.astype(np.uint16) * (256 - over_share) + over.astype(np.uint16) * over_share) >> 8).astype(np.uint8)


def _heat(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> inferno colours (..., 3) uint8."""
    position = np.clip(values, 0.0, 1.0) * (len(_HEAT) - 1)
    low = np.floor(position).astype(int).clip(0, len(_HEAT) - 2)
    weight = (position - low)[..., None]
    return np.round(_HEAT[low] * (1.0 - weight) + _HEAT[low + 1] * weight).astype(np.uint8)


def anchor_map_picture(images: np.ndarray, maps: AnchorMaps, num_anchors: int, min_size: int = 48) -> np.ndarray:
    """One layer's maps for each image: a row of ``MAP_COLUMNS`` panels per image.

    The cls row of S is shown per image relative to its largest patch value (bright = the patches
    the cls token draws most from); without a cls token the last column is left out.

    Args:
        images: (B, H, W, 3) uint8, the images the maps were computed on (``denormalise``).
        maps: the layer's maps for (at least) these images.
        num_anchors: m (the palette's size).
        min_size: panels are scaled up to at least this many pixels.

    Returns:
        (H', W', 3) uint8.
    """
    images = _magnified(images, min_size)
    count, height, width, _ = images.shape
    palette = anchor_palette(num_anchors)
    panels = []
    for index in range(count):
        strongest = _resize(palette[maps.assignment[index].numpy()], height, width)
        panels += [images[index], strongest]
        if maps.cls_similarity is not None:
            row = maps.cls_similarity[index].double().numpy()
            heat = _resize(_heat(row / max(float(row.max()), 1e-12)), height, width)
            panels.append(_blend(images[index], heat))
    columns = len(MAP_COLUMNS) if maps.cls_similarity is not None else len(MAP_COLUMNS) - 1
    return image_grid(np.stack(panels), columns)


def anchor_pictures(result: AnchorDiagnostics, images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                    max_images: Optional[int] = 8, min_size: int = 48) -> dict[str, np.ndarray]:
    """``anchors/maps/layer_<i>`` -> (H, W, 3) uint8 for the layers ``result`` has maps of.

    Args:
        result: diagnostics computed with maps on ``images``.
        images: the probe's (B, C, H, W) normalised images.
        mean, std: their normalisation.
        max_images: rows per picture (None: every probe image).
        min_size: panels are scaled up to at least this many pixels.
    """
    shown = denormalise(images[:max_images], mean, std)
    return {f"anchors/maps/layer_{maps.layer:02d}": anchor_map_picture(shown, maps, result.num_anchors, min_size)
            for maps in result.maps}
