"""The global position of a training epoch, and the plan that finishes it on another layout.

An epoch's samples are fixed when it starts. The layout that starts it (world size, logical
workers per rank, micro-batch size) deals the shards to its readers (``data/shards.py``); logical
worker ``w`` of rank ``k`` delivers its samples in a seeded order, one micro-batch after another
(micro-batch ``b`` of a rank comes from its worker ``b % workers``), and optimizer step ``t``
trains on micro-batches ``t * acc .. (t + 1) * acc - 1`` of every rank (``acc`` accumulated
micro-batches; ``global_batch = micro_batch x world_size x acc`` samples per step).

The *global position* at a step boundary is that origin layout plus how many samples each of its
(rank, worker) had delivered: an :class:`Origin`. Every later step's samples follow from it
without reading anything, since a worker's next batches are its next positions.

A resume on another layout finishes the epoch step by step: the samples of a step, ordered by
(origin rank, origin worker, position), are cut into the new layout's micro-batches, ordered by
(new rank, new worker, batch). Every remaining step so trains on the samples it had in the origin
layout (only the reduction order changes), each remaining sample is delivered once, and a new
worker reads few origin workers (about origin readers / new readers + 1 of them)."""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

__all__ = ["Origin", "planned_samples", "spare_samples", "worker_batches"]

Sample = tuple[int, int, int]
"""(origin rank, origin logical worker, position in that worker's sample order)"""


def _made_before(worker: int, workers: int, batch: int) -> int:
    """How many of the micro-batches ``0 .. batch - 1`` come from logical worker ``worker``."""
    return (batch - worker + workers - 1) // workers


def worker_batches(worker: int, workers: int, start: int, stop: int) -> int:
    """How many of the micro-batches ``start .. stop - 1`` of a rank logical worker ``worker`` of
    ``workers`` makes (batch ``b`` comes from worker ``b % workers``)."""
    return _made_before(worker, workers, stop) - _made_before(worker, workers, start)


