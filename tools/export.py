#!/usr/bin/env python
"""Export a classifier as an ONNX model (dynamic batch, opset >= 17) or a torch.export program
(.pt2), checked against eager PyTorch on real images before it is written.

    python tools/export.py exports/demo --format onnx                  # -> exports/demo/model.onnx
    python tools/export.py runs/in1k_base --format pt2 --output in1k_base.pt2
    python tools/export.py anchorformer_tiny_patch16_224 --checkpoint model.safetensors --format onnx \\
        --output tiny.onnx --images photos/                              # parity on your own images

MODEL is a run folder or checkpoint, an export folder in timm's layout, or a timm model name (as in
launch/eval.py); its evaluation preprocessing prepares the parity images (default: crops of
scikit-learn's two sample photos). The export is run at two batch sizes (onnxruntime for ONNX,
torch.export.load for .pt2) and written only when its largest logit difference from the eager
model is within --tolerance. Load it with onnxruntime.InferenceSession(path) (input "images",
output "logits") or torch.export.load(path).module().
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/: the benchmarks package

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from anchorformer.convert import (  # noqa: E402
    FORMATS, add_model_arguments, export_graph, is_timm_folder, load_for_inference,
)
from anchorformer.convert.graph_export import MIN_OPSET  # noqa: E402
from anchorformer.data.image_files import expand_image_paths  # noqa: E402
from anchorformer.data.transforms import build_eval_transform  # noqa: E402
from anchorformer.run_folder import RunFolder  # noqa: E402
from benchmarks.report import photo_crops  # noqa: E402


def _default_output(model: str, kind: str) -> Path:
    folder = Path(model)
    if is_timm_folder(folder):
        return folder / f"model.{kind}"
    if RunFolder(folder).is_run():
        return RunFolder(folder).exports / f"model.{kind}"
    raise ValueError(f"pass --output FILE.{kind}: {model} is neither an export folder nor a run folder")


def _parity_images(inputs: list[str] | None, count: int) -> list[Image.Image]:
    if not inputs:
        return list(photo_crops(count))
    images = []
    for path in expand_image_paths(inputs)[:count]:
        try:
            with Image.open(path) as opened:
                images.append(opened.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as err:
            raise ValueError(f"{path} is not a readable image ({err}); pass other --images") from err
    if len(images) < 2:
        raise ValueError(f"--images names {len(images)} image(s); the parity check needs at least 2")
    return images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--format", choices=FORMATS, required=True, help="onnx or pt2 (torch.export)")
    parser.add_argument("--output", type=Path, default=None,
                        help="file to write (default: FOLDER/model.FORMAT for an export folder, "
                             "RUN/export/model.FORMAT for a run folder)")
    parser.add_argument("--img-size", type=int, default=None, help="input resolution (pos_embed resampled)")
    parser.add_argument("--opset", type=int, default=18, help=f"ONNX opset (>= {MIN_OPSET})")
    parser.add_argument("--images", nargs="+", default=None,
                        help="image files, folders or globs for the parity check (default: sample photos)")
    parser.add_argument("--parity-images", type=int, default=4, help="images in the parity batch (>= 2)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest |logit difference| accepted")
    args = parser.parse_args(argv)
    try:
        if args.parity_images < 2:
            raise ValueError(f"--parity-images must be >= 2, got {args.parity_images}")
        output = args.output or _default_output(args.model, args.format)
        loaded = load_for_inference(args.model, args.checkpoint, args.weights, args.img_size)
        transform = build_eval_transform(loaded.preprocessing, loaded.image_size)
        images = torch.stack([transform(image) for image in _parity_images(args.images, args.parity_images)])
        exported = export_graph(loaded.model, args.format, output, images, opset=args.opset,
                                tolerance=args.tolerance)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    detail = f"opset {args.opset}, " if args.format == "onnx" else ""
    print(f"wrote {exported.path} ({args.format}, {detail}dynamic batch, {loaded.image_size} px)")
    print(f"parity: max |logit difference| vs eager PyTorch = {exported.max_difference:.3g} on real images at "
          f"batch sizes {' and '.join(map(str, exported.batch_sizes))} (tolerance {args.tolerance:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
