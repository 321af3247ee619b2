"""Training and validation streams over webdataset shards, one per rank.

Training: every epoch the shard list is shuffled with a seed derived from (seed, epoch) and dealt
to ``world_size`` x ``num_workers`` readers, one per rank and logical worker. A reader reads its
shards with webdataset (tar reader, shuffle buffer), cycling through them again in a new order when
they run out (resampling), so every rank makes exactly ``steps_per_epoch`` batches and no rank
waits at the end of an epoch. Batch ``b`` of an epoch comes from logical worker
``b % num_workers``; a batch is a deterministic function of (seed, epoch, rank, world_size,
num_workers, b), augmentations included (they are seeded per sample). The stream's state (epoch,
batches consumed, samples each logical worker consumed) is enough to rebuild it so that it goes on
with exactly the batches an uninterrupted run would have produced next.

Repeated augmentation (DeiT's RASampler), any count ``r`` on any number of ranks: logical worker
``w`` of rank ``k`` follows the readers ``w`` of ranks ``k, k-1, ..., k-r+1`` (mod world_size), each
through its own copy of that reader (the same samples in the same order), and takes its samples
from them in turn (sample ``q`` of the worker from copy ``q % r``). Every sample a reader yields is
thus trained on by ``r`` consecutive ranks, distinct ones while ``r <= world_size`` (as RASampler
places the copies; with fewer ranks a rank gets several), each augmenting it with its own seed,
in nearly the same step; an epoch keeps its length, so it sees about 1/r of the images. The
worker's shuffle buffer is split between its r copies (the same memory as without repeats). The
worker's state stays one position: how many samples it took from its copies in turn.

Resume on another layout (world size, workers, micro-batch size; same global batch): the saved
positions of every rank are the epoch's global position (``data/resume_plan.py``). The rest of the
interrupted epoch is planned from it: each remaining optimizer step gets the samples it had in the
layout that started the epoch, cut over the new ranks and workers, each read from its origin
worker's sample order and augmented with its origin seed; none repeated, none skipped. The next
epochs are those of a run started on the new layout.

Validation: the shards are dealt to ranks, then workers, read once in order; every sample is
yielded once overall, ranks may yield different numbers of batches, nothing is padded."""
import dataclasses
import functools
import itertools
import logging
import random
from typing import Iterator, Sequence

import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from anchorformer.data.index import ShardIndex, ShardSpec, resolve_shards
from anchorformer.data.pipelines import build_train_pipeline
from anchorformer.data.resume_plan import Origin, planned_samples, spare_samples
from anchorformer.data.stages import (SKIP_REASONS, BatchMeta, SkipCounter, add_skip_counts, batch_samples,
                                      count_shard_samples, decode_samples, derive_seed, end_with_counts,
                                      number_samples, transform_samples)
from anchorformer.config import AugmentConfig, MixupSection
from anchorformer.data.transforms import build_eval_transform
from anchorformer.data.workers import init_worker

__all__ = ["TrainStream", "ValStream", "build_train_stream", "build_val_stream"]

_logger = logging.getLogger(__name__)

_SHUFFLE_INITIAL = 100
_RESUME_KEYS = ("seed", "rank", "world_size", "num_workers", "micro_batch_size", "repeated_aug", "shuffle_buffer",
                "steps_per_epoch")
_EPOCH_KEYS = ("seed", "repeated_aug", "shuffle_buffer", "global_batch_size", "total_samples")
"""The settings an epoch's samples depend on, whatever the layout (older states lack the last two)."""


def _shard_urls_once(urls: list[str], counter: SkipCounter) -> Iterator[dict]:
    """The shards in order, keeping ``counter.current_shard`` on the one being read."""
    for url in urls:
        counter.current_shard = url
        yield {"url": url}


