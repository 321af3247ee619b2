"""train: end-to-end training img/s through the framework, AnchorFormer vs DeiT, next to the bare step.

Each model trains through the real ``run_training`` path: the Trainer, DeepSpeed (``--zero-stage``,
``--precisions``: DeepSpeed bf16, torch.autocast or fp32), webdataset shards of JPEG photo crops decoded and augmented (random resized crop
and flip; RandAugment's cost is the ``loader`` benchmark's) in ``--workers`` DataLoader workers,
TensorBoard logging. The first ``--steps`` steps warm up (loader start, allocator, kernel
compilation); the next ``--steps`` are timed, as the Trainer itself logs them (``perf/*`` in
TensorBoard, read back from the event file). In the same run the bare step of the ``model``
benchmark (autocast, fused AdamW, one device-resident batch, no data loading, no DeepSpeed)
measures what the device can do with the same model and batch: trainer / bare is the share of that
speed the framework keeps, and the data-wait column says how much of any loss is the loader's.
"""
import argparse
import io
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Optional

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from anchorformer import config
from benchmarks.model import measure_training_step, peak_flops
from benchmarks.report import SIZES, comma_separated, machine_description, markdown_table, photo_crops
from benchmarks.results import record, verdict
from anchorformer.data.index import index_path
from anchorformer.data.sources import SourceListing, SourceSample
from anchorformer.data.writer import write_shards
from anchorformer.engine import run_training
from anchorformer.kernels import BACKENDS, set_backend
from anchorformer.run_folder import RunFolder

__all__ = ["add_arguments", "run"]

logger = logging.getLogger(__name__)

_CLASSES = 1000
_FAMILIES = ("deit", "anchorformer")
# The Trainer's precision modes (train.precision) and what each means.
PRECISIONS = {"bf16": "DeepSpeed bf16 (bf16 weights, fp32 master copies)",
              "bf16-mixed": "torch.autocast (fp32 weights, bf16 matmuls)", "fp32": "fp32"}
