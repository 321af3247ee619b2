#!/usr/bin/env python
"""What the anchors of a trained AnchorFormer do, written as PNG files and a JSON: for papers, and
for runs whose TensorBoard is gone. The same diagnostics the trainer logs (docs/tensorboard.md).

    python tools/anchor_report.py runs/demo --out reports/demo                  # the run's own val images
    python tools/anchor_report.py runs/in1k_tiny --checkpoint step_12000 --weights ema --out reports/t
    python tools/anchor_report.py exports/demo --images photos/ --count 4 --out reports/export

MODEL is a run folder or checkpoint (any ZeRO stage and world size), an export folder in timm's
layout, or a timm model name (with --checkpoint FILE), read as launch/eval.py reads it. The images
are the first --count validation images of the run's recipe, or --images (files, folders, globs),
preprocessed as the model is evaluated. DIR receives, each written atomically:

    anchor_report.json          per layer: dead anchors, entropy, degrees, norms, cosines; the maps
    inputs.png                  the images as the model receives them (denormalised)
    anchor_maps_layer_NN.png    first/middle/last layer: image | strongest anchor | over image | cls row of S
    degrees.png                 per layer, the relative degree of each anchor (needs matplotlib)

Bad input (a model that cannot be loaded or is no AnchorFormer, no images) is one ``error:`` line
and exit status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from anchorformer import dist  # noqa: E402
from anchorformer.atomic import atomic_write_bytes  # noqa: E402
from anchorformer.convert import InferenceModel, add_model_arguments, load_for_inference  # noqa: E402
from anchorformer.data.image_files import ImageFiles, expand_image_paths  # noqa: E402
from anchorformer.data.transforms import build_eval_transform  # noqa: E402
from anchorformer.models.anchor_diagnostics import (DEAD_FRACTION, AnchorDiagnostics, AnchorProbe,  # noqa: E402
                                                    anchor_diagnostics)
from anchorformer.models.anchor_pictures import anchor_pictures, input_grid  # noqa: E402
from anchorformer.tasks import Runtime  # noqa: E402
from anchorformer.tasks.classification import ClassificationTask  # noqa: E402

logger = logging.getLogger("tools.anchor_report")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--images", nargs="+", default=None,
                        help="image files, folders or glob patterns (default: the run's validation images)")
    parser.add_argument("--count", type=int, default=8, help="images to probe and draw")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the probe runs (auto: the GPU when CUDA is visible)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNG files and the JSON")
    return parser


def _file_images(inputs: list[str], loaded: InferenceModel, count: int) -> tuple[torch.Tensor, list[str]]:
    """The first ``count`` readable images of ``inputs``, preprocessed for the model."""
    transform = build_eval_transform(loaded.preprocessing, loaded.image_size)
    files = ImageFiles([(str(path), -1) for path in expand_image_paths(inputs)], transform)
    images, names = [], []
    for index in range(len(files)):
        image, _, name = files[index]
        if image is not None:
            images.append(image)
            names.append(name)
        if len(images) == count:
            break
    if not images:
        raise ValueError(f"none of {inputs} is a readable image")
    return torch.stack(images), names


def _validation_images(loaded: InferenceModel, spec: str, count: int, device: torch.device
                       ) -> tuple[torch.Tensor, list[str]]:
    """The first ``count`` validation images of the model's recipe, preprocessed for the model."""
    recipe = loaded.recipe
    if recipe is None or recipe.task != "classification":
        raise ValueError(f"{spec} records no classification validation data of its own; pass --images FILES")
    cfg = dataclasses.replace(
        recipe, data=dataclasses.replace(recipe.data, num_workers=0),
        train=dataclasses.replace(recipe.train, micro_batch_size=count, global_batch_size=count),
        loss=dataclasses.replace(recipe.loss, distillation="none"))  # a teacher is for training only
    runtime = Runtime(env=dist.detect(environ={}, argv=[], cuda_available=device.type == "cuda"), device=device,
                      dtype=torch.float32)
    stream = ClassificationTask(cfg, runtime).build_val_data(loaded.image_size, loaded.preprocessing)
    images, labels = next(iter(stream))[:2]
    return images, [f"validation image {i} (label {int(label)})" for i, label in enumerate(labels)]


def _png(picture: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    return buffer.getvalue()


def _degree_plot(result: AnchorDiagnostics) -> bytes:
    """Per layer, each anchor's relative degree (sorted), with the dead line."""
    import matplotlib  # imported here: only this figure needs it (the plots extra)

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    colours = plt.get_cmap("viridis")(np.linspace(0.0, 0.9, len(result.layers)))  # dark = first layer
    for layer, colour in zip(result.layers, colours):
        degrees = np.sort(layer.anchor_degree.numpy())[::-1].clip(min=1e-6)  # an underflowed anchor stays on the axis
        axes.plot(np.arange(1, len(degrees) + 1), degrees, marker=".", color=colour, label=f"layer {layer.layer}")
    axes.axhline(DEAD_FRACTION, color="black", linestyle="--", linewidth=1, label=f"dead below {DEAD_FRACTION:g}")
    axes.set_yscale("log")
    axes.set_xlabel("anchor (sorted by degree)")
    axes.set_ylabel("degree / (n / m), mean over images and heads")
    axes.legend(fontsize="small", ncol=2)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def report(args: argparse.Namespace) -> dict[str, Any]:
    """Load, probe, write every file; the JSON's content."""
    if args.count < 1:
        raise ValueError(f"--count must be >= 1, got {args.count}")
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} is a file; give a folder (created when missing)")
    device = torch.device("cuda") if dist.uses_cuda(args.device) else torch.device("cpu")
    loaded = load_for_inference(args.model, args.checkpoint, args.weights)
    if args.images:
        images, names = _file_images(args.images, loaded, args.count)
    else:
        images, names = _validation_images(loaded, args.model, args.count, device)
    result = anchor_diagnostics(loaded.model.to(device), AnchorProbe(images.float()))
    mean, std = loaded.preprocessing.mean, loaded.preprocessing.std
    args.out.mkdir(parents=True, exist_ok=True)
    files = {"inputs.png": _png(input_grid(images, mean, std, max_images=len(images)))}
    for tag, picture in anchor_pictures(result, images, mean, std, max_images=None).items():
        files[f"anchor_maps_{tag.rsplit('/', 1)[1]}.png"] = _png(picture)
    try:
        files["degrees.png"] = _degree_plot(result)
    except ImportError:
        logger.warning("matplotlib is not installed (pip install -e '.[plots]'): degrees.png not written")
    content = {"model": loaded.name, **loaded.origin, "images": names, "mean": list(mean), "std": list(std),
               "files": sorted(files), **result.to_dict()}
    for name, payload in files.items():
        atomic_write_bytes(args.out / name, payload)
    atomic_write_bytes(args.out / "anchor_report.json", (json.dumps(content, indent=2) + "\n").encode())
    return content


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        content = report(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for layer in content["layers"]:
        cosine = "n/a" if layer["cosine_max"] is None else f"{layer['cosine_max']:.3f}"
        print(f"layer {layer['layer']:2d}: {layer['dead']} dead of {content['num_anchors']}, entropy "
              f"{layer['entropy']:.3f}, max cosine {cosine}, smallest degree {min(layer['anchor_degree']):.3g}")
    print(f"wrote {args.out} ({', '.join(content['files'])}, anchor_report.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