def _epoch_samples(shards: list[ShardSpec], seed: int, epoch: int, stream: int, shuffle_buffer: int,
                   counter: SkipCounter) -> Iterator[dict]:
    """A logical worker's samples for one epoch, endlessly: its shards in the dealt order, then the
    same shards again in a new seeded order per pass (resampling keeps every worker's batch count).

    Each pass has its own shuffle buffer, emptied at the end of the pass, so the first pass yields
    every sample of the worker's shards once before any sample repeats. The samples a damaged shard
    loses against the index are counted in each pass."""
    for shard_pass in itertools.count():
        order = list(shards)
        if shard_pass > 0:
            random.Random(derive_seed(seed, epoch, stream, shard_pass)).shuffle(order)
        read_before = counter.samples_read
        counter.shard_pass = shard_pass
        samples = wds.tarfile_to_samples(handler=counter.shard_error)(
            _shard_urls_once([shard.url for shard in order], counter))
        samples = count_shard_samples(samples, order, counter)
        if shuffle_buffer > 1:
            rng = random.Random(derive_seed(seed, epoch, stream, shard_pass, "samples"))
            samples = wds.shuffle(shuffle_buffer, min(_SHUFFLE_INITIAL, shuffle_buffer), rng=rng)(samples)
        yield from samples
        if counter.samples_read == read_before:
            raise RuntimeError(f"{counter.where}: none of its shards could be read "
                               f"({', '.join(shard.url for shard in shards)}); "
                               f"see the shard errors logged above")


