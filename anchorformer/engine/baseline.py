"""The sanity baseline beside a small classification run: a linear classifier on the pixels of the
run's own shards (``tasks.linear_baseline``), fitted once per dataset by the main rank: kept under
``data.cache_dir`` (keyed by the shards, their sizes and the fit's settings, so every run on the same
data reuses it) and copied into the run folder (``launch/eval.py`` shows it). Every evaluation logs
it next to the model's top-1 (``eval/linear_baseline_top1``) with one line saying what to try when
the model is below it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Optional

from anchorformer.atomic import atomic_write_bytes
from anchorformer.config import RootConfig
from anchorformer.data.index import resolve_shards
from anchorformer.run_folder import RunFolder
from anchorformer.tasks.classification import recipe_shards
from anchorformer.tasks.linear_baseline import (
    BASELINE_C, BASELINE_PIXELS, LinearBaseline, baseline_applies, baseline_report, fit_linear_baseline,
)

__all__ = ["run_baseline", "recorded_baseline", "report_beside"]

logger = logging.getLogger(__name__)


def recorded_baseline(folder: RunFolder) -> Optional[LinearBaseline]:
    """The baseline a run folder holds, if its run fitted one."""
    if not folder.baseline.is_file():
        return None
    return LinearBaseline(**json.loads(folder.baseline.read_text()))


def run_baseline(cfg: RootConfig) -> Optional[LinearBaseline]:
    """The run's baseline: the one its folder holds, else the dataset's (fitted now on the training
    shards' pixels unless ``data.cache_dir`` has it), written to the run folder; None for a task
    other than classification or a training set above ``tasks.linear_baseline.BASELINE_MAX_TRAIN``
    images. Call it on the main rank only.
    """
    if cfg.task != "classification":
        return None
    folder = RunFolder.of(cfg)
    baseline = recorded_baseline(folder)
    if baseline is not None:
        return baseline
    (train, train_index), (val, val_index) = recipe_shards(cfg)
    train_specs, _ = resolve_shards(str(train), train_index)
    if not baseline_applies(sum(spec.samples for spec in train_specs)):
        return None
    val_specs, _ = resolve_shards(str(val), val_index)
    cached = Path(cfg.data.cache_dir) / "baselines" / f"{_dataset_key(cfg, [*train_specs, *val_specs])}.json"
    if cached.is_file():
        baseline = LinearBaseline(**json.loads(cached.read_text()))
    else:
        baseline = fit_linear_baseline(str(train), str(val), num_classes=cfg.model.num_classes,
                                       train_index=train_index, val_index=val_index, seed=cfg.train.seed)
        _write(cached, baseline)
    _write(folder.baseline, baseline)
    return baseline


def _dataset_key(cfg: RootConfig, specs: list) -> str:
    """What the fit depends on: every shard (path, samples, size and time of a local file), the
    class count, the fit's settings and the seed."""
    files = []
    for spec in specs:
        path = Path(spec.url)
        stat = path.stat() if path.is_file() else None
        files.append((spec.url, spec.samples, stat.st_size if stat else None, stat.st_mtime_ns if stat else None))
    identity = (files, cfg.model.num_classes, BASELINE_PIXELS, BASELINE_C, cfg.train.seed)
    return hashlib.sha256(repr(identity).encode()).hexdigest()[:16]


def _write(path: Path, baseline: LinearBaseline) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(dataclasses.asdict(baseline), indent=2).encode())


def report_beside(model_top1: float, baseline: Optional[LinearBaseline]) -> None:
    """Log the baseline's lines beside an evaluation's top-1 (the second says what to try when the
    model is below it)."""
    if baseline is None:
        return
    for line in baseline_report(model_top1, baseline):
        logger.info(line)
