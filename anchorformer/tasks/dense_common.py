"""What the dense tasks (detection, segmentation) share on the task side: their config section,
the encoder's ``timm.create_model`` overrides, and whole weights for inference under ZeRO-3.
The network itself (backbone, feature pyramid, weight loading) is model code:
``anchorformer.models.backbone``.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator

from torch import nn

__all__ = ["full_parameters", "encoder_kwargs", "task_options"]


@contextlib.contextmanager
def full_parameters(model: nn.Module) -> Iterator[None]:
    """Hold every weight of ``model`` whole on this rank for the duration (inference).

    Under ZeRO-3 each forward otherwise gathers weights collectively, so all ranks would have to
    run the same number of forwards; evaluation runs a data-dependent number (uneven splits,
    sliding windows). Outside ZeRO-3 this does nothing.
    """
    partitioned = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed  # only reached under ZeRO-3, where DeepSpeed is loaded already

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def encoder_kwargs(model_cfg: Any) -> Dict[str, Any]:
    """``timm.create_model`` overrides of the encoder from the ``model`` config section: its
    ``kwargs`` plus the stochastic depth rate."""
    return {**model_cfg.kwargs, "drop_path_rate": model_cfg.drop_path_rate}


def task_options(cfg: Any, task: str) -> Any:
    """The config section named after a dense task (``cfg.detection``, ``cfg.segmentation``).

    Raises:
        ValueError: when this installation's config schema has no such section.
    """
    section = getattr(cfg, task, None)
    if section is None:
        raise ValueError(f"task={task} needs the '{task}:' config section (dataset paths, sizes), which this "
                         f"installation's config schema lacks; see docs/downstream.md")
    return section
