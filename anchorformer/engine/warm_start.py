"""A pre-trained ViT/DeiT as the start of an AnchorFormer run, in one step: ``model.pretrained_checkpoint``
may name a timm ViT/DeiT (a timm folder, a ``.safetensors``/``.pth`` file, or a run of this
framework). The run converts it once (``convert.vit_source.convert_vit``: every tensor carried over,
qk merged from q and k, the anchors clustered from the run's own training images and fitted to the
ViT's attention; docs/training.md) into an AnchorFormer export inside the run folder, and trains
from that export as from any pre-trained file. The main rank converts; a resumed or requeued run
finds the export there and converts nothing.

A source of another width, depth, patch size or heads is refused by the pre-flight, naming the
mismatch; an AnchorFormer file is loaded as before (``tasks.classification.load_pretrained``).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Optional

from torch import nn

from anchorformer import dist
from anchorformer.config import ConfigError, RootConfig
from anchorformer.convert import export_classification, load_source
from anchorformer.convert.vit_source import AnchorData, ViTSource, convert_vit, load_vit_source
from anchorformer.models import AnchorAttention
from anchorformer.models.from_vit import check_same_shape, is_vit_state_dict, vit_architecture
from anchorformer.run_folder import RunFolder
from anchorformer.tasks.classification import recipe_shards

__all__ = ["vit_source_of", "check_vit_source", "start_from_vit"]

logger = logging.getLogger(__name__)

_KEY = "model.pretrained_checkpoint"


def vit_source_of(cfg: RootConfig) -> Optional[ViTSource]:
    """The ViT/DeiT that ``model.pretrained_checkpoint`` names for an AnchorFormer classifier; None
    when it names none (or an AnchorFormer's weights, which load as they are)."""
    path = cfg.model.pretrained_checkpoint
    if cfg.task != "classification" or not path or not cfg.model.name.startswith("anchorformer_"):
        return None
    try:
        if Path(path).is_file() and not is_vit_state_dict(load_source(path).state_dict):
            return None
        return load_vit_source(path)
    except ValueError as err:
        raise ConfigError(_KEY, " ".join(str(err).split())) from None


def check_vit_source(source: ViTSource, network: nn.Module) -> None:
    """Refuse a ViT of another width, depth, patch size or heads than the run's network (the
    pre-flight's meta-device model), naming the mismatch.

    Raises:
        ConfigError: naming model.pretrained_checkpoint.
    """
    if not any(isinstance(module, AnchorAttention) for module in network.modules()):
        return
    try:
        check_same_shape(vit_architecture(source.checkpoint.state_dict), network, source.num_heads)
    except ValueError as err:
        raise ConfigError(_KEY, " ".join(str(err).split()) + "; or set model.* to the source's shape") from None


def start_from_vit(cfg: RootConfig, folder: RunFolder, is_main: bool) -> RootConfig:
    """The config the run trains with: ``model.pretrained_checkpoint`` replaced by the run's
    AnchorFormer export of the ViT/DeiT it names (converted now by the main rank unless the run
    folder has it already; a collective); ``cfg`` itself when it names no ViT/DeiT.

    Raises:
        ConfigError: for a source that cannot be converted (naming it).
    """
    export = folder.warm_start
    refusal: Optional[str] = None
    if is_main and not export.is_file():
        try:
            source = vit_source_of(cfg)
            if source is not None:
                _convert(cfg, source, export)
        except ConfigError as err:
            refusal = err.detail
        except ValueError as err:
            refusal = " ".join(str(err).split())
    refusal = dist.broadcast_object(refusal)
    if refusal is not None:
        raise ConfigError(_KEY, refusal)
    if not export.is_file():
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained_checkpoint=str(export)))


def _convert(cfg: RootConfig, source: ViTSource, export: Path) -> None:
    """Convert the ViT/DeiT into ``export``: its anchors from the first ``model.init_images`` training
    images, fitted for ``model.init_fit_steps`` steps per layer."""
    m = cfg.model
    (shards, index), _ = recipe_shards(cfg)
    target_args = {name: value for name, value in m.timm_kwargs().items() if name in ("num_anchors", "block_init")}
    logger.info("converting the ViT/DeiT %s into %s (anchors from %d training images, %d fit steps per layer): "
                "once per run", m.pretrained_checkpoint, m.name, m.init_images, m.init_fit_steps)
    converted, report = convert_vit(source, AnchorData(shards, index, m.init_images), m.name, target_args,
                                    fit_steps=m.init_fit_steps)
    export.parent.mkdir(parents=True, exist_ok=True)
    written = export_classification(converted, export, conversion=report)
    logger.info("wrote %s (qk rule %s, converted in %.1f s); training starts from it", written.path,
                report["qk_rule"], report["convert_seconds"])
