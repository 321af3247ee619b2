#!/usr/bin/env python
"""Convert a training checkpoint into a classifier (one safetensors file, or a folder in timm's own
layout) or a detection / segmentation backbone, checked against the source model before anything
is written.

    # a folder timm loads by itself: timm.create_model("local-dir:exports/demo", pretrained=True),
    # with the recipe's preprocessing (timm.data.resolve_data_config) and the class names
    python tools/convert_checkpoint.py runs/demo --format timm --output exports/demo
    # classification model, into the folder timm's pretrained=True looks in (weights_dir())
    python tools/convert_checkpoint.py runs/in1k_tiny --format classification
    # its EMA weights instead
    python tools/convert_checkpoint.py runs/in1k_tiny --format classification --weights ema
    # backbone for configs/coco_maskrcnn_tiny.yaml / configs/ade20k_upernet_tiny.yaml
    python tools/convert_checkpoint.py runs/in1k_tiny --format backbone --image-size 1024 \\
        --output weights/anchorformer_tiny_backbone.safetensors
    # the same for mmdetection / mmsegmentation users (keys prefixed with backbone.)
    python tools/convert_checkpoint.py runs/in1k_tiny --format backbone --layout mmdet --output x.safetensors
    # a plain state dict that does not record its model
    python tools/convert_checkpoint.py model.pth --model anchorformer_small_patch16_224 --format classification
    # a pre-trained ViT/DeiT (timm folder, .safetensors/.pth, or a run of configs/deit_*.yaml) as an
    # AnchorFormer of the same shape, its anchors clustered from 2000 of your training images; then
    # fine-tune it with model.pretrained_checkpoint=af.safetensors
    python tools/convert_checkpoint.py runs/deit_in1k_tiny --from-vit --anchor-data shards/train-index.json \\
        --output af.safetensors

SOURCE is a run folder, its checkpoints folder or one DeepSpeed tag folder (any ZeRO stage and world
size), a .pt/.pth state dict, or a .safetensors file; with --from-vit also a timm folder
(config.json + model.safetensors) of a ViT/DeiT. The output is staged under a temporary name,
loaded back the way users load it and compared with the source model (the parity check); it is
moved into place only when the difference is within --tolerance.
"""
import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anchorformer.convert import (  # noqa: E402
    Exported, backbone_parity, classification_parity, export_backbone, export_classification, export_timm_folder,
    load_source,
)
from anchorformer.convert.vit_source import ANCHOR_IMAGES, AnchorData, convert_vit, load_vit_source  # noqa: E402
from anchorformer.models import default_weights_file  # noqa: E402
from anchorformer.models.from_vit import ATTENTION_FIT_STEPS, DEFAULT_QK_RULE, QK_RULES  # noqa: E402

FORMATS = ("classification", "timm", "backbone")