def _deal_shards(shards: list[ShardSpec], streams: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffle the shards with a seed from (seed, epoch) and deal each to the reader with the
    fewest samples so far (round-robin when shards are equal), balancing uneven shards."""
    order = list(range(len(shards)))
    random.Random(derive_seed(seed, epoch, "shards")).shuffle(order)
    dealt: list[list[int]] = [[] for _ in range(streams)]
    loads = [0] * streams
    for shard in order:
        reader = min(range(streams), key=lambda i: (loads[i], i))
        dealt[reader].append(shard)
        loads[reader] += shards[shard].samples
    return dealt


def _followed_ranks(rank: int, world_size: int, repeated_aug: int) -> list[int]:
    """The ranks whose readers ``rank`` follows, one per repeat: ``rank, rank-1, ...`` (mod
    world_size), so the ``repeated_aug`` copies of a sample go to consecutive ranks."""
    return [(rank - copy) % world_size for copy in range(repeated_aug)]


def _take_in_turn(copies: list[Iterator[dict]], start: int) -> Iterator[dict]:
    """The worker's samples from position ``start`` on: position ``q`` is the next sample of copy
    ``q % len(copies)`` (each copy is endless), renumbered ``q`` for the resume state and the
    augmentation seed."""
    for position in itertools.count(start):
        sample = next(copies[position % len(copies)])
        sample["__position__"] = position
        yield sample


def _worker_slot(expected_workers: int) -> int:
    """The DataLoader worker id of this process (0 in the main process), checked against the plan."""
    info = get_worker_info()
    workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
    assert workers == expected_workers, f"stream planned for {expected_workers} workers runs in {workers}"
    return worker


def _worker_samples(stream: "TrainStream", epoch: int, world_size: int, workers: int, rank: int, logical: int,
                    start: int, counter: SkipCounter) -> Iterator[dict]:
    """The samples of logical worker ``logical`` of ``rank`` in a layout of ``world_size`` ranks x
    ``workers`` logical workers, from position ``start`` on (numbered, not decoded)."""
    dealt = _deal_shards(stream.shards, world_size * workers, stream.seed, epoch)
    copies = []
    for copy, followed_rank in enumerate(_followed_ranks(rank, world_size, stream.repeated_aug)):
        reader = followed_rank * workers + logical
        where = counter.where + (f" copy {copy}" if stream.repeated_aug > 1 else "")
        copy_counter = SkipCounter(where=where, counts=counter.counts)  # one tally per worker
        samples = _epoch_samples([stream.shards[i] for i in dealt[reader]], stream.seed, epoch, reader,
                                 stream.shuffle_buffer // stream.repeated_aug, copy_counter)
        already_taken = max(0, -(-(start - copy) // stream.repeated_aug))  # positions < start from this copy
        copies.append(number_samples(samples, start=already_taken, counter=copy_counter))
    return _take_in_turn(copies, start)


@dataclasses.dataclass(frozen=True)
class _Remainder:
    """The rest of an epoch started on another layout: its global position, the first step this
    layout plans from it, and the new ranks sharing the origin ranks' samples."""
    origin: Origin
    first_step: int
    ranks: tuple[int, ...]


def _planned_samples(stream: "TrainStream", epoch: int, remainder: _Remainder, logical: int, start: int,
                     counter: SkipCounter) -> Iterator:
    """This worker's decoded, transformed samples of the remainder plan from its position ``start``
    on, each read from its origin worker's sample order and augmented with its origin seed; renumbered
    in this worker's own order. Unreadable ones are skipped and counted, and the spare samples past
    the epoch's end fill in for them."""
    origin = remainder.origin
    steps = stream.steps_per_epoch // stream.accumulation
    planned = planned_samples(origin, stream.global_batch_size, remainder.ranks, stream.logical_workers,
                              stream.micro_batch_size, stream.world_size, stream.rank, logical,
                              remainder.first_step, steps)
    spare = spare_samples(origin, steps * origin.accumulation(stream.global_batch_size), remainder.ranks,
                          stream.logical_workers, stream.rank, logical)
    sources: dict[tuple[int, int], Iterator[dict]] = {}
    for number, (rank, worker, position) in enumerate(itertools.islice(itertools.chain(planned, spare), start, None),
                                                      start):
        if (rank, worker) not in sources:
            source_counter = SkipCounter(where=f"{counter.where} (origin rank {rank} worker {worker})",
                                         counts=counter.counts)
            sources[rank, worker] = _worker_samples(stream, epoch, origin.world_size, origin.num_workers, rank,
                                                    worker, position, source_counter)
        sample = next(sources[rank, worker])
        while sample["__position__"] < position:  # another new worker's sample
            sample = next(sources[rank, worker])
        for decoded in decode_samples([sample], stream.num_classes, counter, decoder=stream.pipeline.decode):
            for transformed in transform_samples([decoded], stream.pipeline.transform,
                                                 seed_parts=(stream.seed, epoch, rank, worker)):
                yield dataclasses.replace(transformed, position=number)


class _TrainEpoch(IterableDataset):
    """One pass over the rest of an epoch: each DataLoader worker plays one logical worker."""

    def __init__(self, stream: "TrainStream", epoch: int, start_batch: int, start_positions: list[int],
                 remainder: _Remainder | None):
        super().__init__()
        self.plan = stream
        self.epoch = epoch
        self.start_batch = start_batch
        self.start_positions = start_positions
        self.remainder = remainder

    def __iter__(self) -> Iterator[tuple]:
        plan, workers = self.plan, self.plan.logical_workers
        # Batches are handed out round-robin from DataLoader worker 0, so the worker that gets the
        # next batch of the epoch (start_batch) must play logical worker start_batch % workers.
        logical = (_worker_slot(workers) + self.start_batch) % workers
        counter = SkipCounter(where=f"train rank {plan.rank} worker {logical}")
        start = self.start_positions[logical]
        first = self.start_batch + (logical - self.start_batch) % workers
        if self.remainder is None:
            samples = [
                functools.partial(_worker_samples, plan, self.epoch, plan.world_size, workers, plan.rank, logical,
                                  start, counter),
                functools.partial(decode_samples, num_classes=plan.num_classes, counter=counter,
                                  decoder=plan.pipeline.decode),
                functools.partial(transform_samples, transform=plan.pipeline.transform,
                                  seed_parts=(plan.seed, self.epoch, plan.rank, logical)),
            ]
        else:
            samples = [functools.partial(_planned_samples, plan, self.epoch, self.remainder, logical, start, counter)]
        stages = [
            *samples,
            functools.partial(batch_samples, batch_size=plan.micro_batch_size,
                              batch_numbers=range(first, plan.steps_per_epoch, workers), worker=logical,
                              counter=counter, partial=False, stack=plan.pipeline.stack),
            *plan.pipeline.batch_stages(seed_parts=(plan.seed, self.epoch, plan.rank)),
        ]
        return iter(wds.DataPipeline(*stages))


def _check_common(num_classes: int, rank: int, world_size: int, micro_batch_size: int, num_workers: int) -> None:
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes} must be at least 1")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size} must be at least 1")
    if num_workers < 0:
        raise ValueError(f"num_workers={num_workers} must be >= 0 (0 loads in the training process)")


