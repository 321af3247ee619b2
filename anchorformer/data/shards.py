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

Validation: the shards are dealt to ranks, then workers, read once in order; every sample is
yielded once overall, ranks may yield different numbers of batches, nothing is padded."""
import functools
import itertools
import logging
import random
from typing import Iterator

import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from anchorformer.data.index import ShardIndex, ShardSpec, resolve_shards
from anchorformer.data.pipelines import build_train_pipeline
from anchorformer.data.stages import (SKIP_REASONS, BatchMeta, SkipCounter, add_skip_counts, batch_samples,
                                      count_shard_samples, decode_samples, derive_seed, end_with_counts,
                                      number_samples, transform_samples)
from anchorformer.data.transforms import EvalTransformConfig, MixupConfig, TrainTransformConfig, build_eval_transform
from anchorformer.data.workers import init_worker

__all__ = ["TrainStream", "ValStream", "build_train_stream", "build_val_stream"]

_logger = logging.getLogger(__name__)

_SHUFFLE_INITIAL = 100
_RESUME_KEYS = ("seed", "rank", "world_size", "num_workers", "micro_batch_size", "repeated_aug", "shuffle_buffer",
                "steps_per_epoch")


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


class _TrainEpoch(IterableDataset):
    """One pass over the rest of an epoch: each DataLoader worker plays one logical worker."""

    def __init__(self, stream: "TrainStream", epoch: int, start_batch: int, start_positions: list[int]):
        super().__init__()
        self.plan = stream
        self.epoch = epoch
        self.start_batch = start_batch
        self.start_positions = start_positions

    def __iter__(self) -> Iterator[tuple]:
        plan, workers = self.plan, self.plan.logical_workers
        # Batches are handed out round-robin from DataLoader worker 0, so the worker that gets the
        # next batch of the epoch (start_batch) must play logical worker start_batch % workers.
        logical = (_worker_slot(workers) + self.start_batch) % workers
        dealt = _deal_shards(plan.shards, plan.world_size * workers, plan.seed, self.epoch)
        counter = SkipCounter(where=f"train rank {plan.rank} worker {logical}")
        start = self.start_positions[logical]
        copies = []
        for copy, followed_rank in enumerate(_followed_ranks(plan.rank, plan.world_size, plan.repeated_aug)):
            stream = followed_rank * workers + logical
            where = counter.where + (f" copy {copy}" if plan.repeated_aug > 1 else "")
            copy_counter = SkipCounter(where=where, counts=counter.counts)  # one tally per worker
            samples = _epoch_samples([plan.shards[i] for i in dealt[stream]], plan.seed, self.epoch, stream,
                                     plan.shuffle_buffer // plan.repeated_aug, copy_counter)
            already_taken = max(0, -(-(start - copy) // plan.repeated_aug))  # positions < start from this copy
            copies.append(number_samples(samples, start=already_taken, counter=copy_counter))
        first = self.start_batch + (logical - self.start_batch) % workers
        stages = [
            functools.partial(_take_in_turn, copies, start),
            functools.partial(decode_samples, num_classes=plan.num_classes, counter=counter,
                              decoder=plan.pipeline.decode),
            functools.partial(transform_samples, transform=plan.pipeline.transform,
                              seed_parts=(plan.seed, self.epoch, plan.rank, logical)),
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
                 micro_batch_size: int, num_workers: int, seed: int, transform: TrainTransformConfig,
                 mixup: MixupConfig | None, shuffle_buffer: int, repeated_aug: int, pin_memory: bool,
                 return_keys: bool, pipeline: str = "pil", augment_on: str = "cpu"):
        self.shards = shards
        self.num_classes = num_classes
        self.rank, self.world_size = rank, world_size
        self.micro_batch_size = micro_batch_size
        self.num_workers = num_workers
        self.logical_workers = max(1, num_workers)
        self.seed = seed
        self.pipeline = build_train_pipeline(transform, mixup, num_classes, pipeline, augment_on)
        self.device_augment = self.pipeline.device_augment
        self.shuffle_buffer = shuffle_buffer
        self.repeated_aug = repeated_aug
        self.pin_memory = pin_memory
        self.return_keys = return_keys
        self.total_samples = sum(shard.samples for shard in shards)
        self.steps_per_epoch = self.total_samples // (micro_batch_size * world_size)
        self._epoch = 0
        self._batches = 0
        self._positions = [0] * self.logical_workers
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

    def __len__(self) -> int:
        return self.steps_per_epoch - self._batches

    def __iter__(self) -> Iterator[tuple]:
        start = self._batches
        if start >= self.steps_per_epoch:
            return
        dataset = _TrainEpoch(self, self._epoch, start, list(self._positions))
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

    def state_dict(self) -> dict:
        """A small JSON-serialisable state: where this rank is in which epoch, and the settings
        the sample order depends on."""
        return {"epoch": self._epoch, "batches": self._batches, "positions": list(self._positions),
                "skips": dict(self._skips), **self._settings()}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where ``state`` was taken: the next ``__iter__`` yields the batches an
        uninterrupted run would have yielded next.

        Args:
            state: a ``state_dict()`` of a stream built with the same settings.
        """
        changed = [f"{key}: saved {state.get(key)!r}, now {value!r}" for key, value in self._settings().items()
                   if state.get(key) != value]
        if changed:
            raise ValueError("cannot resume the training data stream exactly, its settings changed ("
                             + "; ".join(changed) + "); resume with the same data settings, world size and "
                             "number of loader workers")
        if len(state["positions"]) != self.logical_workers or not 0 <= state["batches"] <= self.steps_per_epoch:
            raise ValueError(f"data stream state {state} does not fit {self.logical_workers} workers and "
                             f"{self.steps_per_epoch} steps per epoch")
        self._epoch, self._batches = int(state["epoch"]), int(state["batches"])
        self._positions = [int(position) for position in state["positions"]]
        self._skips = add_skip_counts(dict.fromkeys(SKIP_REASONS, 0), state["skips"])

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
                 micro_batch_size: int, num_workers: int, transform: EvalTransformConfig, pin_memory: bool,
                 return_keys: bool):
        self.rank_shards = shards[rank::world_size]
        self.num_classes = num_classes
        self.rank = rank
        self.micro_batch_size = micro_batch_size
        self.num_workers = num_workers
        self.transform = build_eval_transform(transform)
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
                       transform: TrainTransformConfig, mixup: MixupConfig | None, shuffle_buffer: int = 1000,
                       repeated_aug: int = 1, pin_memory: bool = False, return_keys: bool = False,
                       pipeline: str = "pil", augment_on: str = "cpu") -> TrainStream:
    """The training stream of one rank.

    Args:
        shards: brace pattern, list of URLs, or index JSON path (see ``index.resolve_shards``).
        index: the shards' index JSON (sample counts, classes); ``None`` counts local shards.
        num_classes: labels must lie in ``[0, num_classes)``.
        rank, world_size: this rank and the number of ranks.
        micro_batch_size: samples per batch on this rank.
        num_workers: DataLoader worker processes (0: load in this process).
        seed: base seed of shard order, shuffle buffer and augmentations.
        transform: training augmentation.
        mixup: Mixup/CutMix options, ``None`` disables (needs an even micro_batch_size).
        shuffle_buffer: samples in each worker's shuffle buffer (0 or 1 disables).
        repeated_aug: copies of each image trained on per epoch, on consecutive ranks (DeiT's
            repeated augmentation; any count on any number of ranks); 1 disables.
        pin_memory: pin batches in page-locked memory (for GPU training).
        return_keys: also yield each batch's sample keys.
        pipeline: ``pil`` (timm on Pillow images) or ``fast`` (the same augmentation on uint8
            tensors, about twice the images per worker; see ``data.pipelines``).
        augment_on: ``cpu`` (in the workers) or ``gpu`` (``fast`` only: the workers decode and
            crop, ``stream.device_augment`` does the rest on the training device).

    Returns:
        The stream; ``steps_per_epoch = total // (micro_batch_size * world_size)`` on every rank.
    """
    _check_common(num_classes, rank, world_size, micro_batch_size, num_workers)
    if shuffle_buffer < 0:
        raise ValueError(f"shuffle_buffer={shuffle_buffer} must be >= 0 (0 disables)")
    if repeated_aug < 1:
        raise ValueError(f"repeated_aug={repeated_aug} must be >= 1 (1 disables repeated augmentation)")
    if mixup is not None and micro_batch_size % 2:
        raise ValueError(f"Mixup/CutMix needs an even micro_batch_size, got {micro_batch_size}")
    specs, loaded = resolve_shards(shards, index)
    _check_classes(loaded, index or shards, num_classes)
    streams = world_size * max(1, num_workers)
    if len(specs) < streams:
        raise ValueError(f"{len(specs)} training shards cannot feed {streams} readers (world_size {world_size} x "
                         f"{max(1, num_workers)} workers); write more, smaller shards "
                         f"(tools/make_shards.py --max-samples) or use fewer loader workers")
    stream = TrainStream(specs, num_classes=num_classes, rank=rank, world_size=world_size,
                         micro_batch_size=micro_batch_size, num_workers=num_workers, seed=seed, transform=transform,
                         mixup=mixup, shuffle_buffer=shuffle_buffer, repeated_aug=repeated_aug,
                         pin_memory=pin_memory, return_keys=return_keys, pipeline=pipeline, augment_on=augment_on)
    if stream.steps_per_epoch == 0:
        raise ValueError(f"{stream.total_samples} training samples make no global batch of "
                         f"{micro_batch_size} x {world_size} ranks; lower the micro batch size")
    _logger.info("train stream rank %d/%d: %d shards, %d samples, %d steps per epoch of %d x %d", rank, world_size,
                 len(specs), stream.total_samples, stream.steps_per_epoch, micro_batch_size, world_size)
    return stream


