"""loader: images/s per loader worker of each training input pipeline, where a worker's time goes, and the workers one GPU needs.

The paths read the same JPEG shards (real photo crops of ImageNet-like sizes, written for the run)
with the DeiT training transform (random resized crop, flip, RandAugment rand-m9-mstd0.5-inc1,
random erasing 0.25), in the same number of DataLoader workers, alternating, in one run:

- ``pil``: ``data.pipeline=pil`` (timm on Pillow images, today's default);
- ``fast``: ``data.pipeline=fast`` (the same draws and ops; uint8 tensors, one normalisation per batch);
- ``gpu``: ``data.pipeline=fast`` + ``data.augment_on=gpu``: the workers only decode, crop, flip and
  plan; the batched augmentation that then runs in the training process is timed on ``--device``
  (on a machine without a GPU: on CPU tensors, and the section says so);
- ``ImageFolder + timm``: torchvision's ImageFolder with the same timm transform, the baseline.

The clock starts when the first batch arrives (worker start-up is not counted). The stage table
times each path's pieces inside one loader worker (one thread, per-sample seeding as in training).
Workers needed per GPU = a model's bare-step images/s (the ``model`` benchmark's rows in
docs/benchmarks.md, or the options) / a worker's images/s here; the per-worker rate is this host's
CPU, so measure it on the training machine.
"""
import argparse
import logging
import math
import re
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset
from torchvision.datasets import ImageFolder

from benchmarks.report import machine_description, markdown_table, photo_crops
from benchmarks.results import record, verdict
from anchorformer.config import AugmentConfig
from anchorformer.data import build_train_stream
from anchorformer.data.fast_transforms import (FastTrainTransform, collate_planned, decode_rgb, fill_erasures,
                                               normalised_batch)
from anchorformer.data.pipelines import build_train_pipeline
from anchorformer.data.sources import list_image_folder
from anchorformer.data.stages import decode_pil, derive_seed, seeded_rngs
from anchorformer.data.transforms import build_train_transform
from anchorformer.data.writer import write_shards

__all__ = ["add_arguments", "run", "recorded_gpu_rates"]

_logger = logging.getLogger(__name__)

_CLASSES = 10
PATHS = ("pil", "fast", "gpu")
_PATH_OPTIONS = {"pil": ("pil", "cpu"), "fast": ("fast", "cpu"), "gpu": ("fast", "gpu")}
TARGET_FAST_SPEEDUP = 2.0  # fast / pil images/s per worker
TARGET_GPU_PATH_WORKERS = 4  # workers per GPU that feed AnchorFormer-B at its bare-step rate on the GPU path
_MODELS = {"DeiT-B": "DeiT img/s", "AnchorFormer-B": "AnchorFormer img/s"}
_STAGES = ("decode", "crop + resize + flip", "RandAugment", "to float + normalise", "random erasing", "plan (gpu)",
           "collation", "IPC to the training process")
_WORKER_STAGES = {"pil": [stage for stage in _STAGES if stage != "plan (gpu)"],
                  "fast": [stage for stage in _STAGES if stage != "plan (gpu)"],
                  "gpu": ["decode", "crop + resize + flip", "plan (gpu)", "collation", "IPC to the training process"]}
"""The stages each path's workers run (the gpu path's augmentation runs in the training process)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the loader benchmark."""
    parser.add_argument("--images", type=int, default=384, help="JPEG files written and read per measurement")
    parser.add_argument("--image-size", type=int, default=224, help="training crop side, pixels")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="DataLoader worker counts to measure")
    parser.add_argument("--batch", type=int, default=32, help="images per batch")
    parser.add_argument("--rounds", type=int, default=2,
                        help="measurements of each loader, alternating; the best is reported (less noise)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"),
                        help="where the gpu path's batched augmentation is timed (default: cuda when available)")
    parser.add_argument("--model-doc", type=Path, default=Path("docs/benchmarks.md"),
                        help="markdown file whose model-224-cuda section gives DeiT-B's and AnchorFormer-B's "
                             "bare-step images/s")
    parser.add_argument("--deit-images-per-second", type=float, default=None,
                        help="DeiT-B's training images/s on one GPU (default: read from --model-doc)")
    parser.add_argument("--anchorformer-images-per-second", type=float, default=None,
                        help="AnchorFormer-B's training images/s on one GPU (default: read from --model-doc)")
    parser.add_argument("--note", default="", help="a sentence added under the tables (e.g. that the machine was shared)")
    parser.add_argument("--section", default=None, help="section of docs/benchmarks.md to write (default: loader-DEVICE)")


