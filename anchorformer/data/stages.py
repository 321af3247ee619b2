"""Pipeline stages that run inside each DataLoader worker, between webdataset's tar reader and the
batches the trainer receives: sample numbering and fast-forward (for exact resume), decoding with
skip counting, seeded per-sample transforms, and batching that carries the worker's state.

Every stage is a module-level callable (picklable) taking and returning an iterator."""
import contextlib
import hashlib
import io
import logging
import random
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import get_worker_info

from anchorformer.data.index import ShardSpec
from anchorformer.data.sources import IMAGE_EXTENSIONS

__all__ = ["SKIP_REASONS", "SkipCounter", "BatchMeta", "derive_seed", "seeded_rngs", "count_shard_samples",
           "number_samples",
           "decode_pil", "decode_samples", "transform_samples", "batch_samples", "mix_batches", "end_with_counts",
           "add_skip_counts"]

_logger = logging.getLogger(__name__)

SKIP_REASONS = ("decode_error", "missing_image", "missing_label", "unreadable_shard", "lost_in_shard")
"""Why samples are skipped, by every stream (shards and the dense readers): image bytes PIL cannot
decode, a sample without an image or without a valid label (a shard sample's integer ``cls``, an
ADE20K label PNG of the image's size), a shard that could not be opened or read to its end (counted
once per shard and pass), and samples the index promises for a shard that the damaged shard did not
deliver (counted when the reader is past the shard, once per pass). A shard stream's delivered,
skipped and lost samples add up to the index's count."""

_LOGGED_PER_REASON = 10


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts`` that is the same in every process (unlike ``hash``)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed would also visit every device


@contextlib.contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's CPU RNGs (which timm's transforms and Mixup draw from)
    for the block. In the training process itself (``num_workers=0``) their states are restored
    afterwards so the caller's randomness is untouched; a loader worker owns its RNGs, and saving
    NumPy's state would cost more than the seeding."""
    if get_worker_info() is not None:
        _seed_all(seed)
        yield
        return
    python_state, numpy_state = random.getstate(), np.random.get_state()
    torch_state = torch.default_generator.get_state()
    _seed_all(seed)
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.default_generator.set_state(torch_state)


@dataclass
class SkipCounter:
    """Skipped samples of one worker by reason; also the webdataset error handler for shards."""
    where: str
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    counting: bool = True
    samples_read: int = 0
    current_shard: str = ""
    failed_shards: set[tuple[int, str]] = field(default_factory=set)
    shard_pass: int = 0

    def skip(self, reason: str, message: str, samples: int = 1) -> None:
        """Count ``samples`` skipped (unless fast-forwarding over samples already counted) and log
        it, at most ``_LOGGED_PER_REASON`` times per reason, then every 1000th."""
        if not self.counting:
            return
        self.counts[reason] += samples
        count = self.counts[reason]
        if count - samples < _LOGGED_PER_REASON or count // 1000 > (count - samples) // 1000:
            suffix = "; further ones are logged every 1000th" if count - samples < _LOGGED_PER_REASON <= count else ""
            _logger.warning("%s: skipped (%s #%d) %s%s", self.where, reason, count, message, suffix)

    def shard_error(self, exn: Exception) -> bool:
        """webdataset handler: log and count a shard that cannot be opened or read, go on."""
        if (self.shard_pass, self.current_shard) not in self.failed_shards:
            self.failed_shards.add((self.shard_pass, self.current_shard))
            self.skip("unreadable_shard", f"shard {self.current_shard}: {exn!r}; going on with the next shard")
        return True


@dataclass(frozen=True)
class BatchMeta:
    """What a worker sends with each batch: which logical worker made it, how many samples (after
    the shuffle buffer) that worker has consumed, its cumulative skip counts, and (training) the
    batch's number in the epoch."""
    worker: int
    position: int
    skips: dict[str, int]
    batch: int = -1


@dataclass(frozen=True)
class _Decoded:
    key: str
    image: object
    label: int
    position: int


def count_shard_samples(samples: Iterable[dict], shards: list[ShardSpec], counter: SkipCounter) -> Iterator[dict]:
    """Pass on the tar reader's samples of ``shards`` (read in this order), counting each in
    ``counter.samples_read`` and, once the reader is past a shard, the samples its index entry
    promised but it did not deliver (``lost_in_shard``: truncated or unreadable)."""
    pending = iter(shards)
    shard, delivered = None, 0
    for sample in samples:
        while shard is None or sample["__url__"] != shard.url:  # the reader moved on: shards before are done
            if shard is not None:
                _count_lost(shard, delivered, counter)
            shard, delivered = next(pending), 0
        delivered += 1
        counter.samples_read += 1
        yield sample
    for rest in ([shard] if shard is not None else []) + list(pending):
        _count_lost(rest, delivered if rest is shard else 0, counter)


def _count_lost(shard: ShardSpec, delivered: int, counter: SkipCounter) -> None:
    if delivered < shard.samples:
        counter.skip("lost_in_shard", f"shard {shard.url} delivered {delivered} of the {shard.samples} samples its "
                                      f"index promises", samples=shard.samples - delivered)


def number_samples(samples: Iterable[dict], start: int, counter: SkipCounter) -> Iterator[dict]:
    """Number the samples as they leave the shuffle buffer and drop the first ``start`` of them
    without decoding (fast-forward on resume). Counting skips resumes with the reads that fetch
    sample ``start``: an uninterrupted run made them after its checkpoint."""
    counter.counting = start == 0
    for position, sample in enumerate(samples):
        if position < start:
            counter.counting = position == start - 1
            continue
        sample["__position__"] = position
        yield sample