def _check_classes(index: ShardIndex | None, index_name: str | None, num_classes: int) -> None:
    if index is not None and index.num_classes > num_classes:
        raise ValueError(f"shard index {index_name} has {index.num_classes} classes but num_classes={num_classes}; "
                         f"set num_classes to at least {index.num_classes}")


def _loader(dataset: IterableDataset, num_workers: int, pin_memory: bool) -> wds.WebLoader:
    # Batches are made in the workers: batch_size=None passes them through untouched.
    return wds.WebLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                         worker_init_fn=init_worker)


class TrainStream:
    """The training batches of one rank, epoch by epoch, resumable mid-epoch.

    Iterating yields ``(images float32 (B,C,H,W), targets)`` (targets int64 (B,), or float32
    (B, num_classes) with mixup), plus the sample keys when built with ``return_keys=True``.
    With ``augment_on="gpu"`` the images are a ``PlannedBatch`` (uint8 crops and their plan) and
    the targets int64: ``device_augment(images, targets, device)`` makes the training batch.
    """

    def __init__(self, shards: list[ShardSpec], *, num_classes: int, rank: int, world_size: int,
                 micro_batch_size: int, num_workers: int, seed: int, image_size: int, augment: AugmentConfig,
                 mixup: MixupSection | None, label_smoothing: float, shuffle_buffer: int, repeated_aug: int,
                 pin_memory: bool, return_keys: bool, pipeline: str = "pil", augment_on: str = "cpu",
                 global_batch_size: int | None = None):
        self.shards = shards
        self.num_classes = num_classes
        self.rank, self.world_size = rank, world_size
        self.micro_batch_size = micro_batch_size
        self.num_workers = num_workers
        self.logical_workers = max(1, num_workers)
        self.seed = seed
        self.pipeline = build_train_pipeline(augment, image_size, mixup, num_classes, label_smoothing, pipeline,
                                             augment_on)
        self.device_augment = self.pipeline.device_augment
        self.shuffle_buffer = shuffle_buffer
        self.repeated_aug = repeated_aug
        self.pin_memory = pin_memory
        self.return_keys = return_keys
        self.total_samples = sum(shard.samples for shard in shards)
        self.global_batch_size = global_batch_size or micro_batch_size * world_size
        self.accumulation = self.global_batch_size // (micro_batch_size * world_size)
        # whole optimizer steps only: the epoch is the same samples on every layout
        self.steps_per_epoch = self.total_samples // self.global_batch_size * self.accumulation
        self._epoch = 0
        self._batches = 0
        self._positions = [0] * self.logical_workers
        self._remainder: _Remainder | None = None
        self._skips = dict.fromkeys(SKIP_REASONS, 0)

    def set_epoch(self, epoch: int) -> None:
        """Move to ``epoch`` (from its start); the current epoch is kept as it is (after a resume).

        Args:
            epoch: epoch number, 0-based.
        """
        if epoch < 0:
            raise ValueError(f"epoch={epoch} must be >= 0")
        if epoch != self._epoch:
            self._epoch, self._batches, self._positions = epoch, 0, [0] * self.logical_workers
            self._remainder = None

    def __len__(self) -> int:
        return self.steps_per_epoch - self._batches

    def __iter__(self) -> Iterator[tuple]:
        start = self._batches
        if start >= self.steps_per_epoch:
            return
        dataset = _TrainEpoch(self, self._epoch, start, list(self._positions), self._remainder)
        reported = [dict.fromkeys(SKIP_REASONS, 0) for _ in range(self.logical_workers)]
        for images, targets, keys, meta in _loader(dataset, self.num_workers, self.pin_memory):
            meta: BatchMeta
            assert meta.batch == self._batches, f"batch {meta.batch} arrived when {self._batches} was due"
            fresh = {reason: meta.skips[reason] - reported[meta.worker][reason] for reason in SKIP_REASONS}
            self._skips = add_skip_counts(self._skips, fresh)
            reported[meta.worker] = meta.skips
            self._positions[meta.worker] = meta.position
            self._batches += 1
            yield (images, targets, keys) if self.return_keys else (images, targets)

    def _settings(self) -> dict:
        return {key: getattr(self, key) for key in _RESUME_KEYS}

    def _layout(self) -> tuple[int, int, int]:
        return self.world_size, self.logical_workers, self.micro_batch_size

    def state_dict(self) -> dict:
        """A small JSON-serialisable state: where this rank is in which epoch, the settings the
        sample order depends on and, in an epoch that started on another layout, that epoch's
        global position."""
        state = {"epoch": self._epoch, "batches": self._batches, "positions": list(self._positions),
                 "skips": dict(self._skips), **self._settings(),
                 **{key: getattr(self, key) for key in _EPOCH_KEYS}}
        if self._remainder is not None:
            state["remainder"] = {"origin": self._remainder.origin.state_dict(),
                                  "first_step": self._remainder.first_step, "ranks": list(self._remainder.ranks)}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue where this rank's ``state`` was taken, on the same number of ranks: exactly (the
        batches an uninterrupted run would have yielded next) when the layout is unchanged, else the
        rest of the epoch planned from this rank's share of its position (see
        :meth:`load_resharded`).

        Args:
            state: this rank's ``state_dict()`` of a stream over the same data and seed.

        Raises:
            ValueError: when the data settings changed, or the state was taken mid-step and the
                number of workers or the micro-batch size changed.
        """
        self._check_epoch_settings(state)
        if state.get("world_size") != self.world_size or state.get("rank") != self.rank:
            raise ValueError(f"the data state of rank {state.get('rank')} of {state.get('world_size')} cannot resume "
                             f"rank {self.rank} of {self.world_size}; pass every rank's state to load_resharded()")
        remainder = state.get("remainder")
        if all(state.get(key) == value for key, value in self._settings().items()):
            if len(state["positions"]) != self.logical_workers or not 0 <= state["batches"] <= self.steps_per_epoch:
                raise ValueError(f"data stream state {state} does not fit {self.logical_workers} workers and "
                                 f"{self.steps_per_epoch} steps per epoch")
            self._epoch, self._batches = int(state["epoch"]), int(state["batches"])
            self._positions = [int(position) for position in state["positions"]]
            self._remainder = None if remainder is None else _Remainder(
                Origin.from_state(remainder["origin"]), int(remainder["first_step"]), tuple(remainder["ranks"]))
        else:
            origin = Origin.from_state(remainder["origin"]) if remainder else self._origin_of([state])
            self._plan_rest(state, origin)
        self._skips = add_skip_counts(dict.fromkeys(SKIP_REASONS, 0), state["skips"])

    def load_resharded(self, states: Sequence[dict]) -> None:
        """Continue the epoch every rank's ``states`` (rank order) were taken in, on this layout:
        each remaining optimizer step gets the samples it had in the layout that started the epoch
        (``data/resume_plan.py``), this rank its share of them. The following epochs are those of a
        run started on this layout. The skip counts so far move to rank 0.

        Args:
            states: ``state_dict()`` of every rank of the saved run, taken at an optimizer step
                boundary (as the trainer saves them).

        Raises:
            ValueError: when the data settings changed, or the states are not one step boundary of
                one epoch of all the saved ranks.
        """
        first = states[0]
        for state in states:
            self._check_epoch_settings(state)
        if [state.get("rank") for state in states] != list(range(first["world_size"])) or any(
                (state["epoch"], state["batches"]) != (first["epoch"], first["batches"]) for state in states):
            raise ValueError(f"load_resharded() needs the data states of all {first['world_size']} saved ranks, in rank "
                             f"order, at the same epoch and batch")
        remainders = [state.get("remainder") for state in states]
        if any(remainders):
            origin = Origin.merge([Origin.from_state(r["origin"]) for r in remainders if r is not None])
        else:
            origin = self._origin_of(states)
        if not origin.complete:
            raise ValueError(f"the saved data states hold the position of origin ranks {sorted(origin.positions)} "
                             f"only, not all {origin.world_size}; resume on {first['world_size']} ranks")
        self._plan_rest(first, origin)
        total = functools.reduce(add_skip_counts, [state["skips"] for state in states])
        self._skips = total if self.rank == 0 else dict.fromkeys(SKIP_REASONS, 0)

    def _check_epoch_settings(self, state: dict) -> None:
        changed = [f"{key}: saved {state[key]!r}, now {getattr(self, key)!r}" for key in _EPOCH_KEYS
                   if key in state and state[key] != getattr(self, key)]
        if changed:
            raise ValueError("cannot resume the training data stream, the settings its sample order depends on "
                             "changed (" + "; ".join(changed) + "); resume with the same data, seed and global batch")

    def _origin_of(self, states: Sequence[dict]) -> Origin:
        """The global position of ``states`` (one rank's or all), taken in an epoch their layout started."""
        first = states[0]
        return Origin(first["world_size"], max(1, first["num_workers"]), first["micro_batch_size"],
                      first["batches"], {state["rank"]: tuple(state["positions"]) for state in states})

    def _plan_rest(self, state: dict, origin: Origin) -> None:
        """Plan the rest of ``state``'s epoch on this layout from its global position ``origin``."""
        saved_acc = self.global_batch_size // (state["micro_batch_size"] * state["world_size"])
        if state["batches"] % saved_acc:
            raise ValueError(f"the data state was taken after {state['batches']} micro-batches, inside an "
                             f"optimizer step of {saved_acc}; only a step boundary resumes on another layout")
        step = state["batches"] // saved_acc
        steps = self.steps_per_epoch // self.accumulation
        self._epoch, self._batches = int(state["epoch"]), step * self.accumulation
        self._positions = [0] * self.logical_workers
        ranks = tuple(range(self.world_size)) if origin.complete else (self.rank,)
        self._remainder = _Remainder(origin, step, ranks) if step < steps else None
        _logger.info("train stream rank %d: epoch %d resumes at step %d of %d on %d ranks x %d workers x %d, "
                     "planned from its start on %d x %d x %d", self.rank, self._epoch, step, steps, *self._layout(),
                     origin.world_size, origin.num_workers, origin.micro_batch_size)

    def skip_counts(self) -> dict[str, int]:
        """Samples (shards, for ``unreadable_shard``) this rank skipped so far, by reason."""
        return dict(self._skips)


class _ValPass(IterableDataset):
    """One pass over a rank's validation shards; each DataLoader worker reads its share once."""

    def __init__(self, stream: "ValStream"):
        super().__init__()
        self.plan = stream

    def __iter__(self) -> Iterator[tuple]:
        plan = self.plan
        worker = _worker_slot(max(1, plan.num_workers))
        shards = plan.rank_shards[worker::max(1, plan.num_workers)]
        counter = SkipCounter(where=f"val rank {plan.rank} worker {worker}")
        stages = [
            functools.partial(_shard_urls_once, [shard.url for shard in shards], counter),
            wds.tarfile_to_samples(handler=counter.shard_error),
            functools.partial(count_shard_samples, shards=shards, counter=counter),
            functools.partial(number_samples, start=0, counter=counter),
            functools.partial(decode_samples, num_classes=plan.num_classes, counter=counter),
            functools.partial(transform_samples, transform=plan.transform, seed_parts=None),
            functools.partial(batch_samples, batch_size=plan.micro_batch_size, batch_numbers=None, worker=worker,
                              counter=counter, partial=True),
            functools.partial(end_with_counts, worker=worker, counter=counter),
        ]
        return iter(wds.DataPipeline(*stages))


class ValStream:
    """The validation batches of one rank: ``(images, targets int64)`` (plus keys with
    ``return_keys=True``); every sample once over all ranks and workers, no padding."""

    def __init__(self, shards: list[ShardSpec], *, num_classes: int, rank: int, world_size: int,
                 micro_batch_size: int, num_workers: int, image_size: int, augment: AugmentConfig,
                 pin_memory: bool, return_keys: bool):
        self.rank_shards = shards[rank::world_size]
        self.num_classes = num_classes
        self.rank = rank
        self.micro_batch_size = micro_batch_size
        self.num_workers = num_workers
        self.transform = build_eval_transform(augment, image_size)
        self.pin_memory = pin_memory
        self.return_keys = return_keys
        self.num_samples = sum(shard.samples for shard in self.rank_shards)
        self._skips = dict.fromkeys(SKIP_REASONS, 0)

    def __iter__(self) -> Iterator[tuple]:
        if not self.rank_shards:
            return
        final = [dict.fromkeys(SKIP_REASONS, 0) for _ in range(max(1, self.num_workers))]
        yielded = 0
        for images, targets, keys, meta in _loader(_ValPass(self), self.num_workers, self.pin_memory):
            final[meta.worker] = meta.skips
            if images is None:  # a worker's closing item with its final skip counts
                continue
            yielded += len(keys)
            yield (images, targets, keys) if self.return_keys else (images, targets)
        skips = functools.reduce(add_skip_counts, final)
        accounted = yielded + sum(n for reason, n in skips.items() if reason != "unreadable_shard")
        if accounted != self.num_samples:
            _logger.warning("val rank %d: its shards hold %d samples per the index, but %d were yielded, skipped or "
                            "lost; the shards hold more than the index says: rebuild the index", self.rank,
                            self.num_samples, accounted)
        self._skips = skips

    def skip_counts(self) -> dict[str, int]:
        """Samples (shards, for ``unreadable_shard``) this rank skipped in its last pass (one
        evaluation), by reason."""
        return dict(self._skips)


def build_train_stream(shards: str | list[str], *, index: str | None, num_classes: int, rank: int,
                       world_size: int, micro_batch_size: int, num_workers: int, seed: int,
                       image_size: int, augment: AugmentConfig, mixup: MixupSection | None,
                       label_smoothing: float = 0.0, shuffle_buffer: int = 1000, repeated_aug: int = 1,
                       pin_memory: bool = False, return_keys: bool = False, pipeline: str = "pil",
                       augment_on: str = "cpu", global_batch_size: int | None = None) -> TrainStream:
    """The training stream of one rank.

    Args:
        shards: brace pattern, list of URLs, or index JSON path (see ``index.resolve_shards``).
        index: the shards' index JSON (sample counts, classes); ``None`` counts local shards.
        num_classes: labels must lie in ``[0, num_classes)``.
        rank, world_size: this rank and the number of ranks.
        micro_batch_size: samples per batch on this rank.
        num_workers: DataLoader worker processes (0: load in this process).
        seed: base seed of shard order, shuffle buffer and augmentations.
        image_size: side of the training crop, pixels (``data.image_size``).
        augment: training augmentation (``data.augment``).
        mixup: Mixup/CutMix options (``data.mixup``; needs an even micro_batch_size); ``None``, or a
            section that mixes nothing, disables.
        label_smoothing: smoothing of the soft Mixup targets (``loss.label_smoothing``).
        shuffle_buffer: samples in each worker's shuffle buffer (0 or 1 disables).
        repeated_aug: copies of each image trained on per epoch, on consecutive ranks (DeiT's
            repeated augmentation; any count on any number of ranks); 1 disables.
        pin_memory: pin batches in page-locked memory (for GPU training).
        return_keys: also yield each batch's sample keys.
        pipeline: ``pil`` (timm on Pillow images) or ``fast`` (the same augmentation on uint8
            tensors, about twice the images per worker; see ``data.pipelines``).
        augment_on: ``cpu`` (in the workers) or ``gpu`` (``fast`` only: the workers decode and
            crop, ``stream.device_augment`` does the rest on the training device).
        global_batch_size: samples per optimizer step over all ranks (a multiple of
            ``micro_batch_size * world_size``); an epoch is a whole number of steps, the same
            samples on every layout, and resumes on another layout keep each step's samples.
            ``None``: one micro-batch per rank and step.

    Returns:
        The stream; ``steps_per_epoch = total // global_batch_size * accumulation`` micro-batches
        on every rank (``accumulation = global_batch_size // (micro_batch_size * world_size)``).
    """
    _check_common(num_classes, rank, world_size, micro_batch_size, num_workers)
    if shuffle_buffer < 0:
        raise ValueError(f"shuffle_buffer={shuffle_buffer} must be >= 0 (0 disables)")
    if repeated_aug < 1:
        raise ValueError(f"repeated_aug={repeated_aug} must be >= 1 (1 disables repeated augmentation)")
    if mixup is not None and mixup.enabled and micro_batch_size % 2:
        raise ValueError(f"Mixup/CutMix needs an even micro_batch_size, got {micro_batch_size}")
    if global_batch_size is not None and (global_batch_size < 1 or global_batch_size % (micro_batch_size * world_size)):
        raise ValueError(f"global_batch_size={global_batch_size} is not a positive multiple of micro_batch_size x "
                         f"world_size = {micro_batch_size} x {world_size}")
    specs, loaded = resolve_shards(shards, index)
    _check_classes(loaded, index or shards, num_classes)
    streams = world_size * max(1, num_workers)
    if len(specs) < streams:
        raise ValueError(f"{len(specs)} training shards cannot feed {streams} readers (world_size {world_size} x "
                         f"{max(1, num_workers)} workers); write more, smaller shards "
                         f"(tools/make_shards.py --max-samples) or use fewer loader workers")
    stream = TrainStream(specs, num_classes=num_classes, rank=rank, world_size=world_size,
                         micro_batch_size=micro_batch_size, num_workers=num_workers, seed=seed, image_size=image_size,
                         augment=augment, mixup=mixup, label_smoothing=label_smoothing,
                         shuffle_buffer=shuffle_buffer, repeated_aug=repeated_aug,
                         pin_memory=pin_memory, return_keys=return_keys, pipeline=pipeline, augment_on=augment_on,
                         global_batch_size=global_batch_size)
    if stream.steps_per_epoch == 0:
        raise ValueError(f"{stream.total_samples} training samples make no global batch of "
                         f"{stream.global_batch_size} ({micro_batch_size} x {world_size} ranks x "
                         f"{stream.accumulation}); lower the batch size")
    _logger.info("train stream rank %d/%d: %d shards, %d samples, %d steps per epoch of %d x %d", rank, world_size,
                 len(specs), stream.total_samples, stream.steps_per_epoch, micro_batch_size, world_size)
    return stream


def build_val_stream(shards: str | list[str], *, index: str | None, num_classes: int, rank: int,
                     world_size: int, micro_batch_size: int, num_workers: int, image_size: int,
                     augment: AugmentConfig, pin_memory: bool = False, return_keys: bool = False) -> ValStream:
    """The validation stream of one rank: shards dealt to ranks, then to workers, read once.

    Args:
        shards: brace pattern, list of URLs, or index JSON path (see ``index.resolve_shards``).
        index: the shards' index JSON; ``None`` counts local shards.
        num_classes: labels must lie in ``[0, num_classes)``.
        rank, world_size: this rank and the number of ranks.
        micro_batch_size: samples per batch (the last batch of a worker may be smaller).
        num_workers: DataLoader worker processes (0: load in this process).
        image_size: side of the center crop, pixels (``data.image_size``).
        augment: the crop fraction, interpolation and normalisation (``data.augment``).
        pin_memory: pin batches in page-locked memory.
        return_keys: also yield each batch's sample keys.

    Returns:
        The stream; ``num_samples`` summed over ranks equals the index total.
    """
    _check_common(num_classes, rank, world_size, micro_batch_size, num_workers)
    specs, loaded = resolve_shards(shards, index)
    _check_classes(loaded, index or shards, num_classes)
    stream = ValStream(specs, num_classes=num_classes, rank=rank, world_size=world_size,
                       micro_batch_size=micro_batch_size, num_workers=num_workers, image_size=image_size,
                       augment=augment, pin_memory=pin_memory, return_keys=return_keys)
    if len(specs) < world_size:
        _logger.warning("%d validation shards for %d ranks: some ranks validate nothing", len(specs), world_size)
    return stream
