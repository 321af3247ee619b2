"""Batches of image files for evaluation and prediction: files, folders and glob patterns (or an
ImageFolder tree's labelled samples), dealt to ranks so that every file is read once over all ranks,
decoded to RGB, transformed and batched by a DataLoader. An image PIL cannot read is skipped and
logged (its path is missing from the batches)."""
from __future__ import annotations

import glob
import logging
import os
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from anchorformer.data.sources import IMAGE_EXTENSIONS

__all__ = ["expand_image_paths", "ImageFiles", "ImageFileBatches"]

_logger = logging.getLogger(__name__)


def _is_image(path: Path) -> bool:
    return path.suffix[1:].lower() in IMAGE_EXTENSIONS


def _images_in(folder: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        found += [Path(dirpath) / name for name in sorted(filenames) if _is_image(Path(name))]
    return found


def expand_image_paths(inputs: Sequence[str]) -> list[Path]:
    """The image files named by ``inputs``, in order, each once.

    Args:
        inputs: image files, folders (searched recursively, sorted) and glob patterns
            (``photos/*.jpg``, ``data/**/*.png``).

    Returns:
        The image paths.

    Raises:
        ValueError: for an input that names no image file.
    """
    paths: dict[Path, None] = {}
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = _images_in(path)
        elif path.is_file():
            found = [path] if _is_image(path) else []
        else:
            found = [Path(match) for match in sorted(glob.glob(item, recursive=True))
                     if Path(match).is_file() and _is_image(Path(match))]
        if not found:
            raise ValueError(f"{item!r} names no image file ({', '.join(IMAGE_EXTENSIONS)}); give image files, "
                             "folders holding images, or a glob pattern such as 'photos/*.jpg'")
        paths.update(dict.fromkeys(found))
    return list(paths)


class ImageFiles(Dataset):
    """``(image tensor or None, label, path)`` per file; None for a file PIL cannot read.

    Args:
        samples: ``(path, label)`` pairs (label -1 where there is none).
        transform: PIL RGB image -> tensor (the evaluation transform).
    """

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Optional[torch.Tensor], int, str]:
        path, label = self.samples[index]
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exn:
            _logger.warning("skipped %s: not a readable image (%r)", path, exn)
            return None, label, path
        return self.transform(image), label, path


def _stack_readable(items: list[tuple[Optional[torch.Tensor], int, str]]) -> Optional[tuple]:
    readable = [item for item in items if item[0] is not None]
    if not readable:
        return None
    images, labels, paths = zip(*readable)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long), list(paths)


class ImageFileBatches:
    """This rank's ``(images, labels int64, paths)`` batches of its share of the files; a batch is
    smaller by the files that could not be read (a batch of none is left out).

    Args:
        samples: ``(path, label)`` pairs of every rank, in order (label -1 where there is none).
        transform: the evaluation transform.
        batch_size: files per batch.
        num_workers: DataLoader worker processes (0 reads in this process).
        rank, world_size: this rank takes ``samples[rank::world_size]``.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable, batch_size: int, num_workers: int,
                 rank: int = 0, world_size: int = 1):
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"batch_size={batch_size} must be >= 1 and num_workers={num_workers} >= 0")
        self.dataset = ImageFiles(list(samples)[rank::world_size], transform)
        self.num_samples = len(self.dataset)
        self._loader = DataLoader(self.dataset, batch_size=batch_size, num_workers=num_workers,
                                  collate_fn=_stack_readable)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        return (batch for batch in self._loader if batch is not None)
