"""The embedded default dataset: scikit-learn's handwritten digits (1797 real 8x8 grayscale
images, 10 classes, installed with scikit-learn, no download), upscaled to RGB PNGs, split
train/val deterministically (stratified, seeded) and written to shards in a cache folder once.

This is what ``make demo`` trains on."""
import io
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from anchorformer.data.index import index_path, read_index
from anchorformer.data.sources import SourceListing, SourceSample
from anchorformer.data.writer import write_shards

__all__ = ["EMBEDDED_NUM_CLASSES", "EMBEDDED_VAL_SIZE", "EmbeddedDataset", "digits_listing",
           "prepare_embedded_dataset"]

_logger = logging.getLogger(__name__)

EMBEDDED_NUM_CLASSES = 10
EMBEDDED_VAL_SIZE = 297
"""Validation images (stratified); the other 1500 of the 1797 digits are for training."""
_SPLIT_SEED = 0
_SAMPLES_PER_SHARD = 64


@dataclass(frozen=True)
class EmbeddedDataset:
    """Where the embedded dataset's shards are (patterns usable as ``shards=``) and their indexes."""
    train_shards: str
    val_shards: str
    train_index: str
    val_index: str
    num_classes: int = EMBEDDED_NUM_CLASSES


def _png_bytes(pixels: np.ndarray, image_size: int) -> bytes:
    """An 8x8 digit (values 0..16) as an ``image_size`` RGB PNG."""
    gray = Image.fromarray(np.round(pixels * (255.0 / 16.0)).astype(np.uint8), mode="L")
    gray = gray.resize((image_size, image_size), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    gray.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def digits_listing(split: str, image_size: int = 32) -> SourceListing:
    """The digits of one split as PNG samples, keyed ``digit_NNNN`` by their position in
    ``sklearn.datasets.load_digits``.

    Args:
        split: ``"train"`` (1500 images) or ``"val"`` (297 images, stratified, seed 0).
        image_size: side of the square RGB images in pixels (at least 8).

    Returns:
        The samples and the class names ``"0" .. "9"``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "val"):
        raise ValueError(f"split {split!r} must be 'train' or 'val'")
    if image_size < 8:
        raise ValueError(f"image_size={image_size} must be at least 8 (the digits are 8x8 pixels)")
    digits = load_digits()
    train_ids, val_ids = train_test_split(np.arange(len(digits.target)), test_size=EMBEDDED_VAL_SIZE,
                                          stratify=digits.target, random_state=_SPLIT_SEED)
    ids = sorted(train_ids if split == "train" else val_ids)
    samples = [SourceSample(key=f"digit_{i:04d}", label=int(digits.target[i]), ext="png",
                            data=_png_bytes(digits.images[i], image_size)) for i in ids]
    return SourceListing(samples=samples, classes=[str(label) for label in range(EMBEDDED_NUM_CLASSES)])


def _dataset_in(folder: Path) -> EmbeddedDataset:
    return EmbeddedDataset(train_shards=_brace_pattern(folder, "train"), val_shards=_brace_pattern(folder, "val"),
                           train_index=str(index_path(folder, "train")), val_index=str(index_path(folder, "val")))


def _brace_pattern(folder: Path, name: str) -> str:
    last = len(read_index(index_path(folder, name)).shards) - 1
    return str(folder / f"{name}-{{000000..{last:06d}}}.tar")


def _is_complete(folder: Path) -> bool:
    return index_path(folder, "train").is_file() and index_path(folder, "val").is_file()


def prepare_embedded_dataset(cache_dir: str | Path, image_size: int = 32) -> EmbeddedDataset:
    """Shard the embedded digits into ``cache_dir`` on first use and return where they are.

    Safe when several ranks call it at once: each builds into its own temporary folder and renames
    it into place; a rank that finds the folder already there discards its copy.

    Args:
        cache_dir: folder for the cache (``{cache_dir}/digits-{image_size}px/``).
        image_size: side of the square RGB images in pixels.

    Returns:
        The train/val shard patterns and index paths, with ``num_classes=10``.
    """
    cache = Path(cache_dir)
    folder = cache / f"digits-{image_size}px"
    if _is_complete(folder):
        return _dataset_in(folder)
    cache.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(dir=cache, prefix=f".{folder.name}.building-"))
    try:
        _logger.info("writing the embedded digits dataset (%d px) to %s", image_size, folder)
        for split in ("train", "val"):
            write_shards(digits_listing(split, image_size), building, split, max_samples=_SAMPLES_PER_SHARD,
                         shuffle_seed=_SPLIT_SEED, progress=False)
        building.chmod(0o755)  # mkdtemp makes it private; the cache is shared by the user's jobs
        try:
            os.rename(building, folder)
        except OSError as exn:
            if not _is_complete(folder):
                raise ValueError(f"{folder} exists but holds no complete embedded dataset; delete it "
                                 f"and run again") from exn
            _logger.info("another process finished %s first; using its shards", folder)
    finally:
        if building.exists():
            shutil.rmtree(building)
    return _dataset_in(folder)
