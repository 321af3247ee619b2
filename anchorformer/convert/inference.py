"""A trained classifier ready for inference, from whatever a user points at: a run folder or any
checkpoint ``load_source`` reads (any ZeRO stage and world size, model or EMA weights), an export
folder in timm's layout, or a timm model name. It comes with its evaluation preprocessing (the
recipe's, or the export's pretrained cfg) and its class names, optionally at another test
resolution (``pos_embed`` resampled) and crop."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import timm
from timm.data import resolve_data_config
from torch import nn

import anchorformer.models  # noqa: F401  (registers the AnchorFormer models with timm)
from anchorformer.config import AugmentConfig, RootConfig
from anchorformer.convert.export import build_source_model
from anchorformer.convert.recipe import recipe_label_names, recipe_of
from anchorformer.convert.source import SourceCheckpoint, Weights, load_source
from anchorformer.convert.timm_folder import is_timm_folder, load_timm_folder, read_provenance
from anchorformer.data.transforms import eval_preprocessing
from anchorformer.run_folder import RunFolder

__all__ = ["InferenceModel", "load_for_inference", "add_model_arguments"]


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that name what :func:`load_for_inference` loads, for every command that takes a
    trained model (launch/eval.py, launch/predict.py, tools/export.py, tools/anchor_report.py):
    ``model`` (positional), ``--checkpoint`` and ``--weights``."""
    parser.add_argument("model", help="run folder, checkpoint, export folder or timm model name")
    parser.add_argument("--checkpoint", default=None,
                        help="run folder: a checkpoint tag (step_N) or path instead of the latest; "
                             "timm name: the weights file to load")
    parser.add_argument("--weights", choices=("model", "ema"), default="model",
                        help="the trained weights or their exponential moving average (train.ema.enabled)")


@dataclass
class InferenceModel:
    """A classifier in eval mode (CPU, fp32) and what using it needs."""

    model: nn.Module
    name: str
    """timm architecture name."""
    num_classes: int
    image_size: int
    """Side of the square center crop the model evaluates, pixels (the requested test size)."""
    preprocessing: AugmentConfig
    """Center-crop fraction, interpolation and normalisation the model expects (the evaluation
    fields of ``data.augment``; ``data.transforms.build_eval_transform`` takes it with ``image_size``)."""
    label_names: Optional[list[str]]
    """Class names by label, when known."""
    recipe: Optional[RootConfig]
    """The training run's configuration, for checkpoints that record it."""
    origin: Dict[str, Any]
    """Where the weights came from: ``model`` (what was given), ``source``, ``step``, ``weights``."""