def build_val_stream(shards: str | list[str], *, index: str | None, num_classes: int, rank: int,
                     world_size: int, micro_batch_size: int, num_workers: int, transform: EvalTransformConfig,
                     pin_memory: bool = False, return_keys: bool = False) -> ValStream:
    """The validation stream of one rank: shards dealt to ranks, then to workers, read once.

    Args:
        shards: brace pattern, list of URLs, or index JSON path (see ``index.resolve_shards``).
        index: the shards' index JSON; ``None`` counts local shards.
        num_classes: labels must lie in ``[0, num_classes)``.
        rank, world_size: this rank and the number of ranks.
        micro_batch_size: samples per batch (the last batch of a worker may be smaller).
        num_workers: DataLoader worker processes (0: load in this process).
        transform: resize + center-crop options.
        pin_memory: pin batches in page-locked memory.
        return_keys: also yield each batch's sample keys.

    Returns:
        The stream; ``num_samples`` summed over ranks equals the index total.
    """
    _check_common(num_classes, rank, world_size, micro_batch_size, num_workers)
    specs, loaded = resolve_shards(shards, index)
    _check_classes(loaded, index or shards, num_classes)
    stream = ValStream(specs, num_classes=num_classes, rank=rank, world_size=world_size,
                       micro_batch_size=micro_batch_size, num_workers=num_workers, transform=transform,
                       pin_memory=pin_memory, return_keys=return_keys)
    if len(specs) < world_size:
        _logger.warning("%d validation shards for %d ranks: some ranks validate nothing", len(specs), world_size)
    return stream