def _label(sample: dict) -> int | None:
    raw = sample.get("cls")
    if raw is None:
        return None
    try:
        return int(raw.decode("ascii").strip() if isinstance(raw, bytes) else raw)
    except (ValueError, UnicodeDecodeError):
        return None


def decode_pil(data: bytes) -> Image.Image:
    """Image bytes -> RGB Pillow image."""
    with Image.open(io.BytesIO(data)) as opened:
        return opened.convert("RGB")


def decode_samples(samples: Iterable[dict], num_classes: int, counter: SkipCounter,
                   decoder: Callable[[bytes], object] = decode_pil) -> Iterator[_Decoded]:
    """Decode each sample's image with ``decoder`` (Pillow, RGB, by default) and parse its ``cls``;
    skip and count samples without a valid label or image. A label outside ``[0, num_classes)``
    stops the run."""
    for sample in samples:
        key, shard = sample["__key__"], sample.get("__url__", "?")
        label = _label(sample)
        if label is None:
            counter.skip("missing_label", f"sample {key} in shard {shard} has no integer 'cls'")
            continue
        if not 0 <= label < num_classes:
            raise ValueError(f"sample {key} in shard {shard} has label {label} outside [0, {num_classes}); "
                             f"set num_classes to the dataset's class count or rewrite the shards")
        ext = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
        if ext is None:
            counter.skip("missing_image", f"sample {key} in shard {shard} has no image ({', '.join(IMAGE_EXTENSIONS)})")
            continue
        try:
            image = decoder(sample[ext])
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exn:
            counter.skip("decode_error", f"sample {key} in shard {shard}: {exn!r}")
            continue
        yield _Decoded(key, image, label, sample["__position__"])


def transform_samples(samples: Iterable[_Decoded], transform: Callable,
                      seed_parts: tuple | None) -> Iterator[_Decoded]:
    """Apply ``transform`` to each image. With ``seed_parts`` the RNGs are seeded from them and the
    sample's position, so an augmentation does not depend on what ran before it (exact resume);
    ``None`` is for deterministic transforms."""
    for sample in samples:
        if seed_parts is None:
            image = transform(sample.image)
        else:
            with seeded_rngs(derive_seed(*seed_parts, sample.position)):
                image = transform(sample.image)
        yield _Decoded(sample.key, image, sample.label, sample.position)


def batch_samples(samples: Iterable[_Decoded], batch_size: int, batch_numbers: Iterable[int] | None,
                  worker: int, counter: SkipCounter, partial: bool,
                  stack: Callable[[list], object] = torch.stack) -> Iterator[tuple]:
    """Stack samples into ``(images, targets int64, keys, BatchMeta)`` batches.

    Unlike webdataset's ``batched``, which reads one sample past a full batch before yielding it,
    a batch is yielded as soon as it is full, so the position and skip counts sent with it cover
    exactly the samples up to its last one.

    Args:
        samples: transformed samples.
        batch_size: samples per batch.
        batch_numbers: the epoch batch number of each batch this worker makes, in order; the
            stream stops after the last one. ``None``: until the samples run out.
        worker: the logical worker id sent in each BatchMeta.
        counter: this worker's skip counter.
        partial: yield a final smaller batch when the samples run out (validation).
        stack: the transformed images -> the batch's images.
    """
    numbers = iter(batch_numbers) if batch_numbers is not None else None
    number = next(numbers, None) if numbers is not None else -1
    if number is None:
        return
    batch: list[_Decoded] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == batch_size:
            yield _collate(batch, worker, counter, number, stack)
            batch = []
            number = next(numbers, None) if numbers is not None else -1
            if number is None:
                return
    if batch and partial:
        yield _collate(batch, worker, counter, number, stack)


def _collate(batch: list[_Decoded], worker: int, counter: SkipCounter, number: int,
             stack: Callable[[list], object]) -> tuple:
    images = stack([sample.image for sample in batch])
    targets = torch.tensor([sample.label for sample in batch], dtype=torch.int64)
    meta = BatchMeta(worker=worker, position=batch[-1].position + 1, skips=dict(counter.counts), batch=number)
    return images, targets, [sample.key for sample in batch], meta


def add_skip_counts(skips: dict[str, int], more: dict[str, int]) -> dict[str, int]:
    """Sum two skip-count dicts reason by reason."""
    return {reason: skips.get(reason, 0) + more.get(reason, 0) for reason in SKIP_REASONS}


def mix_batches(batches: Iterable[tuple], mixup: Callable, seed_parts: tuple) -> Iterator[tuple]:
    """Apply Mixup/CutMix to each batch with the RNGs seeded from ``seed_parts`` and the batch
    number; targets become float (B, num_classes)."""
    for images, targets, keys, meta in batches:
        with seeded_rngs(derive_seed(*seed_parts, meta.batch)):
            images, targets = mixup(images, targets)
        yield images, targets, keys, meta


def end_with_counts(batches: Iterable[tuple], worker: int, counter: SkipCounter) -> Iterator[tuple]:
    """Pass the batches on, then send one item without images carrying the final skip counts
    (skips after a worker's last batch would otherwise never reach the trainer)."""
    yield from batches
    yield None, None, [], BatchMeta(worker=worker, position=-1, skips=dict(counter.counts))