def _default_output(args: argparse.Namespace, model_name: str) -> Path:
    if args.format == "timm":
        return default_weights_file(model_name, args.tag).with_suffix("")
    suffix = "" if args.format == "classification" else f"-backbone{args.image_size}"
    if args.layout == "mmdet":
        suffix += "-mmdet"
    return default_weights_file(model_name, args.tag, suffix)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="run folder, DeepSpeed checkpoint folder, .pt/.pth or .safetensors")
    parser.add_argument("--format", choices=FORMATS, default="classification",
                        help="whole classifier as one safetensors file, whole classifier as a folder in timm's "
                             "layout (config.json + model.safetensors), or encoder without head for "
                             "detection/segmentation")
    parser.add_argument("--weights", choices=("model", "ema"), default="model",
                        help="the trained weights or their exponential moving average (train.ema.enabled)")
    parser.add_argument("--output", type=Path, default=None,
                        help="the .safetensors file (or, with --format timm, the folder) to write "
                             "(default: weights_dir()/MODEL.TAG[-backbone...][.safetensors])")
    parser.add_argument("--tag", default="in1k", help="weight tag in the default output name (MODEL.TAG)")
    parser.add_argument("--image-size", type=int, default=1024,
                        help="backbone only: resolution in pixels pos_embed is resized to")
    parser.add_argument("--layout", choices=("anchorformer", "mmdet"), default="anchorformer",
                        help="backbone only: our keys, or mmdetection/mmsegmentation's 'backbone.' prefix")
    parser.add_argument("--model", default=None,
                        help="timm model name, when the source does not record it (refused when it records another)")
    parser.add_argument("--model-args", type=json.loads, default=None,
                        help='JSON of timm.create_model arguments, e.g. \'{"embed_dim": 192, "depth": 4}\'')
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest |output difference| the parity check accepts")
    parser.add_argument("--no-parity", action="store_true", help="skip the parity check")
    vit = parser.add_argument_group("from a ViT/DeiT (--from-vit)")
    vit.add_argument("--from-vit", action="store_true",
                     help="SOURCE is a ViT/DeiT: write an AnchorFormer of its width, depth, patch size and heads "
                          "(--model: default the source's anchorformer_* counterpart)")
    vit.add_argument("--qk-rule", choices=QK_RULES, default=DEFAULT_QK_RULE,
                     help="how the ViT's query and key weights become the one qk projection")
    vit.add_argument("--num-anchors", type=int, default=None, help="anchors per layer (default: the model's)")
    vit.add_argument("--anchor-data", default=None,
                     help="training shards (brace pattern or index JSON) whose images the anchors are clustered "
                          "from (k-means of the converted qk vectors); without it the anchors keep a random init")
    vit.add_argument("--anchor-index", default=None, help="the anchor shards' index JSON, when not beside them")
    vit.add_argument("--anchor-images", type=int, default=ANCHOR_IMAGES,
                     help="images of --anchor-data read for the k-means (the first ones)")
    vit.add_argument("--fit-steps", type=int, default=ATTENTION_FIT_STEPS,
                     help="Adam steps per layer fitting qk and anchors to the ViT's attention output on the "
                          "--anchor-data images (0: k-means only)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.image_size < 16:
        parser.error(f"--image-size must be >= 16 pixels, got {args.image_size}")
    if args.from_vit:
        return _from_vit(parser, args)

    named = dict(model_name=args.model, model_args=args.model_args)
    parities: list[float] = []
    try:
        source = load_source(args.source, args.weights)
        model_name = args.model or source.model_name
        if not model_name:
            raise ValueError(f"{args.source} does not record its model; pass --model NAME")
        output = args.output or _default_output(args, model_name)
        parity = backbone_parity if args.format == "backbone" else classification_parity

        def verify(staged: Exported) -> None:
            parities.append(parity(source, staged, **named))
            if not parities[-1] <= args.tolerance:
                raise ValueError(f"parity check failed: the export differs from the source model by "
                                 f"{parities[-1]:.3g} > --tolerance {args.tolerance:g}; nothing was written")

        checked = {"verify": None if args.no_parity else verify}
        if args.format == "classification":
            exported = export_classification(source, output, **named, **checked)
        elif args.format == "timm":
            exported = export_timm_folder(source, output, **named, **checked)
        else:
            exported = export_backbone(source, output, args.image_size, args.layout, **named, **checked)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {exported.path} ({args.format}, {args.weights} weights of {exported.model_name}, "
          f"step {exported.metadata['step']})")
    if parities:
        what = f"last-block features at {args.image_size} px" if args.format == "backbone" else "logits"
        print(f"parity: max |{what} difference| = {parities[0]:.3g}")
    return 0


def _from_vit(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """--from-vit: the ViT converted, its anchors clustered, written as a checked classification export."""
    if args.format == "backbone" or args.weights != "model":
        parser.error("--from-vit writes a classifier of the ViT's model weights: use --format classification or "
                     "timm, and leave --weights out")
    if args.output is None:
        parser.error("--from-vit needs --output (a .safetensors file, or a folder with --format timm)")
    if args.anchor_images < 1 or args.fit_steps < 0:
        parser.error(f"--anchor-images must be >= 1 and --fit-steps >= 0, got {args.anchor_images} and "
                     f"{args.fit_steps}")
    model_args = dict(args.model_args or {}, **({"num_anchors": args.num_anchors} if args.num_anchors else {}))
    anchor_data = (AnchorData(args.anchor_data, args.anchor_index, args.anchor_images)
                   if args.anchor_data else None)
    try:
        converted, report = convert_vit(load_vit_source(args.source), anchor_data, args.model, model_args,
                                        args.qk_rule, args.fit_steps)
        parities: list[float] = []

        def verify(staged: Exported) -> None:
            parities.append(classification_parity(converted, staged))
            if not parities[-1] <= args.tolerance:
                raise ValueError(f"parity check failed: the export differs from the converted model by "
                                 f"{parities[-1]:.3g} > --tolerance {args.tolerance:g}; nothing was written")

        write = export_timm_folder if args.format == "timm" else export_classification
        exported = write(converted, args.output, verify=None if args.no_parity else verify, conversion=report)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    anchors = report["anchors"]
    print(f"wrote {exported.path} ({args.format}: {exported.model_name} from the ViT {args.source}, qk rule "
          f"{report['qk_rule']}, converted in {report['convert_seconds']:.2f} s)")
    if isinstance(anchors, dict):
        fitted = f", qk and anchors fitted to the ViT's attention ({args.fit_steps} steps per layer)" \
            if anchors["attention_fit"] else ""
        print(f"anchors: k-means of the qk vectors of {anchors['images']} images of {anchors['shards']}{fitted} "
              f"({anchors['seconds']:.1f} s)")
    else:
        print(f"anchors: {anchors}; pass --anchor-data TRAIN_SHARDS to cluster them from your images")
    if parities:
        print(f"parity: max |logits difference| between the export and the converted model = {parities[0]:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