@dataclass(frozen=True)
class Origin:
    """The layout an epoch started on, and where its workers were after ``batch`` micro-batches
    per rank (a step boundary). ``positions`` holds every origin rank (a complete position), or
    only the rank whose share resumes on the same number of ranks."""

    world_size: int
    num_workers: int
    """Logical workers per rank (1 when the loader ran in the training process)."""
    micro_batch_size: int
    batch: int
    positions: dict[int, tuple[int, ...]]
    """Origin rank -> samples each of its logical workers had delivered."""

    @property
    def complete(self) -> bool:
        """Whether the positions of every origin rank are known."""
        return set(self.positions) == set(range(self.world_size))

    def position(self, rank: int, worker: int, batch: int) -> int:
        """The position of the first sample of ``worker``'s next micro-batch once the origin rank
        has delivered ``batch`` micro-batches (``batch >= self.batch``)."""
        assert batch >= self.batch, f"position asked at batch {batch}, before the origin's {self.batch}"
        return self.positions[rank][worker] + worker_batches(worker, self.num_workers, self.batch,
                                                             batch) * self.micro_batch_size

    def accumulation(self, global_batch: int) -> int:
        """Micro-batches per rank in one optimizer step of the origin layout."""
        return global_batch // (self.micro_batch_size * self.world_size)

    def state_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form (rank keys as strings)."""
        return {"world_size": self.world_size, "num_workers": self.num_workers,
                "micro_batch_size": self.micro_batch_size, "batch": self.batch,
                "positions": {str(rank): list(p) for rank, p in sorted(self.positions.items())}}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Origin":
        """Inverse of :meth:`state_dict`."""
        return cls(int(state["world_size"]), int(state["num_workers"]), int(state["micro_batch_size"]),
                   int(state["batch"]), {int(rank): tuple(int(p) for p in positions)
                                         for rank, positions in state["positions"].items()})

    @classmethod
    def merge(cls, origins: Sequence["Origin"]) -> "Origin":
        """One origin from the shares several ranks saved of the same epoch start.

        Raises:
            ValueError: when they describe different starts, or disagree on a rank.
        """
        first = origins[0]
        positions: dict[int, tuple[int, ...]] = {}
        for origin in origins:
            if (origin.world_size, origin.num_workers, origin.micro_batch_size, origin.batch) != (
                    first.world_size, first.num_workers, first.micro_batch_size, first.batch):
                raise ValueError(f"the ranks' data states describe different epoch starts ({first} vs {origin})")
            for rank, share in origin.positions.items():
                if positions.setdefault(rank, share) != share:
                    raise ValueError(f"the ranks' data states disagree on the position of origin rank {rank}")
        return cls(first.world_size, first.num_workers, first.micro_batch_size, first.batch, positions)


def _cut(chunks: list[tuple[int, int, int, int]], start: int, count: int) -> Iterator[Sample]:
    """Samples ``start .. start + count - 1`` of the concatenated chunks (rank, worker, first
    position, length)."""
    for rank, worker, first, length in chunks:
        if count <= 0:
            return
        if start >= length:
            start -= length
            continue
        taken = min(length - start, count)
        yield from ((rank, worker, q) for q in range(first + start, first + start + taken))
        count -= taken
        start = 0


def planned_samples(origin: Origin, global_batch: int, new_ranks: Sequence[int], new_workers: int,
                    new_micro_batch: int, new_world_size: int, rank: int, worker: int, first_step: int,
                    end_step: int) -> Iterator[Sample]:
    """The origin samples logical worker ``worker`` of new rank ``rank`` delivers in steps
    ``first_step .. end_step - 1``, in its batch order.

    Args:
        origin: the epoch's global position (its step must be at most ``first_step``).
        global_batch: samples per optimizer step over all ranks (the same in both layouts).
        new_ranks: the new ranks sharing the origin ranks' samples: every new rank for a complete
            origin, this rank alone for a share on the same number of ranks.
        new_workers: logical workers per new rank.
        new_micro_batch: micro-batch size of the new layout.
        new_world_size: ranks of the new layout.
        rank, worker: the new rank and logical worker whose samples these are.
        first_step, end_step: the optimizer steps of the epoch to deliver.
    """
    origin_ranks = sorted(origin.positions)
    origin_acc = origin.accumulation(global_batch)
    new_acc = global_batch // (new_micro_batch * new_world_size)
    slot = new_ranks.index(rank) * new_workers + worker
    for step in range(first_step, end_step):
        low, high = step * origin_acc, (step + 1) * origin_acc
        chunks = [(k, w, origin.position(k, w, low),
                   worker_batches(w, origin.num_workers, low, high) * origin.micro_batch_size)
                  for k in origin_ranks for w in range(origin.num_workers)]
        sizes = [worker_batches(v, new_workers, step * new_acc, (step + 1) * new_acc) * new_micro_batch
                 for _ in new_ranks for v in range(new_workers)]
        assert sum(sizes) == sum(chunk[3] for chunk in chunks), (
            f"step {step}: the new layout takes {sum(sizes)} samples, the origin gives "
            f"{sum(chunk[3] for chunk in chunks)}")
        yield from _cut(chunks, sum(sizes[:slot]), sizes[slot])


def spare_samples(origin: Origin, end_batch: int, new_ranks: Sequence[int], new_workers: int, rank: int,
                  worker: int) -> Iterator[Sample]:
    """Samples past the epoch's end, a different endless series for every new worker: where a
    planned sample turned out unreadable, the worker fills its batch from these, as the origin
    worker would have filled it from its next samples.

    Args:
        origin: the epoch's global position.
        end_batch: micro-batches per origin rank in the whole epoch.
        new_ranks, new_workers, rank, worker: as for :func:`planned_samples`.
    """
    readers = [(k, w) for k in sorted(origin.positions) for w in range(origin.num_workers)]
    slot = new_ranks.index(rank) * new_workers + worker
    stride = math.ceil(len(new_ranks) * new_workers / len(readers))
    origin_rank, origin_worker = readers[slot % len(readers)]
    first = origin.position(origin_rank, origin_worker, end_batch) + slot // len(readers)
    return ((origin_rank, origin_worker, q) for q in itertools.count(first, stride))
