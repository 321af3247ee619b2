"""loader: images/s per worker for decode + train transforms, webdataset shards vs ImageFolder.

Both loaders read the same JPEG files (real photo crops of ImageNet-like sizes, written for the
run) and apply the same timm training transform (DeiT recipe: random resized crop, flip,
RandAugment, random erasing) in the same number of DataLoader workers, in one run. The clock
starts when the first batch arrives, so worker start-up is not counted. From the per-worker rate
and a training step's images/s (``--train-images-per-second``, e.g. measured with the model
benchmark on an H100) the table states how many workers a GPU needs; the per-worker rate is the
host CPU's, so measure it on the training machine.
"""
import argparse
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Iterable

import torch
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from benchmarks.report import machine_description, markdown_table, photo_crops
from anchorformer.data import TrainTransformConfig, build_train_stream
from anchorformer.data.sources import list_image_folder
from anchorformer.data.transforms import build_train_transform
from anchorformer.data.writer import write_shards

_logger = logging.getLogger(__name__)

_CLASSES = 10


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the loader benchmark."""
    parser.add_argument("--images", type=int, default=384, help="JPEG files written and read per measurement")
    parser.add_argument("--image-size", type=int, default=224, help="training crop side, pixels")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="DataLoader worker counts to measure")
    parser.add_argument("--batch", type=int, default=32, help="images per batch")
    parser.add_argument("--rounds", type=int, default=2,
                        help="measurements of each loader, alternating; the best is reported (less noise)")
    parser.add_argument("--train-images-per-second", type=float, default=None,
                        help="images/s one GPU trains (e.g. ViT-B/16 at 224 px on an H100); with it the "
                             "section states the workers needed to keep up")
    parser.add_argument("--train-label", default="one GPU",
                        help="what trains at --train-images-per-second, for the text (model, precision, GPU)")
    parser.add_argument("--section", default="loader", help="section of docs/benchmarks.md to write")


def _photo_crops(folder: Path, count: int) -> None:
    """``count`` JPEGs (quality 90) of :func:`photo_crops` into ``_CLASSES`` class folders."""
    for i, crop in enumerate(photo_crops(count)):
        target = folder / f"class_{i % _CLASSES}" / f"image_{i:05d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        crop.save(target, format="JPEG", quality=90)


def _images_per_second(batches: Iterable) -> float:
    """Images/s after the first batch (worker start-up excluded)."""
    images, start = 0, None
    for batch in batches:
        if start is None:
            start = time.perf_counter()
            continue
        images += len(batch[0])
    return images / (time.perf_counter() - start)


def run(args: argparse.Namespace) -> str:
    """Measure both loaders at each worker count; returns the markdown section."""
    if args.rounds < 1:
        raise ValueError(f"--rounds {args.rounds} must be at least 1")
    if args.images < 4 * args.batch:
        raise ValueError(f"--images {args.images} must be at least 4 batches of --batch {args.batch}")
    transform = TrainTransformConfig(image_size=args.image_size)
    rows = []
    with tempfile.TemporaryDirectory(prefix="loader-benchmark-") as tmp:
        tree, shards = Path(tmp) / "tree", Path(tmp) / "shards"
        _photo_crops(tree, args.images)
        # Several shards per worker, as in a real run, so no worker idles for lack of shards.
        per_shard = max(1, math.ceil(args.images / (4 * max(1, *args.workers))))
        index = write_shards(list_image_folder(tree), shards, "train", max_samples=per_shard, progress=False)
        pattern = str(shards / f"train-{{000000..{len(index.shards) - 1:06d}}}.tar")
        folder = ImageFolder(str(tree), transform=build_train_transform(transform))
        for workers in args.workers:
            stream = build_train_stream(pattern, index=str(shards / "train-index.json"), num_classes=_CLASSES, rank=0,
                                        world_size=1, micro_batch_size=args.batch, num_workers=workers, seed=0,
                                        transform=transform, mixup=None)
            folder_loader = DataLoader(folder, batch_size=args.batch, shuffle=True, num_workers=workers,
                                       drop_last=True)
            shard_rate = folder_rate = 0.0
            for epoch in range(args.rounds):
                stream.set_epoch(epoch)
                shard_rate = max(shard_rate, _images_per_second(stream))
                folder_rate = max(folder_rate, _images_per_second(folder_loader))
            per_worker = max(1, workers)
            rows.append((workers, f"{shard_rate:.0f}", f"{shard_rate / per_worker:.0f}", f"{folder_rate:.0f}",
                         f"{folder_rate / per_worker:.0f}", f"{shard_rate / folder_rate:.2f}"))
            _logger.info("%d workers: shards %.0f img/s, ImageFolder %.0f img/s", workers, shard_rate, folder_rate)
    table = markdown_table(["workers", "shards img/s", "shards img/s/worker", "ImageFolder img/s",
                            "ImageFolder img/s/worker", "shards / folder"], rows)
    lines = [f"## {args.section}: decode + train transforms, shards vs ImageFolder ({args.image_size} px)", "",
             f"Machine: {machine_description(torch.device('cpu'))}. {args.images} JPEG photo crops (shorter side "
             f"300-427 px), batch {args.batch}, DeiT train transform (RandAugment rand-m9-mstd0.5-inc1, "
             f"random erasing 0.25); images/s after the first batch, best of {args.rounds} alternating rounds.", "", table]
    if args.train_images_per_second:
        fewest = min(rows, key=lambda row: row[0])
        per_worker_rate = float(fewest[2])
        needed = math.ceil(args.train_images_per_second / per_worker_rate)
        lines += ["", f"Workers needed: {args.train_label} trains {args.train_images_per_second:.0f} images/s; at "
                      f"{per_worker_rate:.0f} img/s per shard-loader worker (the {fewest[0]}-worker rate above, this "
                      f"host's CPU) that takes about {needed} workers, i.e. {needed} CPU cores for loading alone."]
    return "\n".join(lines)
