"""A trained run for the inference tests (eval, predict, export): the demo recipe with a smaller
model for 30 steps, on digit shards whose class map names the classes ("zero" .. "nine"), with an
EMA. Trained once per test session (the first test module that asks builds it; the others find
it), about 20 s on 2 cores.

Imported explicitly by tests/test_eval.py, tests/test_predict.py and tests/test_export.py."""
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from helpers import REPO, cpu_env
from PIL import Image

from anchorformer.data.embedded import digits_listing
from anchorformer.data.sources import SourceListing
from anchorformer.data.writer import write_shards

CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
MICRO_BATCH = 32
RUN_OVERRIDES = ["train.max_steps=30", "schedule.epochs=2", "schedule.warmup_epochs=0", "schedule.decay=constant",
                 "optim.lr=3e-3", f"train.global_batch_size={MICRO_BATCH}", f"train.micro_batch_size={MICRO_BATCH}",
                 "model.patch_size=4", "model.depth=2", "model.embed_dim=64", "model.num_heads=2", "model.num_anchors=8",
                 "train.ema.enabled=true", "train.ema.decay=0.9", "data.num_workers=0", "logging.progress_bar=false",
                 "logging.tensorboard=false", "logging.run_name=run"]


def _named_digit_shards(folder: Path) -> dict[str, Path]:
    """Train/val shards of the embedded digits (16 px PNGs) with class names instead of "0".."9"."""
    indexes = {}
    for split in ("train", "val"):
        listing = digits_listing(split, image_size=16)
        write_shards(SourceListing(samples=listing.samples, classes=CLASS_NAMES), folder, split, max_samples=64,
                     shuffle_seed=0, progress=False)
        indexes[split] = folder / f"{split}-index.json"
    return indexes


@pytest.fixture
def trained_run(tmp_path_factory) -> Path:
    """The run folder (``config.yaml``, ``summary.json``, ``checkpoints/``), built on first use."""
    base = tmp_path_factory.getbasetemp() / "inference-run"
    run = base / "runs" / "run"
    if not (run / "summary.json").is_file():
        indexes = _named_digit_shards(base / "shards")
        command = [sys.executable, "launch/train.py", "configs/demo.yaml", "data.source=shards",
                   f"data.train_shards={indexes['train']}", f"data.val_shards={indexes['val']}",
                   f"logging.output_dir={base / 'runs'}", *RUN_OVERRIDES]
        proc = subprocess.run(command, cwd=REPO, env=cpu_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return run


def trainer_metrics(run: Path) -> dict[str, float]:
    """The last evaluation the trainer logged (``eval/top1``, ``eval_ema/top1``, ...)."""
    return json.loads((run / "summary.json").read_text())["metrics"]


def validation_samples(run: Path) -> list[tuple[Image.Image, int]]:
    """The run's validation images (RGB) and labels, read from its shards with tarfile alone, in
    the order the validation stream reads them (index order, tar order within a shard)."""
    index_file = run.parent.parent / "shards" / "val-index.json"
    samples = []
    for shard in json.loads(index_file.read_text())["shards"]:
        files: dict[str, dict[str, bytes]] = {}
        with tarfile.open(index_file.parent / shard["name"]) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                files.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for parts in files.values():
            with Image.open(io.BytesIO(parts["png"])) as image:
                samples.append((image.convert("RGB"), int(parts["cls"])))
    return samples


def top1_of(model: torch.nn.Module, samples: list[tuple[Image.Image, int]], transform) -> float:
    """Top-1 (%) of ``model`` on ``samples`` preprocessed by ``transform``, in batches of the run's
    micro batch (the batches the trainer evaluated)."""
    hits = 0
    with torch.no_grad():
        for start in range(0, len(samples), MICRO_BATCH):
            chunk = samples[start:start + MICRO_BATCH]
            logits = model(torch.stack([transform(image) for image, _ in chunk]))
            hits += int((logits.argmax(dim=-1) == torch.tensor([label for _, label in chunk])).sum())
    return 100.0 * hits / len(samples)
