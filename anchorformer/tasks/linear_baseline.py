"""A sanity baseline beside small classification runs: a logistic regression (scikit-learn) on the
downscaled pixels of the run's own training shards, fitted once and scored on its validation
shards. A vision transformer trained from scratch on a few thousand images is often below it;
when it is, :func:`baseline_report` says what to try.

The settings were measured (docs/training.md, "A linear baseline beside small runs"): on
Fashion-MNIST (5,000 / 1,000 images) 16 x 16 pixels score best of the sizes tried (8 to 28: 80.7 to
81.9 % at C=1) and the inverse regularisation C=0.1 best of 0.01 to 1 (83.2 %; the digits: 97.0 %).
Reading the images costs most of the time (about 3 ms per image on the shared 2-core machine), so
the baseline is fitted up to :data:`BASELINE_MAX_TRAIN` training images (about a minute).
"""
from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np

from anchorformer.config import AugmentConfig
from anchorformer.data import build_val_stream

__all__ = ["BASELINE_PIXELS", "BASELINE_MAX_TRAIN", "BASELINE_C", "LinearBaseline", "baseline_applies", "read_pixels",
           "fit_linear_baseline", "baseline_report"]

logger = logging.getLogger(__name__)

BASELINE_PIXELS = 16
"""Side of the square the images are downscaled to before the linear classifier, pixels."""
BASELINE_MAX_TRAIN = 20_000
"""The baseline is fitted for training sets of at most this many images (beyond that a transformer
trained from scratch is expected to beat pixels, and reading them all costs minutes)."""
BASELINE_C = 0.1
"""Inverse L2 regularisation strength of the logistic regression (on standardised pixels)."""
_MAX_ITER = 500
_PIXELS_AS_READ = AugmentConfig(crop_pct=1.0, interpolation="bilinear", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
"""Resize the shorter side, center-crop the square, keep values in [0, 1] (the scaler standardises)."""


@dataclass(frozen=True)
class LinearBaseline:
    """A fitted baseline's validation top-1 (percent), its sample counts, pixel size and seconds."""

    top1: float
    train_samples: int
    val_samples: int
    pixels: int
    seconds: float


def baseline_applies(train_samples: int, max_train: int = BASELINE_MAX_TRAIN) -> bool:
    """Whether a training set of ``train_samples`` images is small enough for the baseline."""
    return 0 < train_samples <= max_train


def read_pixels(shards: str | list[str], index: Optional[str], num_classes: int, pixels: int = BASELINE_PIXELS
                ) -> tuple[np.ndarray, np.ndarray]:
    """Every image of the shards (once, in order) as a flat vector of ``pixels x pixels`` values in
    [0, 1], with its label, read through the project's validation stream (unreadable samples are
    skipped and counted there). Images whose three channels are equal everywhere keep one.

    Returns:
        ``(features (N, C * pixels**2) float32, labels (N,) int64)``.
    """
    stream = build_val_stream(shards, index=index, num_classes=num_classes, rank=0, world_size=1,
                              micro_batch_size=256, num_workers=0, image_size=pixels, augment=_PIXELS_AS_READ)
    images, labels = [], []
    for batch, targets in stream:
        images.append(batch.numpy())
        labels.append(targets.numpy())
    if not images:
        raise ValueError(f"no readable image in {shards}; check the shards (tools/make_shards.py)")
    stacked = np.concatenate(images)
    if np.array_equal(stacked[:, 0], stacked[:, 1]) and np.array_equal(stacked[:, 0], stacked[:, 2]):
        stacked = stacked[:, :1]  # grayscale stored as RGB: a third of the features, the same information
    return stacked.reshape(len(stacked), -1).astype(np.float32), np.concatenate(labels).astype(np.int64)


def fit_linear_baseline(train_shards: str | list[str], val_shards: str | list[str], *, num_classes: int,
                        train_index: Optional[str] = None, val_index: Optional[str] = None,
                        pixels: int = BASELINE_PIXELS, seed: int = 0) -> LinearBaseline:
    """Fit a logistic regression on the training shards' pixels once; score it on the validation shards.

    Args:
        train_shards, val_shards: brace patterns, URL lists or index JSONs (as ``data.*_shards``).
        num_classes: the run's class count.
        train_index, val_index: the shards' index JSONs, when not beside them.
        pixels: side the images are downscaled to.
        seed: the solver's seed.

    Returns:
        Its validation top-1 in percent, the sample counts and the seconds it took (reading included).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    start = time.perf_counter()
    x_train, y_train = read_pixels(train_shards, train_index, num_classes, pixels)
    x_val, y_val = read_pixels(val_shards, val_index, num_classes, pixels)
    classifier = make_pipeline(StandardScaler(),
                               LogisticRegression(C=BASELINE_C, max_iter=_MAX_ITER, random_state=seed))
    with warnings.catch_warnings():
        # sklearn's multi-line advice is noise beside a training log: one line below says it
        warnings.simplefilter("ignore", ConvergenceWarning)
        classifier.fit(x_train, y_train)
    if classifier[-1].n_iter_.max() >= _MAX_ITER:
        logger.info("linear baseline: the solver stopped at its %d-iteration limit before converging", _MAX_ITER)
    top1 = 100.0 * float((classifier.predict(x_val) == y_val).mean())
    baseline = LinearBaseline(top1=top1, train_samples=len(y_train), val_samples=len(y_val), pixels=pixels,
                              seconds=time.perf_counter() - start)
    logger.info("linear baseline: %.2f %% top-1 (logistic regression on %dx%d pixels, %d training and %d "
                "validation images, %.1f s)", top1, pixels, pixels, len(y_train), len(y_val), baseline.seconds)
    return baseline


def baseline_report(model_top1: float, baseline: LinearBaseline) -> list[str]:
    """The lines to print beside an evaluation: the baseline's score next to the model's, and, when the
    model is below it, what to try."""
    lines = [f"linear baseline {baseline.top1:.2f} % top-1 (logistic regression on {baseline.pixels}x"
             f"{baseline.pixels} pixels of the {baseline.train_samples} training images); model {model_top1:.2f} %"]
    if model_top1 < baseline.top1:
        lines.append(
            f"the model is below a linear classifier on pixels: a vision transformer trained from scratch on "
            f"{baseline.train_samples} images is weak. Start from pre-trained weights: "
            f"model.pretrained_checkpoint=VIT (a timm ViT/DeiT folder or file, converted once into the run "
            f"folder; docs/training.md), or train more epochs (schedule.epochs)")
    return lines
