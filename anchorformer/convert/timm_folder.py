"""The export layout timm loads natively: ``FOLDER/config.json`` (architecture, ``num_classes``,
label names, model arguments and the pretrained cfg with the recipe's preprocessing) and
``FOLDER/model.safetensors``, written with timm's own ``save_for_hf``.

    model = timm.create_model("local-dir:FOLDER", pretrained=True)        # the trained head included
    config = timm.data.resolve_data_config(model=model)                    # the recipe's eval preprocessing
    transform = timm.data.create_transform(**config)
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional

import timm
from timm.models import save_for_hf
from torch import nn

import anchorformer.models  # noqa: F401  (registers the AnchorFormer models with timm)
from anchorformer.convert.export import Exported, Verify, build_source_model, export_metadata
from anchorformer.convert.recipe import recipe_label_names, recipe_of
from anchorformer.convert.source import SourceCheckpoint
from anchorformer.convert.staging import staged_outputs
from anchorformer.data.transforms import eval_pretrained_cfg

__all__ = ["TIMM_FILES", "export_timm_folder", "load_timm_folder", "is_timm_folder", "read_provenance"]

logger = logging.getLogger(__name__)

TIMM_FILES = ("model.safetensors", "config.json")
"""The files of an export folder, as timm's ``local-dir:`` loader reads them."""
_PROVENANCE_KEY = "anchorformer"
"""config.json's key for where the weights came from (timm's loader ignores it)."""


def is_timm_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder in timm's layout (it holds ``config.json``)."""
    return (Path(path) / "config.json").is_file()


def load_timm_folder(folder: str | Path, **overrides: Any) -> nn.Module:
    """``timm.create_model(f"local-dir:{folder}", pretrained=True, **overrides)`` in eval mode: how
    users load the export (``img_size=`` resamples ``pos_embed`` for another resolution)."""
    return timm.create_model(f"local-dir:{Path(folder).resolve()}", pretrained=True, **overrides).eval()


def read_provenance(folder: str | Path) -> Dict[str, Any]:
    """The source, step and weights an export folder was converted from (empty for other folders)."""
    try:
        return dict(json.loads((Path(folder) / "config.json").read_text()).get(_PROVENANCE_KEY) or {})
    except (OSError, json.JSONDecodeError, AttributeError):
        return {}


def export_timm_folder(source: SourceCheckpoint, folder: str | Path, model_name: Optional[str] = None,
                       model_args: Optional[Dict[str, Any]] = None, verify: Optional[Verify] = None,
                       conversion: Optional[Dict[str, Any]] = None) -> Exported:
    """Write the classification model into ``folder`` in timm's layout, with the evaluation
    preprocessing (``data.image_size``, ``data.augment.crop_pct/interpolation/mean/std``) and the
    class names of the recipe recorded with the weights (the model's default cfg and no names for
    sources that record no recipe).

    Args:
        source: the weights.
        folder: the export folder (created; its two files are replaced when they exist).
        model_name: timm name, when the source does not record it.
        model_args: architecture overrides, when the source does not record them.
        verify: a check of the staged folder (``Exported.path``); nothing is written when it raises.
        conversion: how the weights were made from another architecture (plain data, e.g. the
            report of a ViT conversion), recorded in config.json beside the provenance.

    Returns:
        What was written (``path`` is the folder).

    Raises:
        ValueError: when the label names do not match the head's classes, or ``verify`` refuses.
    """
    model, args = build_source_model(source, model_name, model_args)
    name = model_name or source.model_name
    recipe = recipe_of(source)
    preprocessing = eval_pretrained_cfg(recipe.data.augment, recipe.data.image_size) if recipe is not None else None
    label_names = recipe_label_names(recipe) if recipe is not None else None
    if recipe is None:
        logger.warning("%s records no recipe: the export carries %s's default preprocessing and no class names",
                       source.source, name)
    if label_names is not None and len(label_names) != model.num_classes:
        raise ValueError(f"{len(label_names)} label names for a head of {model.num_classes} classes; the class "
                         f"map beside the shards does not belong to this model")
    metadata = export_metadata(source, "timm", name, args, int(args.get("img_size", 224)), "timm")
    provenance: Dict[str, Any] = {key: metadata[key] for key in ("source", "step", "weights")}
    if conversion is not None:
        provenance["conversion"] = conversion
    model_config: Dict[str, Any] = {_PROVENANCE_KEY: provenance}
    if label_names is not None:
        model_config["label_names"] = list(label_names)
    folder = Path(folder)
    with staged_outputs([folder / file for file in TIMM_FILES], root=folder.resolve().parent) as staged:
        save_for_hf(model, str(staged[0].parent), model_config=model_config, model_args=json.loads(json.dumps(args)),
                    safe_serialization=True, data_config=preprocessing)
        if verify is not None:
            verify(Exported(staged[0].parent, name, args, metadata))
    logger.info("wrote %s (timm folder: %s)", folder, ", ".join(TIMM_FILES))
    return Exported(folder, name, args, metadata)
