"""Read the weights to convert: a DeepSpeed checkpoint of any ZeRO stage and world size (a run
folder, its ``checkpoints`` folder or one tag folder), a consolidated state dict (``.pt``/``.pth``)
or a safetensors file, choosing the model's weights or their EMA.

DeepSpeed stages 1-3 are consolidated with DeepSpeed's own ``zero_to_fp32``; stage 0 stores whole
weights in ``mp_rank_00_model_states.pt["module"]`` (in the training precision: bf16 weights of a
bf16 stage-0 run are converted from bf16). The EMA of our trainer is stored next to them
(``anchorformer.run_folder.EmaLayout``: each rank's file holds its chunk of every average, whatever
the ZeRO stage), and is re-assembled here.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Literal, Optional

import torch

from anchorformer.config.schema import ARCHITECTURE_ARGUMENTS
from anchorformer.run_folder import CheckpointFolder, CheckpointMeta, CheckpointMetaError, CheckpointTag, EmaLayout, RunFolder

__all__ = ["SourceCheckpoint", "load_source", "find_tag_dir"]

logger = logging.getLogger(__name__)

Weights = Literal["model", "ema"]
_STAGE0_FILE = "mp_rank_00_model_states.pt"
_ZERO_FILE = re.compile(r"(bf16_)?zero_pp_rank_\d+_mp_rank_\d+_optim_states\.pt")
_EMA_CONTAINERS = ("model_ema", "state_dict_ema", "ema")


@dataclass
class SourceCheckpoint:
    """Weights to convert and what is known about them.

    Attributes:
        state_dict: fp32 tensors, unwrapped (no ``module.`` prefix).
        weights: ``model`` or ``ema``.
        source: the path the weights came from.
        model_name: timm name of the architecture, when the source records it.
        model_args: ``timm.create_model`` keyword arguments recorded with the weights
            (``num_classes``, ``img_size``, architecture overrides).
        step: optimizer step of the checkpoint, when known.
        recipe: the run's resolved configuration as the trainer recorded it in the checkpoint (a
            plain dict, empty when the source records none): preprocessing and data for exports.
    """

    state_dict: Dict[str, torch.Tensor]
    weights: Weights
    source: str
    model_name: Optional[str] = None
    model_args: Dict[str, Any] = field(default_factory=dict)
    step: Optional[int] = None
    recipe: Dict[str, Any] = field(default_factory=dict)


def load_source(path: str | Path, weights: Weights = "model") -> SourceCheckpoint:
    """Read the weights at ``path``.

    Args:
        path: a run folder, a DeepSpeed checkpoints folder (with ``latest``), a tag folder, a
            ``.pt``/``.pth`` state dict or a ``.safetensors`` file.
        weights: ``model`` for the trained weights, ``ema`` for their exponential moving average.

    Returns:
        The weights and their recorded model name, arguments and step.

    Raises:
        ValueError: for a missing or unreadable path, or an EMA that the source does not hold.
    """
    if weights not in ("model", "ema"):
        raise ValueError(f"weights must be 'model' or 'ema', got {weights!r}")
    path = Path(path)
    if path.is_dir():
        return _load_deepspeed(find_tag_dir(path), weights)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist; give a run folder, a DeepSpeed checkpoint folder, "
                         "a .pt/.pth state dict or a .safetensors file")
    if path.suffix == ".safetensors":
        return _load_safetensors(path, weights)
    return _load_torch_file(path, weights)


def find_tag_dir(path: Path) -> Path:
    """The DeepSpeed tag folder named by ``path``: a run folder (``checkpoints/latest``), a
    checkpoints folder (``latest``) or a tag folder itself.

    Raises:
        ValueError: when ``path`` is none of these.
    """
    for checkpoints in (RunFolder(path).checkpoints, CheckpointFolder(path)):
        if checkpoints.has_latest():
            name = checkpoints.latest_pointer.read_text().strip()
            if not (checkpoints.path / name).is_dir():
                raise ValueError(f"{checkpoints.latest_pointer} names {name!r}, which does not exist in "
                                 f"{checkpoints.path}; pass one of its tag folders instead")
            return checkpoints.path / name
    if any(path.glob("*model_states.pt")):
        return path
    raise ValueError(f"{path} is not a DeepSpeed checkpoint: expected a run folder with checkpoints/latest, a "
                     "folder with a 'latest' file, or a tag folder holding *model_states.pt")


def _load_deepspeed(tag_dir: Path, weights: Weights) -> SourceCheckpoint:
    model_states = sorted(tag_dir.glob("*model_states.pt"))
    if not model_states:
        raise ValueError(f"{tag_dir} holds no *model_states.pt file; the checkpoint is incomplete")
    # Rank 0's model states hold the client state (config, step) in every ZeRO stage.
    client = _torch_load(model_states[0])
    meta = _read_meta(tag_dir)
    zero_stage = meta.zero_stage if meta is not None else None
    if zero_stage is None:  # a checkpoint not written by our trainer: the files tell
        zero_stage = 1 if any(_ZERO_FILE.fullmatch(p.name) for p in tag_dir.iterdir()) else 0
    if zero_stage > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        chatter = io.StringIO()  # zero_to_fp32 prints its progress
        try:
            with contextlib.redirect_stdout(chatter):
                state_dict = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        except (OSError, RuntimeError, ValueError, KeyError) as err:
            raise ValueError(f"DeepSpeed could not consolidate {tag_dir} ({err}); is every rank's file there?") from err
        logger.debug("zero_to_fp32: %s", chatter.getvalue())
    else:
        if not isinstance(client.get("module"), dict):
            raise ValueError(f"{model_states[0]} has no 'module' weights; not a DeepSpeed model-states file")
        state_dict = client["module"]
    state_dict = {key: value.float() for key, value in _strip_prefix(state_dict).items()}
    if weights == "ema":
        state_dict = _assemble_ema(tag_dir, state_dict)
    config = client.get("config") or {}
    model = config.get("model") or {}
    model_args = dict(model.get("kwargs") or {})
    for key in ("num_classes", "img_size", *ARCHITECTURE_ARGUMENTS):
        if model.get(key) is not None:
            model_args[key] = model[key]
    recorded_step = meta.step if meta is not None and meta.step >= 0 else None
    step = client.get("step", recorded_step)
    logger.info("read %s weights of %s (step %s, %d tensors)", weights, tag_dir, step, len(state_dict))
    return SourceCheckpoint(state_dict=state_dict, weights=weights, source=str(tag_dir),
                            model_name=model.get("name") or (meta.model if meta is not None else None),
                            model_args=model_args, step=None if step is None else int(step), recipe=dict(config))


def _assemble_ema(tag_dir: Path, model_state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The model's state dict with the EMA's values for every averaged weight."""
    saved = [_torch_load(p).get(EmaLayout.ENTRY) for p in CheckpointTag(tag_dir).rank_states()]
    if not saved or any(state is None for state in saved):
        raise ValueError(f"{tag_dir} holds no EMA (the run had train.ema.enabled=false); convert with "
                         "--weights model")
    out = dict(model_state)
    for key, flat in _flat_averages(tag_dir, saved).items():
        if key not in out:
            raise ValueError(f"the EMA of {tag_dir} has weight {key!r}, which the model does not; the checkpoint "
                             "is inconsistent")
        if flat.numel() < out[key].numel():
            raise ValueError(f"the EMA chunks of {key!r} in {tag_dir} hold {flat.numel()} values, the weight has "
                             f"{out[key].numel()}; is every rank's file there?")
        out[key] = flat[: out[key].numel()].view(out[key].shape).clone()
    return out