# Targets through the Trainer: AF-B / DeiT-B img/s at least this, and the Trainer at least this
# share of the bare step's img/s, for both families.
TARGET_TRAINER_SPEEDUP = 1.15
TARGET_TRAINER_EFFICIENCY = 0.9
_DISTINCT_IMAGES = 512  # encoded once, then repeated: decoding costs the same


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the ``train`` benchmark; defaults are sized for the device that runs it."""
    on_gpu = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if on_gpu else "cpu", choices=("cuda", "cpu"),
                        help="device to train on (default: cuda when available)")
    parser.add_argument("--sizes", type=comma_separated(str, SIZES), default=None,
                        help=f"model sizes from {list(SIZES)}, comma-separated (default: base on CUDA, tiny on CPU)")
    parser.add_argument("--resolution", type=int, default=224, help="image size in pixels (multiple of 16)")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default: 128 on CUDA, 4 on CPU)")
    parser.add_argument("--steps", type=int, default=None,
                        help="warm-up steps, then as many timed steps (default: 15 on CUDA, 2 on CPU)")
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader workers (default: CPU cores - 1, at most 16, on CUDA; 1 on CPU)")
    parser.add_argument("--zero-stage", type=int, default=1, choices=(0, 1, 2, 3), help="DeepSpeed ZeRO stage")
    parser.add_argument("--precisions", type=comma_separated(str, PRECISIONS), default=["bf16"],
                        help=f"Trainer precision modes, comma-separated, from {list(PRECISIONS)}: "
                             f"{'; '.join(f'{k}: {v}' for k, v in PRECISIONS.items())} (the bare step "
                             f"autocasts to bf16 either way)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="anchor-mix backend of the AnchorFormer layers (see anchorformer.kernels)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="device peak for MFU in TFLOP/s (default: known bf16 dense peak of the GPU)")
    parser.add_argument("--section", default=None, help="name of the docs/benchmarks.md section (default: train-DEVICE)")


def _shards(folder: Path, images: int, resolution: int, shards: int) -> dict[str, str]:
    """Training shards of ``images`` JPEGs (shorter side ``resolution`` / 0.875, as ImageNet is
    stored for a 224 crop) and validation shards of an eighth of them; returns the ``data.*``
    keys naming both shard sets and their indexes."""
    side = math.ceil(resolution / 0.875)
    encoded = []
    for crop in photo_crops(min(images, _DISTINCT_IMAGES)):
        scale = side / min(crop.size)
        buffer = io.BytesIO()
        crop.resize((round(crop.width * scale), round(crop.height * scale))).save(buffer, format="JPEG", quality=90)
        encoded.append(buffer.getvalue())
    samples = [SourceSample(key=f"photo{i:06d}", label=i % _CLASSES, ext="jpg", data=encoded[i % len(encoded)])
               for i in range(images)]
    classes = [f"class{label:04d}" for label in range(_CLASSES)]
    keys = {}
    for name, subset, count in (("train", samples, shards), ("val", samples[:max(1, images // 8)], 1)):
        per_shard = math.ceil(len(subset) / count)
        index = write_shards(SourceListing(subset, classes), folder, name, max_samples=per_shard, shuffle_seed=None,
                             progress=False)
        keys[f"{name}_shards"] = str(folder / f"{name}-{{000000..{len(index.shards) - 1:06d}}}.tar")
        keys[f"{name}_index"] = str(index_path(folder, name))
    return keys


def _train_config(family: str, size: str, precision: str, args: argparse.Namespace, shard_keys: dict[str, str],
                  run_root: Path, peak: Optional[float]) -> config.RootConfig:
    """One short run: 2 x ``--steps`` steps, a log (the Trainer's throughput) every ``--steps``."""
    return config.from_dict({
        "model": {"name": f"{family}_{size}_patch16_224", "num_classes": _CLASSES, "img_size": args.resolution,
                  "drop_path_rate": 0.1},
        "data": {"source": "shards", **shard_keys, "image_size": args.resolution, "num_workers": args.workers,
                 "shuffle_buffer": 0, "mixup": {"prob": 0.0},
                 "augment": {"auto_augment": None, "color_jitter": 0.0, "re_prob": 0.0, "interpolation": "bilinear"}},
        "optim": {"lr": 5e-4, "lr_reference_batch": 512},
        "schedule": {"epochs": 1, "warmup_epochs": 0.5},
        "train": {"global_batch_size": args.batch, "micro_batch_size": args.batch, "precision": precision,
                  "device": args.device, "max_steps": 2 * args.steps, "seed": 0},
        "deepspeed": {"zero_stage": args.zero_stage},
        "checkpoint": {"every_steps": 0, "at_epoch_end": False, "keep_last": 1},
        "logging": {"output_dir": str(run_root), "run_name": f"{family}_{size}_{precision}",
                    "every_steps": args.steps, "progress_bar": False, "peak_tflops": peak / 1e12 if peak else 0.0},
    })


def _timed_interval(run_dir: Path, step: int) -> dict[str, float]:
    """The ``perf/*`` and memory scalars the Trainer logged at ``step`` (the timed interval)."""
    events = EventAccumulator(str(RunFolder(run_dir).tensorboard))
    events.Reload()
    values = {}
    for tag in ("perf/samples_per_s", "perf/step_time_s", "perf/data_wait_s", "perf/mfu", "memory/peak_gb"):
        if tag in events.Tags()["scalars"]:
            values[tag] = next(e.value for e in events.Scalars(tag) if e.step == step)
    return values


def _trainer_rate(cfg: config.RootConfig, args: argparse.Namespace) -> dict[str, float]:
    set_backend(args.backend)
    try:
        result = run_training(cfg, stop_signals=())
    finally:
        set_backend(None)
    if result.step != 2 * args.steps:
        raise RuntimeError(f"{cfg.model.name} trained {result.step} steps, expected {2 * args.steps}")
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return _timed_interval(Path(cfg.logging.output_dir) / cfg.logging.run_name, result.step)


def _row(family: str, size: str, precision: str, bare: dict, trained: dict[str, dict], resolution: int) -> list:
    """One table row: the bare step, the Trainer's timed interval, and AnchorFormer's ratio to DeiT."""
    measured = trained[family]
    rate = measured["perf/samples_per_s"]
    data_share = measured["perf/data_wait_s"] / measured["perf/step_time_s"]
    mfu = f"{100 * measured['perf/mfu']:.1f} %" if "perf/mfu" in measured else "n/a"
    case = f"{family} {size} {resolution} px {precision}"
    record(case, "trainer img/s", rate)
    record(case, "bare step img/s", bare["img_s"])
    record(case, "data wait / step", data_share)
    efficiency = rate / bare["img_s"]
    record(case, "trainer / bare step img/s", efficiency, TARGET_TRAINER_EFFICIENCY, "at_least")
    ratio = target = "-"
    if family == "anchorformer":
        speedup = rate / trained["deit"]["perf/samples_per_s"]
        ratio = f"{speedup:.2f}x"
        goal = TARGET_TRAINER_SPEEDUP if size == "base" else None
        met = record(f"{size} {resolution} px {precision}", "trainer AF / DeiT img/s", speedup, goal,
                     "at_least" if goal else None)
        target = verdict(met, goal, "at_least")
    return [f"{family} {size}", precision, f"{bare['img_s']:.1f}", f"{rate:.1f}", f"{efficiency:.2f}",
            f"{100 * data_share:.0f} %", mfu, f"{measured.get('memory/peak_gb', 0.0):.1f}", ratio, target]


def _check(args: argparse.Namespace) -> None:
    if args.resolution <= 0 or args.resolution % 16:
        raise ValueError(f"--resolution must be a positive multiple of the patch size 16, got {args.resolution}")
    if not args.sizes or not args.precisions:
        raise ValueError(f"--sizes and --precisions must name at least one each, got {args.sizes} and "
                         f"{args.precisions}")
    for name in ("batch", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")



def run(args: argparse.Namespace) -> str:
    """Train each size with both families through the framework; return the markdown section."""
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if args.sizes is None:
        args.sizes = ["base"] if on_gpu else ["tiny"]
    if args.batch is None:
        args.batch = 128 if on_gpu else 4
    if args.steps is None:
        args.steps = 15 if on_gpu else 2
    if args.workers is None:
        args.workers = max(1, min(16, (os.cpu_count() or 2) - 1)) if on_gpu else 1
    _check(args)
    peak = peak_flops(device, args.peak_tflops)
    rows = []
    with tempfile.TemporaryDirectory(prefix="train-benchmark-") as tmp:
        # one shard per worker, each with a spare batch: no worker runs dry inside the timed steps
        images = args.batch * (2 * args.steps + args.workers + 1)
        shard_keys = _shards(Path(tmp) / "shards", images, args.resolution, shards=max(1, args.workers))
        for size in args.sizes:
            bare = {family: measure_training_step(family, size, args.resolution, args.batch, False, args.backend,
                                                  repeats=args.steps, device=device) for family in _FAMILIES}
            for precision in args.precisions:
                trained = {}
                for family in _FAMILIES:
                    logger.info("train benchmark: %s %s at %d px, batch %d, %s", family, size, args.resolution,
                                args.batch, precision)
                    cfg = _train_config(family, size, precision, args, shard_keys, Path(tmp) / "runs", peak)
                    trained[family] = _trainer_rate(cfg, args)
                rows += [_row(family, size, precision, bare[family], trained, args.resolution) for family in _FAMILIES]
    header = ["model", "precision", "bare step img/s", "trainer img/s", "trainer / bare", "data wait", "trainer MFU",
              "peak GiB", "AF / DeiT (trainer)", "target"]
    peak_note = f"peak {peak / 1e12:.0f} TFLOP/s bf16" if peak else "no peak known (MFU n/a)"
    return "\n".join([
        f"## End-to-end training throughput through the Trainer ({args.resolution} px, {device.type})",
        "",
        f"Device: {machine_description(device)}; {peak_note}. Trainer: DeepSpeed ZeRO-{args.zero_stage}, "
        f"precision {', '.join(f'{name} = {PRECISIONS[name]}' for name in args.precisions)}, fused AdamW on GPUs; "
        f"batch {args.batch}, {args.workers} loader workers reading JPEG shards "
        f"(random resized crop + flip), drop path 0.1; {args.steps} warm-up steps, then {args.steps} timed "
        f"steps as the Trainer logs them (MFU from its FLOP count). Bare step: the `model` benchmark's loop "
        f"(bf16 autocast, fused AdamW, one resident batch). Anchor mix backend: {args.backend}.",
        "",
        markdown_table(header, rows),
    ])
