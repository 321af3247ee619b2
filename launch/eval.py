#!/usr/bin/env python
"""Evaluate a classifier on validation data: top-1, top-5, loss, samples, images/s.

    python launch/eval.py runs/demo                                  # latest checkpoint, the run's own val data
    python launch/eval.py runs/in1k_tiny --checkpoint step_12000 --weights ema
    python launch/eval.py runs/in1k_base --img-size 384 --crop-pct 1.0   # another test resolution
    python launch/eval.py exports/demo --data /data/digits/val-index.json   # an export folder, on shards
    python launch/eval.py deit_tiny_patch16_224 --data /data/imagenet/val   # a timm model, on an ImageFolder
    torchrun --nproc_per_node 8 launch/eval.py runs/in1k_base             # (or srun): every sample counted once

MODEL is a run folder or checkpoint (any ZeRO stage and world size), an export folder in timm's
layout (tools/convert_checkpoint.py --format timm), or a timm model name (with --checkpoint FILE,
those weights; else timm's pretrained ones). --data is a shard pattern, a shard index JSON or an
ImageFolder tree (one sub-folder per class); a run folder defaults to its own validation data.
The preprocessing is the recipe's (or the export's pretrained cfg). A run folder's result goes to
RUN/eval/latest.json (RUN/eval/<checkpoint>[-ema][-<px>px].json for others), else to --output.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from anchorformer import dist  # noqa: E402
from anchorformer.atomic import atomic_write_bytes  # noqa: E402
from anchorformer.config import RootConfig  # noqa: E402
from anchorformer.convert import InferenceModel, add_model_arguments, load_for_inference  # noqa: E402
from anchorformer.data.image_files import ImageFileBatches  # noqa: E402
from anchorformer.data.sources import list_image_folder  # noqa: E402
from anchorformer.data.transforms import build_eval_transform  # noqa: E402
from anchorformer.engine.baseline import recorded_baseline  # noqa: E402
from anchorformer.kernels import autotune  # noqa: E402
from anchorformer.run_folder import RunFolder  # noqa: E402
from anchorformer.tasks import Runtime  # noqa: E402
from anchorformer.tasks.classification import ClassificationTask  # noqa: E402
from anchorformer.tasks.linear_baseline import baseline_report  # noqa: E402

logger = logging.getLogger("launch.eval")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--data", default=None,
                        help="validation shards (brace pattern or index JSON) or an ImageFolder tree "
                             "(default: the run's validation data)")
    parser.add_argument("--index", default=None, help="the shards' index JSON, when not beside them")
    parser.add_argument("--img-size", type=int, default=None,
                        help="test resolution in pixels (pos_embed resampled; default: the model's)")
    parser.add_argument("--crop-pct", type=float, default=None,
                        help="center-crop fraction in (0, 1] (default: the recipe's / export's)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per forward and rank (default: the run's micro batch, else 64)")
    parser.add_argument("--workers", type=int, default=None,
                        help="data loader workers per rank (default: the run's, else up to 4)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: this rank's GPU when CUDA is visible")
    parser.add_argument("--output", type=Path, default=None, help="JSON file for the result")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _check(args: argparse.Namespace) -> None:
    if args.img_size is not None and args.img_size < 1:
        raise ValueError(f"--img-size must be a positive number of pixels, got {args.img_size}")
    if args.crop_pct is not None and not 0.0 < args.crop_pct <= 1.0:
        raise ValueError(f"--crop-pct must be in (0, 1], got {args.crop_pct}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers is not None and args.workers < 0:
        raise ValueError(f"--workers must be >= 0 (0 loads in the evaluating process), got {args.workers}")


def _evaluation_config(loaded: InferenceModel, args: argparse.Namespace) -> RootConfig:
    """The configuration the classification task evaluates with: the run's (a default one for
    exports and timm models), with this model, the batch and workers asked for, and ``--data``."""
    base = loaded.recipe or RootConfig()
    batch = args.batch_size or (base.train.micro_batch_size if loaded.recipe else 64)
    default_workers = base.data.num_workers if loaded.recipe else min(4, len(os.sched_getaffinity(0)))
    workers = args.workers if args.workers is not None else default_workers
    data = dataclasses.replace(base.data, num_workers=workers)
    if args.data is not None and not Path(args.data).is_dir():
        data = dataclasses.replace(data, source="shards", val_shards=args.data, val_index=args.index)
    return dataclasses.replace(
        base, data=data,
        model=dataclasses.replace(base.model, name=loaded.name, num_classes=loaded.num_classes,
                                  img_size=loaded.image_size),
        train=dataclasses.replace(base.train, micro_batch_size=batch, global_batch_size=batch),
        loss=dataclasses.replace(base.loss, distillation="none"))  # a teacher is for training only


def _image_folder(root: str, loaded: InferenceModel, cfg: RootConfig, env: dist.DistEnv) -> ImageFileBatches:
    """An ImageFolder tree's files with labels: by class name when the model knows its class names,
    else by sorted folder name (the torchvision convention, as tools/make_shards.py labels)."""
    listing = list_image_folder(root)
    labels = {name: label for label, name in enumerate(listing.classes)}
    if loaded.label_names:
        unknown = sorted(set(listing.classes) - set(loaded.label_names))
        if unknown:
            raise ValueError(f"{root} has class folders the model does not know: {unknown[:5]}; its classes are "
                             f"{loaded.label_names[:5]}...")
        labels = {name: loaded.label_names.index(name) for name in listing.classes}
    if max(labels.values()) >= loaded.num_classes:
        raise ValueError(f"{root} has {len(listing.classes)} class folders but the model {loaded.num_classes} "
                         "classes")
    samples = [(sample.path, labels[listing.classes[sample.label]]) for sample in listing.samples]
    transform = build_eval_transform(loaded.preprocessing, loaded.image_size)
    return ImageFileBatches(samples, transform, cfg.train.micro_batch_size, cfg.data.num_workers, env.rank,
                            env.world_size)


def _with_progress(batches: Iterable[Any], total: int, enabled: bool) -> Iterator[Any]:
    with tqdm(total=total, unit="img", desc="eval", disable=not enabled, dynamic_ncols=True) as bar:
        for batch in batches:
            yield batch
            bar.update(len(batch[1]))


def _default_output(args: argparse.Namespace) -> Optional[Path]:
    run = RunFolder(Path(args.model))
    if args.output is not None or not run.is_run():
        return args.output
    name = Path(args.checkpoint).name if args.checkpoint else "latest"
    name += "-ema" if args.weights == "ema" else ""
    name += f"-{args.img_size}px" if args.img_size else ""
    return run.evaluations / f"{name}.json"


def evaluate(args: argparse.Namespace, env: dist.DistEnv) -> dict[str, Any]:
    """Load, build the validation batches, evaluate; the result (identical on every rank)."""
    loaded = load_for_inference(args.model, args.checkpoint, args.weights, args.img_size, args.crop_pct)
    if args.data is None and loaded.recipe is None:
        raise ValueError(f"{args.model} records no validation data of its own; pass --data SHARDS (a pattern or "
                         "index JSON) or --data FOLDER (an ImageFolder tree)")
    cfg = _evaluation_config(loaded, args)
    runtime = Runtime(env=env, device=dist.resolve_device(args.device, env), dtype=torch.float32)
    task = ClassificationTask(cfg, runtime)
    if args.data is not None and Path(args.data).is_dir():
        batches, data = _image_folder(args.data, loaded, cfg, env), args.data
    else:
        batches = task.build_val_data(loaded.image_size, loaded.preprocessing)
        data = cfg.data.val_shards if cfg.data.source == "shards" else "embedded digits (validation split)"
    model = loaded.model.to(runtime.device)
    progress = _with_progress(batches, batches.num_samples, env.is_main and not args.no_progress)
    start = time.perf_counter()
    metrics = task.evaluate(model, progress)
    seconds = time.perf_counter() - start
    return {**metrics, "images_per_s": metrics["samples"] / seconds, "seconds": seconds, **loaded.origin,
            "data": str(data), "image_size": loaded.image_size,
            "crop_pct": loaded.preprocessing.crop_pct, "world_size": env.world_size, "device": str(runtime.device),
            "anchor_mix": autotune.decisions()}  # the backends auto measured for this evaluation's shapes


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _check(args)
        env = dist.detect(cuda_available=dist.uses_cuda(args.device))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if env.is_main else logging.WARNING,
                        format=f"%(asctime)s [rank {env.rank}] %(name)s: %(message)s", datefmt="%H:%M:%S")
    if env.world_size > 1:
        dist.init(env)
    try:
        result = evaluate(args, env)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        dist.shutdown()
    if env.is_main:
        top5 = next((key for key in result if key.startswith("top") and key != "top1"), None)
        print(f"top-1 {result['top1']:.2f}%" + (f", {top5[:3]}-{top5[3:]} {result[top5]:.2f}%" if top5 else "")
              + f", loss {result['loss']:.4f}, {int(result['samples'])} images, {result['images_per_s']:.1f} img/s")
        # a run's own validation data: its linear baseline beside, and what to try when the model is below it
        baseline = recorded_baseline(RunFolder(Path(args.model))) if args.data is None else None
        if baseline is not None:
            result["linear_baseline_top1"] = baseline.top1
            print("\n".join(baseline_report(result["top1"], baseline)))
        output = _default_output(args)
        if output is not None:
            output.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(output, (json.dumps(result, indent=2) + "\n").encode())
            print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
