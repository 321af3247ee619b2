"""Streams over map-style readers (the COCO and ADE20K readers of the dense-prediction tasks): a
resumable training stream of one rank, and the rank's share of an evaluation set; and how such a
reader skips a sample it cannot deliver.

The sample order of an epoch is a permutation drawn from (seed, epoch), cut into global batches
of ``micro_batch_size x world_size``, of which rank r takes the r-th slice; so the samples consumed
this epoch (all ranks') are enough to resume at the same sample, on any micro-batch size and number
of ranks (an optimizer step keeps its samples). Augmentation draws come from the
DataLoader workers' generators, which are re-seeded from (seed, epoch, rank, position).

Skips speak the vocabulary of the shard streams (``anchorformer.data.stages.SKIP_REASONS``): a
reader's ``__getitem__`` returns :func:`skip_sample`'s marker in place of the sample, the collate
function counts the markers by reason (:func:`drop_skipped`), and the stream sums the counts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from anchorformer.data.stages import SKIP_REASONS, SkipCounter, add_skip_counts
from anchorformer.data.workers import init_worker

__all__ = ["SkippedSample", "skip_sample", "drop_skipped", "MapTrainStream", "eval_loader"]


@dataclass(frozen=True)
class SkippedSample:
    """What a map-style reader returns in place of a sample it cannot deliver, and why (one of
    ``SKIP_REASONS``)."""

    reason: str


def skip_sample(counter: SkipCounter, reason: str, message: str) -> SkippedSample:
    """Count and log (rate-limited) a sample a reader skips; return the marker its ``__getitem__``
    returns instead of the sample.

    Args:
        counter: the reader's counter (each DataLoader worker holds its own copy).
        reason: one of ``SKIP_REASONS``.
        message: what was skipped and why, for the log.
    """
    counter.skip(reason, message)
    return SkippedSample(reason)


def drop_skipped(samples: Sequence[Any]) -> Tuple[List[Any], Dict[str, int]]:
    """For a collate function: the samples a reader delivered, and the skipped ones counted by reason."""
    kept = [sample for sample in samples if not isinstance(sample, SkippedSample)]
    skips = dict.fromkeys(SKIP_REASONS, 0)
    for sample in samples:
        if isinstance(sample, SkippedSample):
            skips[sample.reason] += 1
    return kept, skips


class MapTrainStream:
    """The training batches of one rank (fits ``anchorformer.tasks.base.TrainStreamLike``).

    Args:
        dataset: map-style dataset; ``__getitem__`` may return a :class:`SkippedSample`.
        collate_fn: batch builder whose result has ``skips``, counts by reason (see
            ``anchorformer.data.coco.collate_detection``).
        rank: this process's rank.
        world_size: number of ranks.
        micro_batch_size: samples per batch on this rank.
        num_workers: DataLoader worker processes (0 loads in this process).
        seed: seed of the sample order.

    Raises:
        ValueError: when the dataset holds fewer samples than one global batch.
    """

    def __init__(self, dataset: Dataset, collate_fn: Callable[[List[Any]], Any], *, rank: int, world_size: int,
                 micro_batch_size: int, num_workers: int, seed: int) -> None:
        global_batch = micro_batch_size * world_size
        self.steps_per_epoch = len(dataset) // global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"the training set has {len(dataset)} samples, fewer than one global batch of "
                             f"{global_batch} (train.micro_batch_size={micro_batch_size} x {world_size} ranks); "
                             "lower train.micro_batch_size or use more data")
        self.dataset, self.collate_fn = dataset, collate_fn
        self.rank, self.world_size, self.micro_batch_size = rank, world_size, micro_batch_size
        self.num_workers, self.seed = num_workers, seed
        self.epoch, self.consumed = 0, 0
        self._skips = dict.fromkeys(SKIP_REASONS, 0)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order is streamed; a new epoch starts at its first batch (the
        current one continues where it was, as after a resume)."""
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0

    def epoch_indices(self) -> List[int]:
        """This rank's sample indices for the whole current epoch, in order."""
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        micro, global_batch = self.micro_batch_size, self.micro_batch_size * self.world_size
        return [int(i) for step in range(self.steps_per_epoch)
                for i in order[step * global_batch + self.rank * micro: step * global_batch + (self.rank + 1) * micro]]

    def __iter__(self) -> Iterator[Any]:
        start = self.consumed * self.micro_batch_size
        generator = torch.Generator().manual_seed(
            hash((self.seed, self.epoch, self.rank, self.consumed)) % 2**63)
        loader = DataLoader(self.dataset, batch_size=self.micro_batch_size, sampler=self.epoch_indices()[start:],
                            num_workers=self.num_workers, collate_fn=self.collate_fn, generator=generator,
                            worker_init_fn=init_worker)
        for batch in loader:
            self.consumed += 1
            self._skips = add_skip_counts(self._skips, batch.skips)
            yield batch

    def state_dict(self) -> Dict[str, int]:
        """Position in the stream (JSON-serialisable): the micro-batches this rank consumed, and the
        samples all ranks consumed of the epoch's order (its global position)."""
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed,
                "samples": self.consumed * self.micro_batch_size * self.world_size}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        """Continue at a saved position, on any micro-batch size and number of ranks: the epoch's
        order does not depend on them, so each optimizer step keeps its samples.

        Raises:
            ValueError: when the state was saved with another seed, or its position is not a whole
                number of this layout's micro-batches (``micro_batch_size x world_size`` samples).
        """
        if state["seed"] != self.seed:
            raise ValueError(f"the data position was saved with train.seed={state['seed']}, this run uses "
                             f"{self.seed}; resume with the same seed")
        per_batch = self.micro_batch_size * self.world_size
        samples = int(state.get("samples", int(state["consumed"]) * per_batch))  # older states: this layout's
        if samples % per_batch:
            raise ValueError(f"the data position ({samples} samples of the epoch) is not a whole number of "
                             f"micro-batches of {self.micro_batch_size} x {self.world_size} ranks; resume with "
                             f"a micro-batch size and number of processes that divide it")
        self.epoch, self.consumed = int(state["epoch"]), samples // per_batch

    def load_resharded(self, states: List[Dict[str, int]]) -> None:
        """Continue the position every rank saved (the same global one) on another number of ranks."""
        self.load_state_dict(states[0])

    def skip_counts(self) -> Dict[str, int]:
        """Samples left out of batches so far on this rank, by reason (``SKIP_REASONS``)."""
        return dict(self._skips)


def eval_loader(dataset: Dataset, collate_fn: Callable[[List[Any]], Any], *, rank: int, world_size: int,
                batch_size: int, num_workers: int) -> DataLoader:
    """This rank's share of an evaluation set (samples ``rank, rank + world_size, ...``): every
    sample is evaluated exactly once over all ranks, none padded or repeated.

    Args:
        dataset: the evaluation dataset.
        collate_fn: batch builder.
        rank: this process's rank.
        world_size: number of ranks.
        batch_size: samples per batch.
        num_workers: DataLoader worker processes.

    Returns:
        A re-iterable DataLoader.
    """
    share = Subset(dataset, range(rank, len(dataset), world_size))
    return DataLoader(share, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_fn,
                      worker_init_fn=init_worker)
