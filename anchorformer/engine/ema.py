"""Exponential moving average of the weights that works under every ZeRO stage.

Under ZeRO-3 each rank averages only its own partition of every weight (``param.ds_tensor``):
no communication, 1/world of the memory. Under stages 0-2 weights are whole on every rank and
are averaged whole. For evaluation the average is swapped into the partitions the engine
gathers from (ZeRO-3 weights still gathered, such as the small "persistent" ones, are released
first so that the forward gathers them again, and DeepSpeed's recorded fetch order, which assumed
them gathered, is dropped), then swapped back.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from torch import nn

from anchorformer import dist
from anchorformer.dist.zero import is_partitioned, local_values, release_gathered
from anchorformer.run_folder import EmaLayout

__all__ = ["ShardedEma"]


class ShardedEma:
    """EMA of a module's trainable weights, kept in fp32.

    Args:
        module: the engine's module (``engine.module``) after ``deepspeed.initialize``.
        decay: weight of the old average per update, in (0, 1).
        fetch_coordinator: ZeRO-3's parameter-fetch coordinator of the engine (see :meth:`for_engine`).
    """

    def __init__(self, module: nn.Module, decay: float, fetch_coordinator: Optional[Any] = None):
        self.decay = decay
        self._coordinator = fetch_coordinator
        self.updates = 0
        self._params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        self.shadow = {n: local_values(p).detach().float().clone() for n, p in self._params.items()}

    @classmethod
    def for_engine(cls, engine: Any, decay: float) -> "ShardedEma":
        """The EMA of a DeepSpeed engine's module; under ZeRO-3 with the engine's parameter-fetch
        coordinator, whose recorded fetch order a swap invalidates."""
        offload = getattr(engine.optimizer, "parameter_offload", None)
        return cls(engine.module, decay, offload.get_param_coordinator() if offload is not None else None)

    @torch.no_grad()
    def update(self, keep: Optional[torch.Tensor] = None) -> None:
        """Fold the current weights into the average: ``ema = decay * ema + (1 - decay) * w``.

        Args:
            keep: a 0-dim 1.0 / 0.0 on the weights' device; 0.0 leaves the average as it is (a
                skipped optimizer step), decided on the device without a host synchronisation.
                ``updates`` counts the calls.
        """
        weight = 1.0 - self.decay if keep is None else keep * (1.0 - self.decay)
        for name, param in self._params.items():
            self.shadow[name].lerp_(local_values(param).float(), weight)
        self.updates += 1

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Run the module with the averaged weights inside the block; restore afterwards."""
        backup = {}
        self._release_gathered()
        with torch.no_grad():
            for name, param in self._params.items():
                storage = local_values(param)
                backup[name] = storage.clone()
                storage.copy_(self.shadow[name])
        try:
            yield
        finally:
            self._release_gathered()
            with torch.no_grad():
                for name, param in self._params.items():
                    local_values(param).copy_(backup[name])

    def _release_gathered(self) -> None:
        release_gathered(self._params.values())
        # DeepSpeed prefetches by the fetch order it recorded with these weights gathered; a
        # forward with them released no longer follows it (resumed runs trip over it): record anew
        if self._coordinator is not None and not self._coordinator.is_invalid_trace():
            self._coordinator._invalidate_trace()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole averaged weights on every rank (gathers ZeRO-3 partitions; a collective)."""
        full = {}
        for name, param in self._params.items():
            shadow = self.shadow[name]
            if is_partitioned(param):
                flat = torch.cat(dist.all_gather_tensor(shadow.reshape(-1)))
                full[name] = flat[: param.ds_numel].view(param.ds_shape)
            else:
                full[name] = shadow.clone()
        return full

    def state_dict(self) -> dict[str, Any]:
        """What this rank persists, the same under every ZeRO stage: its chunk of every average,
        slice ``rank`` of ``world_size`` equal zero-padded slices of the flattened average (which
        is the average's ZeRO-3 partition), so that all ranks' chunks in rank order make it whole."""
        return EmaLayout.state(self.decay, self.updates, {name: self._chunk(name) for name in self._params})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from this rank's :meth:`state_dict` of a run on as many ranks (any ZeRO stage).
        A collective where weights are whole: the other ranks' chunks complete them.

        Raises:
            ValueError: when a saved chunk is missing (another model, or an older checkpoint).
        """
        for name, param in self._params.items():
            chunk = self._saved_chunk(state, name).to(self.shadow[name].device)
            if is_partitioned(param):
                if chunk.numel() != self.shadow[name].numel():
                    raise ValueError(f"the saved EMA chunk of {name!r} holds {chunk.numel()} values, this rank's "
                                     f"partition {self.shadow[name].numel()}: the checkpoint was written by another model")
                self.shadow[name].copy_(chunk.view_as(self.shadow[name]))
            else:
                self._set_from_whole(name, torch.cat(dist.all_gather_tensor(chunk)))
        self.updates = int(state["updates"])

    def load_resharded(self, states: list[dict[str, Any]]) -> None:
        """Restore from the :meth:`state_dict` of every rank (rank order) of a run on another number
        of ranks: the whole average from their chunks, then this rank's storage of it."""
        for name in self._params:
            self._set_from_whole(name, torch.cat([self._saved_chunk(state, name) for state in states]))
        self.updates = int(states[0]["updates"])

    def _chunk(self, name: str) -> torch.Tensor:
        shadow = self.shadow[name]
        if is_partitioned(self._params[name]):
            return shadow.reshape(-1).clone()
        return _slice(shadow.reshape(-1), dist.rank(), dist.world_size())

    @staticmethod
    def _saved_chunk(state: dict[str, Any], name: str) -> torch.Tensor:
        chunk = EmaLayout.chunk(state, name)
        if chunk is None:
            raise ValueError(f"the saved EMA has no values for {name!r}: the checkpoint was written by another "
                             f"model or an older version; resume with train.ema.enabled=false")
        return chunk

    def _set_from_whole(self, name: str, flat: torch.Tensor) -> None:
        """Set this rank's storage of ``name``'s average from the flat whole (padding after its end)."""
        param, shadow = self._params[name], self.shadow[name]
        numel = param.ds_numel if is_partitioned(param) else shadow.numel()
        if flat.numel() < numel:
            raise ValueError(f"the saved EMA of {name!r} holds {flat.numel()} values, the weight has {numel}: the "
                             f"checkpoint was written by another model")
        mine = _slice(flat[:numel], dist.rank(), dist.world_size()) if is_partitioned(param) else flat[:numel]
        shadow.copy_(mine.to(shadow.device).view_as(shadow))


def _slice(flat: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Slice ``rank`` of ``world`` equal slices of the 1-d ``flat``, zero-padded at the end (as
    ZeRO-3 partitions a weight)."""
    size = -(-flat.numel() // world)
    part = torch.zeros(size, dtype=flat.dtype, device=flat.device)
    mine = flat[rank * size:(rank + 1) * size]
    part[: mine.numel()] = mine
    return part