def _flat_averages(tag_dir: Path, saved: list[dict]) -> Dict[str, torch.Tensor]:
    """Every average flattened (possibly zero-padded at the end), from the ranks' saved EMA states."""
    try:
        return EmaLayout.whole(saved)
    except ValueError as err:
        raise ValueError(f"the EMA in {tag_dir}'s trainer rank files: {err}; convert with --weights model") from None


def _load_safetensors(path: Path, weights: Weights) -> SourceCheckpoint:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            state_dict = {key: handle.get_tensor(key).float() for key in handle.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err}); is it truncated?") from err
    recorded = metadata.get("weights", "model")
    if weights == "ema" and recorded != "ema":
        raise ValueError(f"{path} holds {recorded} weights, not an EMA; convert with --weights model")
    step = metadata.get("step")
    return SourceCheckpoint(state_dict=_strip_prefix(state_dict), weights=weights,
                            source=metadata.get("source", str(path)),
                            model_name=metadata.get("model"), model_args=json.loads(metadata.get("model_args", "{}")),
                            step=int(step) if step and step != "unknown" else None)


def _load_torch_file(path: Path, weights: Weights) -> SourceCheckpoint:
    data = _torch_load(path, trusted=False)
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a state dict")
    if weights == "ema":
        container = next((data[k] for k in _EMA_CONTAINERS if isinstance(data.get(k), dict)), None)
        if container is None:
            raise ValueError(f"{path} has no EMA weights (none of the keys {list(_EMA_CONTAINERS)}); convert "
                             "with --weights model")
        data = container
    else:
        for key in ("model", "state_dict", "module"):
            if isinstance(data.get(key), dict):
                data = data[key]
                break
    tensors = {k: v.float() for k, v in _strip_prefix(data).items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{path} contains no tensors")
    return SourceCheckpoint(state_dict=tensors, weights=weights, source=str(path))


def _torch_load(path: Path, trusted: bool = True) -> Dict[str, Any]:
    """``trusted``: DeepSpeed and trainer files hold Python objects next to tensors (config, RNG
    states); they are the user's own run files, unpickled the way DeepSpeed itself reads them. A
    loose state dict file is read tensors-only."""
    try:
        return torch.load(path, map_location="cpu", weights_only=not trusted)
    except Exception as err:  # torch.load raises pickle, zip and runtime errors alike
        raise ValueError(f"cannot read {path} ({type(err).__name__}: {err}); is the file complete?") from err


def _strip_prefix(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    for prefix in ("module.", "_orig_mod."):
        if state_dict and all(key.startswith(prefix) for key in state_dict):
            state_dict = {key[len(prefix):]: value for key, value in state_dict.items()}
    return state_dict


def _read_meta(tag_dir: Path) -> Optional[CheckpointMeta]:
    """The trainer's metadata of ``tag_dir``; None for a DeepSpeed checkpoint written without it."""
    tag = CheckpointTag(tag_dir)
    if not tag.is_complete():
        return None
    try:
        return CheckpointMeta.read(tag)
    except CheckpointMetaError as err:
        raise ValueError(str(err)) from err