def recorded_gpu_rates(doc: Path) -> dict[str, float]:
    """DeiT-B's and AnchorFormer-B's bare-step images/s from the ``model-224-cuda`` section of ``doc``
    (the ``model`` benchmark's table); empty when the doc or the row is missing."""
    if not doc.exists():
        return {}
    found = re.search(r"<!-- begin model-224-cuda -->(.*?)<!-- end model-224-cuda -->", doc.read_text(encoding="utf-8"),
                      re.DOTALL)
    lines = [line for line in (found.group(1).splitlines() if found else []) if line.startswith("|")]
    if len(lines) < 3:
        return {}
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if cells[0] == "base" and all(column in header for column in _MODELS.values()):
            return {model: float(cells[header.index(column)]) for model, column in _MODELS.items()}
    return {}


def _gpu_rates(args: argparse.Namespace) -> dict[str, float]:
    rates = recorded_gpu_rates(args.model_doc)
    for model, given in (("DeiT-B", args.deit_images_per_second), ("AnchorFormer-B", args.anchorformer_images_per_second)):
        if given is not None:
            rates[model] = given
    return rates


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


class _InWorker(IterableDataset):
    """Runs ``fn()`` once inside a DataLoader worker and yields its result (a worker's conditions:
    one thread, its own RNGs)."""

    def __init__(self, fn: Callable[[], object]):
        super().__init__()
        self.fn = fn

    def __iter__(self) -> Iterator:
        yield self.fn()


def _in_worker(fn: Callable[[], object]) -> object:
    return next(iter(DataLoader(_InWorker(fn), batch_size=None, num_workers=1)))


def _timed_steps(steps: list[tuple[str, Callable]], inputs: list, costs: dict[str, float]) -> list:
    """Run each input through ``steps`` under its sample's seed (the RNG order of the whole
    transform), adding each step's ms per image to ``costs[name]``; returns the outputs."""
    outputs = []
    for i, value in enumerate(inputs):
        with seeded_rngs(derive_seed("loader-benchmark", i)):
            for name, step in steps:
                start = time.perf_counter()
                value = step(value)
                costs[name] += 1e3 * (time.perf_counter() - start) / len(inputs)
        outputs.append(value)
    return outputs


def _ms_per_image(fn: Callable[[list], object], batches: list[list], images: int) -> float:
    """ms per image of calling ``fn`` on each of ``batches`` (holding ``images`` in all)."""
    start = time.perf_counter()
    for batch in batches:
        fn(batch)
    return 1e3 * (time.perf_counter() - start) / images


def _stage_costs(jpegs: list[bytes], augment: AugmentConfig, image_size: int,
                 batch: int) -> dict[str, dict[str, float]]:
    """ms per image of each stage of each path (run inside a loader worker)."""
    costs: dict[str, dict[str, float]] = {path: dict.fromkeys(_WORKER_STAGES[path], 0.0) for path in PATHS}
    count = len(jpegs) // batch * batch
    chunks = lambda items: [items[first:first + batch] for first in range(0, count, batch)]  # noqa: E731
    names = {"RandomResizedCropAndInterpolation": "crop + resize + flip", "RandomHorizontalFlip": "crop + resize + flip",
             "MaybeToTensor": "to float + normalise", "Normalize": "to float + normalise",
             "RandomErasing": "random erasing"}
    timm_steps = [(names.get(type(step).__name__, "RandAugment"), step)
                  for step in build_train_transform(augment, image_size).transforms]
    images = _timed_steps([("decode", decode_pil), *timm_steps], jpegs[:count], costs["pil"])
    costs["pil"]["collation"] = _ms_per_image(torch.stack, chunks(images), count)
    fast = FastTrainTransform(augment, image_size, on_device=False)
    planned = _timed_steps([("decode", decode_rgb), ("crop + resize + flip", fast.crop_and_flip),
                            ("RandAugment", fast.augment_pixels), ("random erasing", fast.plan)], jpegs[:count],
                           costs["fast"])
    stack = lambda chunk: torch.stack([image.pixels for image in chunk])  # noqa: E731  (augment_in_worker's steps)
    costs["fast"]["collation"] = _ms_per_image(stack, chunks(planned), count)
    pixels = [stack(chunk) for chunk in chunks(planned)]
    costs["fast"]["to float + normalise"] = _ms_per_image(lambda p: normalised_batch(p, fast), pixels, count)
    normalised = [normalised_batch(p, fast) for p in pixels]
    costs["fast"]["random erasing"] += _ms_per_image(lambda pair: fill_erasures(*pair),
                                                     list(zip(normalised, chunks(planned))), count)
    on_device = FastTrainTransform(augment, image_size, on_device=True)
    planned = _timed_steps([("decode", decode_rgb), ("crop + resize + flip", on_device.crop_and_flip),
                            ("plan (gpu)", on_device.plan)], jpegs[:count], costs["gpu"])
    costs["gpu"]["collation"] = _ms_per_image(collate_planned, chunks(planned), count)
    return costs


