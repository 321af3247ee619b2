"""A pre-trained ViT/DeiT as the start of an AnchorFormer: read the ViT (a timm folder, a
``.safetensors``/``.pth`` file or a run of this framework), convert it to an AnchorFormer of the same
width, depth, patch size and heads (``models.from_vit``), initialise the anchors by k-means on the
user's training shards and fit each layer's qk and anchors to the ViT's attention there;
``tools/convert_checkpoint.py --from-vit`` writes the result as a
classification export (safetensors or timm folder) that ``model.pretrained_checkpoint`` and timm
load, with the conversion report recorded in it.

    python tools/convert_checkpoint.py runs/deit_demo --from-vit --anchor-data shards/train-index.json \\
        --output exports/af_from_deit.safetensors
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

import timm
import torch

import anchorformer.models  # noqa: F401  (registers the AnchorFormer models with timm)
from anchorformer.config import AugmentConfig
from anchorformer.convert.recipe import recipe_of
from anchorformer.convert.source import SourceCheckpoint, load_source
from anchorformer.convert.timm_folder import is_timm_folder
from anchorformer.data import build_val_stream
from anchorformer.data.transforms import eval_preprocessing, eval_pretrained_cfg
from anchorformer.models.from_vit import (
    ATTENTION_FIT_STEPS, DEFAULT_QK_RULE, convert_vit_state_dict, init_from_data, vit_architecture,
)

__all__ = ["ANCHOR_IMAGES", "AnchorData", "ViTSource", "load_vit_source", "target_model_name", "anchor_batches",
           "convert_vit"]

logger = logging.getLogger(__name__)

ANCHOR_IMAGES = 2000
"""Training images whose qk vectors the anchors are clustered from, unless told otherwise."""
_VIT_PREFIXES = ("deit_", "vit_")
_SHAPE_ARGS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "class_token",
               "global_pool", "no_embed_class", "init_values", "reg_tokens", "fc_norm")
"""Recorded ViT arguments the AnchorFormer shares (not qkv_bias, qk_norm, ... of the attention)."""
_LABELS_UNUSED = 1 << 30
"""The anchors need images only: any label the shards hold is accepted."""


@dataclass(frozen=True)
class AnchorData:
    """Where the anchors' k-means reads its images: shards (brace pattern, list or index JSON),
    their index JSON, and how many images (the first ones of the shards, in order)."""

    shards: str
    index: Optional[str] = None
    images: int = ANCHOR_IMAGES
    batch_size: int = 100


@dataclass
class ViTSource:
    """A ViT/DeiT to convert: its weights, its heads (not visible in the tensors; None when the
    source does not record its model) and the evaluation preprocessing it records (None: unknown)."""

    checkpoint: SourceCheckpoint
    num_heads: Optional[int]
    preprocessing: Optional[AugmentConfig]
    """crop fraction, interpolation and normalisation (``data.augment``)"""
    image_size: Optional[int]
    """side of the center crop, pixels (``data.image_size``)"""


def load_vit_source(path: str | Path) -> ViTSource:
    """The ViT's weights and what they record: a timm folder (``config.json`` + ``model.safetensors``:
    architecture, model arguments and preprocessing), or anything ``load_source`` reads (a run
    folder of this framework with its recipe, a ``.safetensors``/``.pth`` file).

    Raises:
        ValueError: for a missing or unreadable source, or one that holds no ViT/DeiT.
    """
    path = Path(path)
    preprocessing, image_size = None, None
    if is_timm_folder(path):
        try:
            config = json.loads((path / "config.json").read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path / 'config.json'} is not valid JSON ({err})") from err
        weights = path / "model.safetensors"
        if not weights.is_file():
            raise ValueError(f"{path} has config.json but no model.safetensors; is the timm folder complete?")
        source = load_source(weights)
        args = {**dict(config.get("model_args") or {}), "num_classes": config.get("num_classes")}
        source = SourceCheckpoint(state_dict=source.state_dict, weights="model", source=str(path),
                                  model_name=config.get("architecture"),
                                  model_args={k: v for k, v in args.items() if v is not None})
        pretrained = config.get("pretrained_cfg") or {}
        if "input_size" in pretrained and "mean" in pretrained:
            preprocessing, image_size = eval_preprocessing(pretrained)
    else:
        source = load_source(path)
        recipe = recipe_of(source)
        if recipe is not None:
            preprocessing, image_size = recipe.data.augment, recipe.data.image_size
    vit_architecture(source.state_dict)  # refuses a source that is no ViT, naming what it holds
    return ViTSource(source, _recorded_heads(source), preprocessing, image_size)


def _recorded_heads(source: SourceCheckpoint) -> Optional[int]:
    """The heads of the model ``source`` records (built on the meta device: no memory, no init)."""
    if not source.model_name or source.model_name not in timm.list_models():
        return None
    with torch.device("meta"):
        model = timm.create_model(source.model_name, **source.model_args)
    return int(model.blocks[0].attn.num_heads)


def target_model_name(source_name: Optional[str]) -> Optional[str]:
    """The AnchorFormer counterpart of a timm ViT/DeiT name (``deit_tiny_patch16_224`` ->
    ``anchorformer_tiny_patch16_224``), when one is registered."""
    for prefix in _VIT_PREFIXES:
        if source_name and source_name.startswith(prefix):
            name = "anchorformer_" + source_name[len(prefix):]
            return name if name in timm.list_models() else None
    return None


def anchor_batches(data: AnchorData, augment: AugmentConfig, image_size: int) -> Iterator[torch.Tensor]:
    """The first ``data.images`` images of the shards, in batches, through the evaluation transform
    of ``augment`` at ``image_size``.

    Raises:
        ValueError: for shards that do not exist or hold no readable image.
    """
    stream = build_val_stream(data.shards, index=data.index, num_classes=_LABELS_UNUSED, rank=0, world_size=1,
                              micro_batch_size=data.batch_size, num_workers=0, image_size=image_size,
                              augment=augment)
    seen = 0
    for images, _ in stream:
        if seen >= data.images:
            break
        images = images[: data.images - seen]
        seen += len(images)
        yield images
    if seen == 0:
        raise ValueError(f"no readable image in the anchor data {data.shards}; check the shards "
                         "(tools/make_shards.py) or pass other ones with --anchor-data")


def _target_args(vit: ViTSource, model_args: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The target's ``timm.create_model`` arguments: the source's shape, classes and image size,
    then the user's (``num_anchors``, ...; a shape that differs is refused by the conversion)."""
    state = vit.checkpoint.state_dict
    architecture = vit_architecture(state)
    recorded = {k: v for k, v in vit.checkpoint.model_args.items() if k in _SHAPE_ARGS}
    size = recorded.get("img_size")
    if isinstance(size, (list, tuple)):  # timm's config.json records [H, W]
        if len(set(size)) != 1:
            raise ValueError(f"the ViT's img_size {list(size)} is not square; AnchorFormer exports are square")
        recorded["img_size"] = int(size[0])
    args = {**recorded, **architecture, **({"num_heads": vit.num_heads} if vit.num_heads else {})}
    args["num_classes"] = int(state["head.weight"].shape[0]) if "head.weight" in state else 0
    if "img_size" not in args:
        grid = state["pos_embed"].shape[1] - sum(key in state for key in ("cls_token", "dist_token"))
        args["img_size"] = math.isqrt(grid) * architecture["patch_size"]
    return {**args, **(model_args or {})}


