"""Exponential moving average of the weights that works under every ZeRO stage.

Under ZeRO-3 each rank averages only its own partition of every weight (``param.ds_tensor``):
no communication, 1/world of the memory. Under stages 0-2 weights are whole on every rank and
are averaged whole. For evaluation the average is swapped into the partitions the engine
gathers from (ZeRO-3 weights still gathered, such as the small "persistent" ones, are released
first so that the forward gathers them again), then swapped back.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from anchorformer import dist

__all__ = ["ShardedEma"]


def _is_partitioned(param: nn.Parameter) -> bool:
    """Whether ZeRO-3 manages ``param`` (this rank owns one partition of it)."""
    return hasattr(param, "ds_tensor")


def _release_gathered(params: list[nn.Parameter]) -> None:
    """Free the whole copies of ZeRO-3 weights that are gathered right now (persistent ones, and
    any kept after an evaluation forward); the next forward gathers them anew from the
    partitions."""
    gathered = [p for p in params if _is_partitioned(p) and p.ds_status.name == "AVAILABLE"]
    if gathered:
        gathered[0].partition(param_list=gathered)


def _storage(param: nn.Parameter) -> torch.Tensor:
    """The tensor holding this rank's authoritative values of ``param``."""
    return param.ds_tensor.data if _is_partitioned(param) else param.data


class ShardedEma:
    """EMA of a module's trainable weights, kept in fp32.

    Args:
        module: the engine's module (``engine.module``) after ``deepspeed.initialize``.
        decay: weight of the old average per update, in (0, 1).
    """

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self._params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        self.shadow = {n: _storage(p).detach().float().clone() for n, p in self._params.items()}

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current weights into the average: ``ema = decay * ema + (1 - decay) * w``."""
        for name, param in self._params.items():
            self.shadow[name].lerp_(_storage(param).float(), 1.0 - self.decay)
        self.updates += 1

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Run the module with the averaged weights inside the block; restore afterwards."""
        backup = {}
        _release_gathered(list(self._params.values()))
        with torch.no_grad():
            for name, param in self._params.items():
                storage = _storage(param)
                backup[name] = storage.clone()
                storage.copy_(self.shadow[name])
        try:
            yield
        finally:
            _release_gathered(list(self._params.values()))
            with torch.no_grad():
                for name, param in self._params.items():
                    _storage(param).copy_(backup[name])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole averaged weights on every rank (gathers ZeRO-3 partitions; a collective)."""
        full = {}
        for name, param in self._params.items():
            shadow = self.shadow[name]
            if _is_partitioned(param):
                flat = torch.cat(dist.all_gather_tensor(shadow.reshape(-1)))
                full[name] = flat[: param.ds_numel].view(param.ds_shape)
            else:
                full[name] = shadow.clone()
        return full

    def state_dict(self, is_main: bool) -> dict[str, Any]:
        """What this rank must persist: its partitions, plus the whole weights on the main rank."""
        keep = {n: t for n, t in self.shadow.items()
                if _is_partitioned(self._params[n]) or is_main}
        return {"decay": self.decay, "updates": self.updates, "shadow": keep}

    def load_state_dict(self, own: dict[str, Any], main: dict[str, Any]) -> None:
        """Restore from this rank's saved state and the main rank's (for the whole weights).

        Raises:
            ValueError: when a saved tensor is missing or has another shape (other model/layout).
        """
        for name, param in self._params.items():
            source = own if _is_partitioned(param) else main
            saved = source["shadow"].get(name)
            if saved is None or saved.shape != self.shadow[name].shape:
                raise ValueError(
                    f"EMA state for {name!r} is missing or has shape "
                    f"{None if saved is None else tuple(saved.shape)} instead of "
                    f"{tuple(self.shadow[name].shape)}: the checkpoint was written by another model "
                    f"or ZeRO layout")
            self.shadow[name].copy_(saved)
        self.updates = int(own["updates"])
