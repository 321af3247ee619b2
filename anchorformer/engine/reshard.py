"""A checkpoint's model and optimizer on another number of ranks or ZeRO stage, through DeepSpeed's
universal checkpoint: one folder per parameter, ``zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt``
holding whole tensors, from which an engine of any size takes its own partitions.

- Stages 1-3: DeepSpeed's ``ds_to_universal`` merges the ZeRO shards; an engine of stage 1-3 loads
  the folder with ``checkpoint.load_universal`` (set for that one load).
- Stage 0 has no ZeRO shards, and DeepSpeed loads no universal folder into a stage-0 engine. A
  stage-0 checkpoint (whole weights, torch optimizer state; with bf16/fp16 DeepSpeed's fp32 master
  copies) is written in the same per-parameter form here, and a stage-0 engine takes its weights,
  master copies and AdamW moments from the folder here.
- The folder is completed so that every stage reads it: both model-states file names (stage 3
  looks for ``zero_pp_rank_0_...``, stages 0-2 for ``mp_rank_00_...``), moments and a step for
  every parameter, and the optimizer's global state in the form of every stage. After loading,
  the parameter groups get this run's settings back and every parameter group its own step
  counter (DeepSpeed's stage-3 loader gives every group the first group's weight decay and lr
  scale, and all of them one shared step tensor).

The folder is made once, by the main rank, beside the checkpoint (``step_N/universal``, written
under a temporary name and renamed), and reused by later resumes.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn

from anchorformer.run_folder import CheckpointTag

__all__ = ["optimizer_param_names", "universal_checkpoint", "load_universal"]

logger = logging.getLogger(__name__)

_MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
_MOMENTS = ("exp_avg", "exp_avg_sq")


def optimizer_param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of every parameter in ``optimizer``'s order (its state's index), read before
    DeepSpeed wraps the optimizer (stage 0 keeps the torch state keyed by that index)."""
    names = {id(param): name for name, param in model.named_parameters()}
    return [names[id(param)] for group in optimizer.param_groups for param in group["params"]]