def convert_vit(vit: ViTSource, anchor_data: Optional[AnchorData], model_name: Optional[str] = None,
                model_args: Optional[Dict[str, Any]] = None, qk_rule: str = DEFAULT_QK_RULE,
                fit_steps: int = ATTENTION_FIT_STEPS) -> Tuple[SourceCheckpoint, Dict[str, Any]]:
    """Convert a ViT/DeiT into AnchorFormer weights, ready for ``export_classification`` /
    ``export_timm_folder`` (pass the report as their ``conversion``).

    Args:
        vit: the ViT (:func:`load_vit_source`).
        anchor_data: images for the anchors' k-means and the attention fit, preprocessed as the ViT
            records (else timm's ImageNet default at the model's size); None keeps the anchors'
            fresh initialisation (recorded as such: fine-tuning then has more to learn).
        model_name: the AnchorFormer; default the source's counterpart (``deit_*`` -> ``anchorformer_*``).
        model_args: ``timm.create_model`` arguments of the target (e.g. ``num_anchors``); width,
            depth, patch size, heads, classes and image size default to the source's.
        qk_rule: how q and k become qk (``models.from_vit.QK_RULES``).
        fit_steps: Adam steps per layer fitting qk and anchors to the ViT's attention (0: k-means only).

    Returns:
        The AnchorFormer's weights (recording its name, arguments, the source's step and recipe) and
        the conversion report (plain data).

    Raises:
        ValueError: for an unknown target or one of another shape, or unreadable anchor data.
    """
    source = vit.checkpoint
    name = model_name or target_model_name(source.model_name)
    if not name:
        raise ValueError(f"{source.source} records no ViT/DeiT name with an AnchorFormer counterpart "
                         f"({source.model_name!r}); pass the target with --model (e.g. anchorformer_tiny_patch16_224)")
    if name not in timm.list_models("anchorformer*"):
        raise ValueError(f"target {name!r} is not an AnchorFormer; AnchorFormer models: "
                         f"{timm.list_models('anchorformer*')}")
    start = time.perf_counter()
    args = _target_args(vit, model_args)
    model = timm.create_model(name, **args)
    state, report = convert_vit_state_dict(source.state_dict, model, qk_rule, source_heads=vit.num_heads)
    model.load_state_dict(state)
    report["source"] = {"path": source.source, "model": source.model_name, "step": source.step}
    report["convert_seconds"] = round(time.perf_counter() - start, 2)
    if anchor_data is not None:
        augment = vit.preprocessing or AugmentConfig()
        image_size = vit.image_size or int(args["img_size"])
        batches = anchor_batches(anchor_data, augment, image_size)
        report["anchors"] = init_from_data(model, batches, vit=source.state_dict, fit_steps=fit_steps)
        report["anchors"].update(shards=anchor_data.shards, preprocessing=eval_pretrained_cfg(augment, image_size))
    logger.info("converted %s (%s) into %s: qk rule %s, anchors %s", source.source, source.model_name, name, qk_rule,
                "from data" if anchor_data is not None else "not initialised from data")
    converted = SourceCheckpoint(state_dict=model.state_dict(), weights="model", source=source.source,
                                 model_name=name, model_args=args, step=source.step, recipe=source.recipe)
    return converted, json.loads(json.dumps(report))  # plain data (tuples -> lists), as exports store it
