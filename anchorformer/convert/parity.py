"""Parity of a conversion: the exported weights, loaded the way users load them, against the source
model on a fixed input (max absolute difference of the outputs)."""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional

import torch

from anchorformer.convert.export import Exported, build_source_model, create_model_from_export
from anchorformer.convert.source import SourceCheckpoint
from anchorformer.convert.timm_folder import load_timm_folder
from anchorformer.models.backbone import AnchorFormerBackbone

__all__ = ["fixed_input", "classification_parity", "backbone_parity"]

logger = logging.getLogger(__name__)


def fixed_input(image_size: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A reproducible normalised-image-like input of shape (batch, 3, image_size, image_size)."""
    return torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def classification_parity(source: SourceCheckpoint, exported: Exported, model_name: Optional[str] = None,
                          model_args: Optional[Dict[str, Any]] = None) -> float:
    """Max |logits difference| between the source model and ``timm.create_model`` on the export
    (a ``local-dir:`` folder for the timm layout, the weights file otherwise).

    Args:
        source: the weights that were converted.
        exported: the classification export (a ``.safetensors`` file or a timm folder).
        model_name: as given to the export, when the source does not record it.
        model_args: as given to the export.

    Returns:
        The maximum absolute difference over a fixed batch of two images.
    """
    reference, args = build_source_model(source, model_name, model_args)
    timm_layout = exported.metadata.get("format") == "timm"
    converted = load_timm_folder(exported.path) if timm_layout else create_model_from_export(exported.path)
    x = fixed_input(int(args.get("img_size", 224)))
    return float((reference(x) - converted(x)).abs().max())


@torch.no_grad()
def backbone_parity(source: SourceCheckpoint, exported: Exported, model_name: Optional[str] = None,
                    model_args: Optional[Dict[str, Any]] = None) -> float:
    """Max |feature difference| of the last block's map at the export's resolution between the
    source model (pos_embed resampled on the fly) and the detection/segmentation encoder built
    from the export.

    Args:
        source: the weights that were converted.
        exported: the backbone export.
        model_name: as given to the export, when the source does not record it.
        model_args: as given to the export.

    Returns:
        The maximum absolute difference over one fixed image at the export's resolution.
    """
    reference, _ = build_source_model(source, model_name, model_args, dynamic_img_size=True)
    image_size = int(exported.model_args["img_size"])
    architecture = {k: v for k, v in exported.model_args.items() if k not in ("num_classes", "img_size")}
    backbone = AnchorFormerBackbone(exported.model_name, image_size, weights=str(exported.path),
                                    model_kwargs=architecture).eval()
    x = fixed_input(image_size, batch=1)
    expected = reference.forward_intermediates(x, indices=1, intermediates_only=True)[0]
    actual = backbone.encoder.forward_intermediates(x, indices=1, intermediates_only=True)[0]
    return float((expected - actual).abs().max())
