"""The collectives the trainer and tasks use, so that nothing else calls torch.distributed or does
rank arithmetic. Every function also works without a process group (one process)."""
from __future__ import annotations

import random
from typing import Any, Iterable, Iterator, TypeVar

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["is_distributed", "rank", "world_size", "sum_across_ranks", "barrier",
           "all_gather_objects", "all_gather_tensor", "broadcast_object", "in_lockstep", "seed_everything", "seed_for_step",
           "rng_state", "set_rng_state"]

T = TypeVar("T")


def is_distributed() -> bool:
    """Whether a process group with more than one process is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def sum_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of ``values`` over all ranks (one all-reduce; in place, also returned)."""
    if is_distributed():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def barrier() -> None:
    """Wait until every rank arrives."""
    if is_distributed():
        dist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """Picklable ``obj`` from every rank, in rank order."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def in_lockstep(items: Iterable[T], filler: T, device: torch.device) -> Iterator[tuple[T, bool]]:
    """Iterate until every rank is exhausted, padding short ranks with ``filler``.

    Needed where each item drives collectives (a ZeRO-3 forward gathers weights on all ranks)
    but ranks hold different numbers of items (an uneven validation split).

    Yields:
        ``(item, True)`` for real items, ``(filler, False)`` once this rank ran out while
        another rank still has items.
    """
    iterator = iter(items)
    while True:
        item = next(iterator, None)
        have = torch.tensor([0.0 if item is None else 1.0], device=device)
        if sum_across_ranks(have).item() == 0:
            return
        yield (filler, False) if item is None else (item, True)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch identically on every rank (model init must match)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_for_step(seed: int, micro_step: int) -> None:
    """Seed torch's generators from (seed, micro-step, rank): the dropout and drop-path of a
    micro-batch do not depend on what ran before (e.g. data loader start-up draws from the same
    generator), so a resumed run repeats them exactly; ranks draw differently."""
    torch.manual_seed((seed * 1_000_003 + micro_step) * 4099 + rank())


def rng_state() -> dict[str, Any]:
    """This process's random generator states (for exact resume)."""
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states saved by :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def all_gather_tensor(tensor: torch.Tensor) -> list[torch.Tensor]:
    """``tensor`` (same shape on every rank) from every rank, in rank order."""
    if not is_distributed():
        return [tensor]
    gathered = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return gathered
