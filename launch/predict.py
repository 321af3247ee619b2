#!/usr/bin/env python
"""Predict the classes of images: the top-k classes of each, with their names and probabilities.

    python launch/predict.py exports/demo photos/cat.jpg photos/dogs/ "more/*.png"   # CSV on stdout
    python launch/predict.py runs/demo /data/digits/val-index.json --output predictions.json
    python launch/predict.py runs/in1k_base /data/imagenet/val --top-k 5 --output val.csv --batch-size 128

MODEL is a run folder or checkpoint, an export folder in timm's layout, or a timm model name (as in
launch/eval.py). INPUTS are image files, folders (searched recursively), glob patterns, or shards
(a .tar, a brace pattern of .tar files, or a shard index JSON; rows are named by sample key). The
class names come from the export (the class map written beside the training shards, carried into
it) or the run's shard index. The output format follows --output's suffix (.json, else CSV).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from anchorformer import dist  # noqa: E402
from anchorformer.atomic import atomic_write_bytes  # noqa: E402
from anchorformer.convert import InferenceModel, add_model_arguments, load_for_inference  # noqa: E402
from anchorformer.data import build_val_stream  # noqa: E402
from anchorformer.data.image_files import ImageFileBatches, expand_image_paths  # noqa: E402
from anchorformer.data.transforms import build_eval_transform  # noqa: E402

Prediction = tuple[str, list[int], list[float]]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("inputs", nargs="+", help="image files, folders, glob patterns or shards")
    parser.add_argument("--top-k", type=int, default=5, help="classes reported per image")
    parser.add_argument("--output", type=Path, default=None, help="CSV or JSON file (default: CSV on stdout)")
    parser.add_argument("--format", choices=("csv", "json"), default=None,
                        help="output format (default: from --output's suffix, else csv)")
    parser.add_argument("--img-size", type=int, default=None, help="test resolution (pos_embed resampled)")
    parser.add_argument("--crop-pct", type=float, default=None, help="center-crop fraction in (0, 1]")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward")
    parser.add_argument("--workers", type=int, default=min(4, len(os.sched_getaffinity(0))),
                        help="data loader workers")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: the GPU when CUDA is visible")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _is_shards(item: str) -> bool:
    return item.endswith(".json") or ".tar" in item


def _batches(inputs: list[str], loaded: InferenceModel, batch_size: int, workers: int) -> list[Any]:
    """One batch source per shard specification, one for all the image files; each yields
    ``(images, labels, names)``."""
    files = [item for item in inputs if not _is_shards(item)]
    sources: list[Any] = []
    if files:
        samples = [(str(path), -1) for path in expand_image_paths(files)]
        transform = build_eval_transform(loaded.preprocessing, loaded.image_size)
        sources.append(ImageFileBatches(samples, transform, batch_size, workers))
    for spec in (item for item in inputs if _is_shards(item)):
        sources.append(build_val_stream(spec, index=None, num_classes=loaded.num_classes, rank=0, world_size=1,
                                        micro_batch_size=batch_size, num_workers=workers,
                                        image_size=loaded.image_size, augment=loaded.preprocessing, return_keys=True))
    return sources


@torch.no_grad()
def predict(model: torch.nn.Module, sources: Iterable[Any], top_k: int, device: torch.device,
            progress: Optional[tqdm] = None) -> Iterator[Prediction]:
    """``(name, top-k classes, their probabilities)`` for every image of every source, in order."""
    model = model.to(device).eval()
    for source in sources:
        for images, _, names in source:
            probabilities = model(images.to(device)).float().softmax(dim=-1)
            top = probabilities.topk(top_k, dim=-1)
            for name, classes, values in zip(names, top.indices.tolist(), top.values.tolist()):
                yield name, classes, values
            if progress is not None:
                progress.update(len(names))


def _render(predictions: list[Prediction], label_names: Optional[list[str]], top_k: int, kind: str) -> str:
    def label(index: int) -> Optional[str]:
        return label_names[index] if label_names else None

    if kind == "json":
        rows = [{"input": name, "predictions": [{"class": c, "name": label(c), "probability": p}
                                                for c, p in zip(classes, values)]}
                for name, classes, values in predictions]
        return json.dumps(rows, indent=1) + "\n"
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["input"] + [f"{field}_{rank}" for rank in range(1, top_k + 1)
                                 for field in ("class", "name", "probability")])
    for name, classes, values in predictions:
        writer.writerow([name] + [cell for c, p in zip(classes, values) for cell in (c, label(c) or "", f"{p:.6f}")])
    return text.getvalue()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    kind = args.format or ("json" if args.output is not None and args.output.suffix == ".json" else "csv")
    try:
        if args.top_k < 1 or args.batch_size < 1 or args.workers < 0:
            raise ValueError(f"--top-k ({args.top_k}) and --batch-size ({args.batch_size}) must be >= 1, "
                             f"--workers ({args.workers}) >= 0")
        device = dist.resolve_device(args.device, dist.detect(cuda_available=dist.uses_cuda(args.device)))
        loaded = load_for_inference(args.model, args.checkpoint, args.weights, args.img_size, args.crop_pct)
        top_k = min(args.top_k, loaded.num_classes)
        sources = _batches(args.inputs, loaded, args.batch_size, args.workers)
        total = sum(source.num_samples for source in sources)
        with tqdm(total=total, unit="img", desc="predict", disable=args.no_progress, dynamic_ncols=True) as bar:
            predictions = list(predict(loaded.model, sources, top_k, device, bar))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    text = _render(predictions, loaded.label_names, top_k, kind)
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(args.output, text.encode())
    where = "" if args.output is None else f"; wrote {args.output} ({kind})"
    print(f"predicted {len(predictions)} of {total} images (unreadable ones are logged above){where}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