class _Repeat(IterableDataset):
    """``count`` fresh copies of one batch (new storage each time, as a real batch has)."""

    def __init__(self, batch: object, count: int, copy: Callable[[object], object]):
        super().__init__()
        self.batch, self.count, self.copy = batch, count, copy

    def __iter__(self) -> Iterator:
        for _ in range(self.count):
            yield self.copy(self.batch)


def _shared_copy(tensor: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(tensor).share_memory_().copy_(tensor)


def _ipc_ms_per_image(batch: object, copy: Callable[[object], object], size: int, count: int = 12) -> float:
    """What handing ``batch`` from a worker to the training process costs per image: one worker
    sending fresh copies (``copy``), minus making the copies."""
    start = time.perf_counter()
    for _ in range(count):
        copy(batch)
    making = time.perf_counter() - start
    loader = iter(DataLoader(_Repeat(batch, count + 1, copy), batch_size=None, num_workers=1))
    next(loader)
    start = time.perf_counter()
    for _ in loader:
        pass
    return max(0.0, 1e3 * (time.perf_counter() - start - making) / (count * size))


def _device_images_per_second(stream, device: torch.device, batches: int = 4) -> float:
    """Images/s of the gpu path's batched augmentation in the training process on ``device``."""
    planned = [batch for _, batch in zip(range(batches + 1), stream)]
    augment = stream.device_augment
    augment(*planned[0][:2], device)  # warm-up (kernels, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for images, targets, *_ in planned[1:]:
        augment(images, targets, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return sum(len(batch[0]) for batch in planned[1:]) / (time.perf_counter() - start)


def run(args: argparse.Namespace) -> str:
    """Measure every path at each worker count; returns the markdown section."""
    if args.rounds < 1:
        raise ValueError(f"--rounds {args.rounds} must be at least 1")
    if args.images < 4 * args.batch:
        raise ValueError(f"--images {args.images} must be at least 4 batches of --batch {args.batch}")
    if min(args.workers) < 1:
        raise ValueError(f"--workers {args.workers}: every count must be >= 1 (rates are per worker process)")
    device = torch.device(args.device)
    augment = AugmentConfig()  # the DeiT recipe's
    # refuse an unsupported transform before writing
    build_train_pipeline(augment, args.image_size, None, _CLASSES, pipeline="fast", augment_on="gpu")
    rows, rates = [], {}
    with tempfile.TemporaryDirectory(prefix="loader-benchmark-") as tmp:
        tree, shards = Path(tmp) / "tree", Path(tmp) / "shards"
        _photo_crops(tree, args.images)
        jpegs = [path.read_bytes() for path in sorted(tree.rglob("*.jpg"))]
        # Several shards per worker, as in a real run, so no worker idles for lack of shards.
        per_shard = max(1, math.ceil(args.images / (4 * max(args.workers))))
        index = write_shards(list_image_folder(tree), shards, "train", max_samples=per_shard, progress=False)
        pattern = str(shards / f"train-{{000000..{len(index.shards) - 1:06d}}}.tar")
        costs = _in_worker(lambda: _stage_costs(jpegs[:4 * args.batch], augment, args.image_size, args.batch))
        float_batch = torch.zeros(args.batch, 3, args.image_size, args.image_size)
        # pil: the DataLoader moves each batch to shared memory; fast and gpu make them there.
        costs["pil"]["IPC to the training process"] = _ipc_ms_per_image(float_batch, torch.clone, args.batch)
        costs["fast"]["IPC to the training process"] = _ipc_ms_per_image(float_batch, _shared_copy, args.batch)
        planned = next(iter(build_train_stream(pattern, index=str(shards / "train-index.json"), num_classes=_CLASSES,
                                               rank=0, world_size=1, micro_batch_size=args.batch, num_workers=0,
                                               seed=0, image_size=args.image_size, augment=augment, mixup=None,
                                               pipeline="fast", augment_on="gpu")))[0]
        costs["gpu"]["IPC to the training process"] = _ipc_ms_per_image(
            planned, lambda batch: replace(batch, pixels=_shared_copy(batch.pixels)), args.batch)
        folder = ImageFolder(str(tree), transform=build_train_transform(augment, args.image_size))
        device_rate = 0.0
        for workers in args.workers:
            streams = {path: build_train_stream(pattern, index=str(shards / "train-index.json"), num_classes=_CLASSES,
                                                rank=0, world_size=1, micro_batch_size=args.batch, num_workers=workers,
                                                seed=0, image_size=args.image_size, augment=augment, mixup=None,
                                                pipeline=pipeline, augment_on=augment_on)
                       for path, (pipeline, augment_on) in _PATH_OPTIONS.items()}
            folder_loader = DataLoader(folder, batch_size=args.batch, shuffle=True, num_workers=workers, drop_last=True)
            best = dict.fromkeys([*PATHS, "folder"], 0.0)
            for epoch in range(args.rounds):
                for path, stream in streams.items():
                    stream.set_epoch(epoch)
                    best[path] = max(best[path], _images_per_second(stream))
                best["folder"] = max(best["folder"], _images_per_second(folder_loader))
            if workers == min(args.workers):
                rates = {path: rate / workers for path, rate in best.items()}
                streams["gpu"].set_epoch(args.rounds)  # a fresh epoch's batches
                device_rate = _device_images_per_second(streams["gpu"], device)
            for path, rate in best.items():
                record(f"{workers} workers", f"{path} img/s per worker", rate / workers)
            speedup = best["fast"] / best["pil"]
            met = record(f"{workers} workers", "fast / pil img/s", speedup, TARGET_FAST_SPEEDUP, "at_least")
            rows.append((workers, *(f"{best[path] / workers:.0f}" for path in (*PATHS, "folder")),
                         f"{speedup:.2f}x", f"{best['gpu'] / best['pil']:.2f}x", f"{best['pil'] / best['folder']:.2f}x",
                         verdict(met, TARGET_FAST_SPEEDUP, "at_least")))
            _logger.info("%d workers: %s img/s", workers, {path: round(rate) for path, rate in best.items()})
    return _section(args, device, rows, costs, rates, device_rate)


def _section(args: argparse.Namespace, device: torch.device, rows: list, costs: dict, rates: dict,
             device_rate: float) -> str:
    fewest = min(args.workers)
    on = "the GPU" if device.type == "cuda" else "CPU tensors (no GPU here: the device-side rate of a GPU is not measured)"
    lines = [f"## loader: training input pipelines, img/s per worker ({args.image_size} px)", "",
             f"Machine: {machine_description(torch.device('cpu'))}. {args.images} JPEG photo crops (shorter side "
             f"300-427 px), batch {args.batch}, DeiT train transform (RandAugment rand-m9-mstd0.5-inc1, random "
             f"erasing 0.25, bicubic); images/s after the first batch, best of {args.rounds} alternating rounds. "
             f"`pil` = data.pipeline=pil (today's path), `fast` = data.pipeline=fast, `gpu` = data.pipeline=fast + "
             f"data.augment_on=gpu, workers' part only (decode, crop, flip, plan; uint8 batches).", "",
             markdown_table(["workers", "pil img/s/worker", "fast img/s/worker", "gpu-path img/s/worker",
                             "ImageFolder + timm img/s/worker", "fast / pil", "gpu / pil", "pil / ImageFolder",
                             "target fast / pil"], rows), "",
             f"Where a worker's time goes (ms per image inside one loader worker, one thread; the gpu path's "
             f"batched ops run in the training process instead, at {device_rate:.0f} img/s on {on}):", ""]
    stage_rows = [(stage, *(f"{costs[path][stage]:.3f}" if stage in costs[path] else "-" for path in PATHS))
                  for stage in _STAGES]
    totals = [sum(costs[path].values()) for path in PATHS]
    stage_rows.append(("**sum**", *(f"{total:.3f}" for total in totals)))
    stage_rows.append(("**img/s implied**", *(f"{1e3 / total:.0f}" for total in totals)))
    lines += [markdown_table(["stage", "pil ms/img", "fast ms/img", "gpu-path worker ms/img"], stage_rows)]
    gpu_rates = _gpu_rates(args)
    if gpu_rates:
        need_rows = []
        shown = {path: max(1, round(rate)) for path, rate in rates.items()}  # whole img/s, as the tables show them
        for model, rate in gpu_rates.items():
            needed = {path: math.ceil(round(rate) / shown[path]) for path in (*PATHS, "folder")}
            for path, count in needed.items():
                record(model, f"{path} workers per GPU", count)
            met = record(model, "gpu-path workers per GPU", needed["gpu"], TARGET_GPU_PATH_WORKERS, "at_most") \
                if model == "AnchorFormer-B" else None
            target = f"<= {TARGET_GPU_PATH_WORKERS} ({'met' if met else 'missed'})" if met is not None else "-"
            need_rows.append((model, f"{rate:.0f}", *(needed[path] for path in (*PATHS, "folder")), target))
        lines += ["", f"Workers needed per GPU = bare-step images/s (the `model` benchmark on an H200, "
                      f"model-224-cuda, unless given as options) / the {fewest}-worker rates above (this host's CPU), rounded up, both rates as shown:",
                  "", markdown_table(["model", "GPU img/s", "pil workers", "fast workers", "gpu-path workers",
                                      "ImageFolder workers", "target gpu-path workers"], need_rows)]
    if args.note:
        lines += ["", args.note]
    return "\n".join(lines)