def load_for_inference(spec: str, checkpoint: Optional[str] = None, weights: Weights = "model",
                       image_size: Optional[int] = None, crop_pct: Optional[float] = None) -> InferenceModel:
    """Load the classifier ``spec`` names.

    Args:
        spec: a run folder or checkpoint (DeepSpeed checkpoints folder or tag folder, ``.pt``,
            ``.pth``, ``.safetensors``); an export folder holding ``config.json`` (timm's layout); or
            a timm model name (``local-dir:``/``hf-hub:`` prefixes included).
        checkpoint: with a run folder, the checkpoint to use instead of the latest (a tag such as
            ``step_1200`` or a path); with a timm name, the weights to load into it (else timm's
            pretrained weights).
        weights: ``model`` or ``ema`` (checkpoints of runs with ``train.ema.enabled``).
        image_size: test resolution in pixels; ``pos_embed`` is resampled to it (default: the
            model's own).
        crop_pct: center-crop fraction replacing the preprocessing's.

    Returns:
        The model and its preprocessing, class names and origin.

    Raises:
        ValueError: for anything that cannot be loaded, naming it and what to pass instead.
    """
    size = {"img_size": image_size} if image_size else {}
    path = Path(spec)
    if spec.startswith("local-dir:") or (path.is_dir() and is_timm_folder(path)):
        folder = Path(spec.removeprefix("local-dir:"))
        if checkpoint is not None or weights != "model":
            raise ValueError(f"{folder} is an export (one set of weights); --checkpoint and --weights ema apply to "
                             "run folders and checkpoints")
        model = _timm_call(lambda: load_timm_folder(folder, **size), folder)
        origin = {"model": str(folder), "source": str(folder), **read_provenance(folder)}
        return _described(model, model.pretrained_cfg.get("label_names"), None, origin, image_size, crop_pct)
    if path.exists():
        if checkpoint is not None and not path.is_dir():
            raise ValueError(f"{spec} is a checkpoint file; --checkpoint applies to run folders and timm model names")
        source = load_source(_checkpoint_in(path, checkpoint), weights)
        return _from_source(source, None, spec, image_size, crop_pct)
    if not timm.is_model(spec) and not spec.startswith("hf-hub:"):
        raise ValueError(f"{spec!r} is neither a run folder, a checkpoint, an export folder nor a timm model name; "
                         f"e.g. runs/demo, or {timm.list_models('anchorformer*')[0]}")
    if checkpoint is not None:
        return _from_source(load_source(checkpoint, weights), spec, spec, image_size, crop_pct)
    model = _timm_call(lambda: timm.create_model(spec, pretrained=True, **size).eval(), spec)
    return _described(model, model.pretrained_cfg.get("label_names"), None,
                      {"model": spec, "source": "timm pretrained weights"}, image_size, crop_pct)


def _checkpoint_in(run: Path, checkpoint: Optional[str]) -> Path:
    """``checkpoint`` as a path: a tag of the run's checkpoints folder, or a path of its own."""
    if checkpoint is None:
        return run
    tag = RunFolder(run).checkpoints.path / checkpoint
    return tag if tag.is_dir() else Path(checkpoint)


def _timm_call(create: Callable[[], nn.Module], what: object) -> nn.Module:
    """timm's loaders raise RuntimeError / OSError for missing or unreachable weights: as ValueError."""
    try:
        return create()
    except (RuntimeError, OSError) as err:
        raise ValueError(f"cannot load {what} with timm ({type(err).__name__}: {err}); pass a local export folder, "
                         "or the weights with --checkpoint FILE") from err


def _from_source(source: SourceCheckpoint, model_name: Optional[str], spec: str, image_size: Optional[int],
                 crop_pct: Optional[float]) -> InferenceModel:
    model, _ = build_source_model(source, model_name, {"img_size": image_size} if image_size else None)
    recipe = recipe_of(source)
    origin = {"model": spec, "source": source.source, "step": source.step, "weights": source.weights}
    label_names = recipe_label_names(recipe) if recipe is not None else None
    return _described(model, label_names, recipe, origin, image_size, crop_pct)


def _described(model: nn.Module, label_names: Optional[list[str]], recipe: Optional[RootConfig],
               origin: Dict[str, Any], image_size: Optional[int], crop_pct: Optional[float]) -> InferenceModel:
    """The model with its preprocessing: the recipe's, else its pretrained cfg's, at the model's
    input size unless ``image_size`` asks for another, with ``crop_pct`` when given."""
    if recipe is not None:
        preprocessing, cfg_size = recipe.data.augment, recipe.data.image_size
    else:
        preprocessing, cfg_size = eval_preprocessing(resolve_data_config(model=model))
    own_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    size = image_size or (int(own_size[0]) if own_size else cfg_size)
    if crop_pct is not None:
        preprocessing = dataclasses.replace(preprocessing, crop_pct=crop_pct)
    return InferenceModel(model=model, name=model.pretrained_cfg.get("architecture", type(model).__name__),
                          num_classes=model.num_classes, image_size=size, preprocessing=preprocessing,
                          label_names=list(label_names) if label_names else None, recipe=recipe, origin=origin)