def universal_checkpoint(tag: CheckpointTag, zero_stage: int,
                         optimizer_params: list[str]) -> tuple[Path, Optional[float]]:
    """The universal form of checkpoint ``tag``, made now unless an earlier resume made it.

    Args:
        tag: a DeepSpeed tag folder written at ZeRO stage ``zero_stage``.
        zero_stage: the stage it was written at.
        optimizer_params: parameter names in the optimizer's order (for a stage-0 checkpoint).

    Returns:
        The folder, and the seconds the conversion took (None when it was there already).
    """
    tag_dir, folder = tag.path, tag.universal
    if folder.is_dir():
        logger.info("universal checkpoint %s made before; reused", folder)
        return folder, None
    started = time.perf_counter()
    partial = tag_dir / f".{folder.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        if zero_stage == 0:
            step = _write_stage0(tag_dir, partial, optimizer_params)
        else:
            step = _write_from_zero_shards(tag_dir, partial)
        _complete(partial, step, _param_shapes(partial))
        os.replace(partial, folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
        (tag_dir / "latest_universal").unlink(missing_ok=True)  # ds_to_universal's pointer, not used
    seconds = time.perf_counter() - started
    logger.info("converted %s (ZeRO stage %d) to DeepSpeed's universal form in %.1f s: %s", tag_dir, zero_stage,
                seconds, folder)
    return folder, seconds


def load_universal(engine: Any, optimizer: torch.optim.Optimizer, folder: Path, optimizer_params: list[str]) -> None:
    """Load model weights and optimizer state from universal ``folder`` into ``engine`` (any stage).

    Args:
        engine: the DeepSpeed engine of this run.
        optimizer: the torch optimizer the engine wraps.
        folder: made by :func:`universal_checkpoint`.
        optimizer_params: parameter names in the optimizer's order.
    """
    settings = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    if engine.zero_optimization_stage() == 0:
        _load_stage0(engine, folder, optimizer_params)
    else:
        with _universal_loading(engine):
            load_path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_optimizer_states=True,
                                                  load_lr_scheduler_states=False, load_module_strict=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no model states in {folder}")
    for group, own in zip(optimizer.param_groups, settings):
        group.update(own)
    for state in optimizer.state.values():
        # DeepSpeed's stage-3 loader gives every sub-group one shared step tensor, which the fused
        # AdamW would then advance once per sub-group and step
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def _write_from_zero_shards(tag_dir: Path, out: Path) -> Any:
    """DeepSpeed's ds_to_universal on a stage 1-3 checkpoint; returns the optimizer's step."""
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=str(tag_dir), output_folder=str(out), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    chatter = io.StringIO()  # it prints its progress and draws tqdm bars
    with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        ds_to_universal.main(args)
    logger.debug("ds_to_universal: %s", chatter.getvalue())
    steps = [_load(path) for path in (out / "zero").glob("*/step.pt")]
    if steps:
        return steps[0]
    return _load(out / "zero" / "optimizer_state.pt")["optimizer_state_dict"]["state"][0]["step"]  # stage 3


def _write_stage0(tag_dir: Path, out: Path, optimizer_params: list[str]) -> Any:
    """The universal form of a stage-0 checkpoint; returns the optimizer's step."""
    source = tag_dir / _MODEL_STATES[0]
    states = _load(source)
    saved = states["optimizer"]
    # bf16/fp16: DeepSpeed's FP16 optimizer holds fp32 master weights beside the torch state
    torch_state = saved.get("optimizer_state_dict", saved)
    masters = [weight for group in saved.get("fp32_groups", []) for weight in group]
    if len(torch_state["state"]) > len(optimizer_params):
        raise ValueError(f"{source} has optimizer state for {len(torch_state['state'])} parameters but the "
                         f"checkpoint names {len(optimizer_params)}")
    step = None
    for index, name in enumerate(optimizer_params):
        weight = masters[index] if masters else states["module"][name]
        folder = out / "zero" / name
        folder.mkdir(parents=True)
        torch.save({"param": weight.detach().float(), "cat_dim": 0}, folder / "fp32.pt")
        param_state = torch_state["state"].get(index, {})
        for key in _MOMENTS:
            if key in param_state:
                torch.save({"param": param_state[key].float(), "cat_dim": 0}, folder / f"{key}.pt")
        step = param_state.get("step", step)
    torch.save({"param_groups": torch_state["param_groups"]}, out / "zero" / "optimizer_state.pt")
    shutil.copy2(source, out / _MODEL_STATES[0])
    return 0 if step is None else step


def _param_shapes(out: Path) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape, from the model-states file."""
    states = _load(next(out / name for name in _MODEL_STATES if (out / name).is_file()))
    if states.get("param_shapes"):
        return {name: tuple(shape) for group in states["param_shapes"] for name, shape in group.items()}
    return {name: tuple(tensor.shape) for name, tensor in states["module"].items()}


def _complete(out: Path, step: Any, shapes: dict[str, tuple[int, ...]]) -> None:
    """Make ``out`` readable by an engine of every stage (see the module docstring)."""
    zero = out / "zero"
    for folder in (path for path in zero.iterdir() if path.is_dir()):
        shape = shapes[folder.name]
        weight = _whole(folder / "fp32.pt", shape)
        for key in ("fp32", *_MOMENTS):
            # stage 3 leaves flat bare tensors, stages 1-2 read shaped ones in a dict; a parameter
            # that never had a gradient has no moments: zeros
            state = _whole(folder / f"{key}.pt", shape) if (folder / f"{key}.pt").is_file() else torch.zeros_like(weight)
            torch.save({"param": state, "cat_dim": 0}, folder / f"{key}.pt")
        if not (folder / "step.pt").is_file():
            torch.save(step, folder / "step.pt")
    import deepspeed

    groups = _load(zero / "optimizer_state.pt")["param_groups"]
    # stages 1-2 read the version and every group's settings, stage 3 the step and the first group
    torch.save({"ds_version": deepspeed.__version__, "param_groups": groups,
                "optimizer_state_dict": {"state": {0: {"step": step}}, "param_groups": groups}},
               zero / "optimizer_state.pt")
    present = [out / name for name in _MODEL_STATES if (out / name).is_file()]
    for name in _MODEL_STATES:
        if not (out / name).is_file():
            os.link(present[0], out / name)


def _whole(path: Path, shape: tuple[int, ...]) -> torch.Tensor:
    """The tensor a universal state file holds, in the parameter's shape."""
    saved = _load(path)
    tensor = saved["param"] if isinstance(saved, dict) else saved
    return tensor.reshape(-1)[: math.prod(shape)].reshape(shape).float()


@contextmanager
def _universal_loading(engine: Any) -> Iterator[None]:
    """DeepSpeed reads ``checkpoint.load_universal`` only inside ``load_checkpoint``: set it for one load."""
    config = engine._config
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        yield
    finally:
        config.load_universal_checkpoint = before


@torch.no_grad()
def _load_stage0(engine: Any, folder: Path, optimizer_params: list[str]) -> None:
    """Weights, fp32 master copies (bf16/fp16) and AdamW state of a stage-0 engine from ``folder``."""
    wrapper = engine.optimizer
    torch_optimizer = getattr(wrapper, "optimizer", wrapper)  # DeepSpeed's FP16 optimizer wraps the torch one
    masters = [weight for group in getattr(wrapper, "fp32_groups", []) for weight in group]
    params = dict(engine.module.named_parameters())
    state = {}
    for index, name in enumerate(optimizer_params):
        zero = folder / "zero" / name
        weight = _load(zero / "fp32.pt")["param"]
        params[name].copy_(weight.to(params[name].dtype))
        if masters:
            masters[index].copy_(weight)
        state[index] = {"step": _load(zero / "step.pt"), **{key: _load(zero / f"{key}.pt")["param"] for key in _MOMENTS}}
    current = torch_optimizer.state_dict()
    torch_optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})
    counters = _load(folder / _MODEL_STATES[0])
    engine.global_steps = counters["global_steps"]
    engine.global_samples = counters.get("global_samples", engine.global_steps * engine.train_batch_size())
    engine.skipped_steps = counters["skipped_steps"]


def _load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=False)
