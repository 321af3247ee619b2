"""Write converted weights: a ``classification`` model (every key of the timm model, loadable with
``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))``) or a
``backbone`` (head removed, ``pos_embed`` resized to the fine-tuning resolution, keys as our
detection/segmentation encoders expect, or with the ``backbone.`` prefix of the mmdetection /
mmsegmentation layout). Only safetensors are written, with the provenance (source, step, model
name and arguments, resolution) in the safetensors header and a JSON config next to the file. Both
files are staged and checked (``verify``) before either is moved into place.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Literal, Optional, Tuple

import timm
import torch
from safetensors.torch import save_file
from torch import nn

import anchorformer.models  # noqa: F401  (registers the AnchorFormer models with timm)
from anchorformer.convert.source import SourceCheckpoint
from anchorformer.convert.staging import staged_outputs
from anchorformer.models.anchorformer import checkpoint_filter_fn
from anchorformer.models.backbone import TOOLBOX_PREFIX, load_backbone_weights

__all__ = ["Layout", "Exported", "Verify", "build_source_model", "export_metadata", "export_classification",
           "export_backbone", "read_metadata", "create_model_from_export", "config_path"]

logger = logging.getLogger(__name__)

Layout = Literal["anchorformer", "mmdet"]


@dataclass
class Exported:
    """A written export: its file, the model name and the ``timm.create_model`` arguments of the
    network its tensors belong to."""

    path: Path
    model_name: str
    model_args: Dict[str, Any]
    metadata: Dict[str, str]


Verify = Callable[[Exported], None]
"""A check of a staged export (``Exported.path`` is the staging path): raise ValueError to refuse
it, and nothing is written."""


def build_source_model(source: SourceCheckpoint, model_name: Optional[str] = None,
                       model_args: Optional[Dict[str, Any]] = None, **create_kwargs: Any
                       ) -> Tuple[nn.Module, Dict[str, Any]]:
    """The network of ``source`` with its weights loaded, in eval mode.

    Args:
        source: weights read by :func:`anchorformer.convert.source.load_source`.
        model_name: timm name; default the one recorded with the weights.
        model_args: ``timm.create_model`` arguments overriding the recorded ones; ``num_classes``
            and ``img_size`` default to what the head and ``pos_embed`` shapes say.
        **create_kwargs: further ``timm.create_model`` arguments that do not change the weights
            (``dynamic_img_size``).

    Returns:
        The model and the arguments that build it.

    Raises:
        ValueError: without a model name, for a ``model_name`` other than the recorded one, or when
            the weights do not fit the architecture (the message lists missing, unexpected and
            mis-shaped keys).
    """
    if model_name and source.model_name and model_name != source.model_name:
        raise ValueError(f"model {model_name!r} disagrees with {source.model_name!r}, the model recorded in "
                         f"{source.source}; leave the model name out (the checkpoint names its model)")
    name = model_name or source.model_name
    if not name:
        raise ValueError(f"{source.source} does not record its model; pass the timm name with --model "
                         "(e.g. anchorformer_base_patch16_224) and its architecture overrides with --model-args")
    if name not in timm.list_models():
        raise ValueError(f"unknown model {name!r}; AnchorFormer models: {timm.list_models('anchorformer*')}")
    args = _infer_args(source.state_dict, {**source.model_args, **(model_args or {})}, name)
    model = timm.create_model(name, **args, **create_kwargs)
    model.load_state_dict(checkpoint_filter_fn(dict(source.state_dict), model), strict=True)
    return model.eval(), args


def _infer_args(state_dict: Dict[str, torch.Tensor], args: Dict[str, Any], name: str) -> Dict[str, Any]:
    args = dict(args)
    head = state_dict.get("head.weight")
    args.setdefault("num_classes", 0 if head is None else int(head.shape[0]))
    pos_embed, proj = state_dict.get("pos_embed"), state_dict.get("patch_embed.proj.weight")
    if "img_size" not in args and pos_embed is not None and proj is not None:
        prefix = 2 if "distilled" in name else 1
        side = math.isqrt(pos_embed.shape[1] - prefix)
        if side * side == pos_embed.shape[1] - prefix:
            args["img_size"] = side * int(proj.shape[-1])
    return args


def export_metadata(source: SourceCheckpoint, kind: str, name: str, args: Dict[str, Any], resolution: int,
                    layout: str) -> Dict[str, str]:
    """The provenance of an export as string fields (the safetensors header holds strings only)."""
    return {"format": kind, "model": name, "model_args": json.dumps(args, sort_keys=True),
            "resolution": str(resolution), "num_classes": str(args.get("num_classes", 0)),
            "source": source.source, "step": "unknown" if source.step is None else str(source.step),
            "weights": source.weights, "layout": layout}


def export_classification(source: SourceCheckpoint, output: str | Path, model_name: Optional[str] = None,
                          model_args: Optional[Dict[str, Any]] = None, verify: Optional[Verify] = None,
                          conversion: Optional[Dict[str, Any]] = None) -> Exported:
    """Write the whole classification model.

    Args:
        source: the weights.
        output: the ``.safetensors`` file to write.
        model_name: timm name, when the source does not record it.
        model_args: architecture overrides, when the source does not record them.
        verify: a check of the staged files (e.g. parity); nothing is written when it raises.
        conversion: how the weights were made from another architecture (plain data, e.g. the
            report of a ViT conversion), recorded as ``conversion`` in the header and the JSON.

    Returns:
        What was written.
    """
    model, args = build_source_model(source, model_name, model_args)
    name = model_name or source.model_name
    metadata = export_metadata(source, "classification", name, args, int(args.get("img_size", 224)), "anchorformer")
    if conversion is not None:
        metadata["conversion"] = json.dumps(conversion, sort_keys=True)
    return _write(model.state_dict(), Exported(Path(output), name, args, metadata), verify)


def export_backbone(source: SourceCheckpoint, output: str | Path, image_size: int, layout: Layout = "anchorformer",
                    model_name: Optional[str] = None, model_args: Optional[Dict[str, Any]] = None,
                    verify: Optional[Verify] = None) -> Exported:
    """Write the encoder without its head, ``pos_embed`` resampled to ``image_size``.

    Args:
        source: the weights.
        output: the ``.safetensors`` file to write.
        image_size: the fine-tuning resolution in pixels (1024 for COCO, 512 for ADE20K).
        layout: ``anchorformer`` (keys of our encoders) or ``mmdet`` (``backbone.`` prefix).
        model_name: timm name, when the source does not record it.
        model_args: architecture overrides, when the source does not record them.
        verify: a check of the staged files (e.g. parity); nothing is written when it raises.

    Returns:
        What was written; its ``model_args`` build the encoder (``num_classes=0``).
    """
    if layout not in ("anchorformer", "mmdet"):
        raise ValueError(f"layout must be 'anchorformer' or 'mmdet', got {layout!r}")
    model, args = build_source_model(source, model_name, model_args)
    name = model_name or source.model_name
    encoder_args = {**args, "num_classes": 0, "img_size": image_size}
    encoder = timm.create_model(name, **encoder_args)
    load_backbone_weights(encoder, model.state_dict())
    tensors = encoder.state_dict()
    if layout == "mmdet":
        tensors = {TOOLBOX_PREFIX + key: value for key, value in tensors.items()}
    metadata = export_metadata(source, "backbone", name, encoder_args, image_size, layout)
    return _write(tensors, Exported(Path(output), name, encoder_args, metadata), verify)


def config_path(weights: str | Path) -> Path:
    """The JSON config written next to an export (``x.safetensors`` -> ``x.json``)."""
    return Path(weights).with_suffix(".json")


def _write(tensors: Dict[str, torch.Tensor], export: Exported, verify: Optional[Verify]) -> Exported:
    """safetensors + JSON config, staged, verified, then moved into place."""
    path, metadata = export.path, export.metadata
    if path.suffix != ".safetensors":
        raise ValueError(f"the output must be a .safetensors file, got {path}")
    args = json.loads(metadata["model_args"])
    config = {"architecture": metadata["model"], "num_classes": args.get("num_classes", 0), "model_args": args,
              "pretrained_cfg": {"file": str(path.resolve()), "num_classes": args.get("num_classes", 0),
                                 "input_size": [3, int(metadata["resolution"]), int(metadata["resolution"])]},
              **{key: metadata[key] for key in ("format", "layout", "source", "step", "weights")}}
    if "conversion" in metadata:
        config["conversion"] = json.loads(metadata["conversion"])
    with staged_outputs([path, config_path(path)]) as (staged, staged_config):
        save_file({key: value.detach().contiguous().clone() for key, value in tensors.items()}, str(staged), metadata)
        staged_config.write_text(json.dumps(config, indent=2) + "\n")
        if verify is not None:
            verify(Exported(staged, export.model_name, export.model_args, metadata))
    logger.info("wrote %s (%d tensors) and %s", path, len(tensors), config_path(path))
    return export


def read_metadata(path: str | Path) -> Dict[str, str]:
    """The provenance stored in an export's safetensors header.

    Raises:
        ValueError: when the file is not a readable safetensors file.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from err


def create_model_from_export(path: str | Path, **overrides: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path, ...))``
    with the name and arguments recorded in a classification export.

    Args:
        path: a classification export.
        **overrides: ``timm.create_model`` arguments replacing the recorded ones.

    Returns:
        The model with the exported weights, in eval mode.

    Raises:
        ValueError: when ``path`` is not a classification export.
    """
    metadata = read_metadata(path)
    if metadata.get("format") != "classification":
        raise ValueError(f"{path} is a {metadata.get('format', 'foreign')!r} file, not a classification export; "
                         "build a detector/segmentor with it as model.pretrained_checkpoint instead")
    args = {**json.loads(metadata["model_args"]), **overrides}
    overlay = dict(file=str(path), num_classes=args.get("num_classes", 0))
    return timm.create_model(metadata["model"], pretrained=True, pretrained_cfg_overlay=overlay, **args).eval()
