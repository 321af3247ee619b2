"""ZeRO-3 parameters: whether DeepSpeed partitions a weight, where this rank's values of it live,
and the two ways to gather or release the whole weight. Under ZeRO stages 0-2 (or without
DeepSpeed) every weight is whole on every rank and these are no-ops or plain reads."""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import nn

__all__ = ["is_partitioned", "local_values", "release_gathered", "whole_parameters"]


def is_partitioned(param: nn.Parameter) -> bool:
    """Whether ZeRO-3 manages ``param`` (this rank owns one partition of it, ``param.ds_tensor``)."""
    return hasattr(param, "ds_tensor")


def local_values(param: nn.Parameter) -> torch.Tensor:
    """The tensor holding this rank's authoritative values of ``param``: its ZeRO-3 partition, or
    the whole weight under stages 0-2."""
    return param.ds_tensor.data if is_partitioned(param) else param.data


def release_gathered(params: Iterable[nn.Parameter]) -> None:
    """Free the whole copies of ZeRO-3 weights that are gathered right now (persistent ones, and
    any kept after an evaluation forward); the next forward gathers them anew from the
    partitions."""
    gathered = [p for p in params if is_partitioned(p) and p.ds_status.name == "AVAILABLE"]
    if gathered:
        gathered[0].partition(param_list=gathered)


@contextlib.contextmanager
def whole_parameters(model: nn.Module) -> Iterator[None]:
    """Hold every weight of ``model`` whole on this rank for the duration (inference).

    Under ZeRO-3 each forward otherwise gathers weights collectively, so all ranks would have to
    run the same number of forwards; evaluation runs a data-dependent number (uneven splits,
    sliding windows). Outside ZeRO-3 this does nothing.
    """
    partitioned = [p for p in model.parameters() if is_partitioned(p)]
    if not partitioned:
        yield
        return
    import deepspeed  # only reached under ZeRO-3, where DeepSpeed is loaded already

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield
