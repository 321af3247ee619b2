"""Write a source's samples into webdataset tar shards ``{name}-000000.tar ...`` with an index
JSON and a class map beside them.

Each sample is stored as ``{key}.{ext}`` (the image bytes unchanged) and ``{key}.cls`` (the label).
The shard boundaries are planned before anything is written, so a re-run after an interruption
keeps every complete shard whose planned content is unchanged and rewrites the rest; each shard is
written under a temporary name and renamed only once it is complete."""
import glob
import hashlib
import json
import logging
import math
import multiprocessing
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import webdataset
from tqdm import tqdm

from anchorformer.atomic import atomic_output
from anchorformer.data.index import (ShardEntry, ShardIndex, class_map_path, index_path, write_index,
                                     write_json_atomic)
from anchorformer.data.sources import SourceListing, SourceSample

__all__ = ["plan_shards", "write_shards", "shard_file_name"]

_logger = logging.getLogger(__name__)

_TAR_BLOCK = 512
_FIXED_MTIME = 946684800  # 2000-01-01: a fixed member time makes re-written shards byte-identical
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class _ShardJob:
    number: int
    samples: list[SourceSample]
    out_dir: str
    name: str


def shard_file_name(name: str, number: int) -> str:
    """File name of shard ``number`` of the shard set ``name``."""
    return f"{name}-{number:06d}.tar"


def _tar_bytes(sample: SourceSample) -> int:
    """Bytes a sample takes in a tar: a header block per member, data padded to whole blocks."""
    image = _TAR_BLOCK + math.ceil(sample.size() / _TAR_BLOCK) * _TAR_BLOCK
    return image + 2 * _TAR_BLOCK  # the .cls member: header + one data block


def plan_shards(samples: list[SourceSample], max_samples: int, max_bytes: int | None = None,
                shuffle_seed: int | None = None) -> list[list[SourceSample]]:
    """Split samples into shards, in order or shuffled with a seed.

    Args:
        samples: the source's samples.
        max_samples: most samples in one shard.
        max_bytes: most (tar) bytes in one shard; ``None`` disables. A single sample larger than
            this gets a shard of its own.
        shuffle_seed: shuffle the samples with this seed before splitting; ``None`` keeps order.

    Returns:
        The samples of each shard.
    """
    if max_samples < 1:
        raise ValueError(f"max_samples={max_samples} must be at least 1 (--max-samples)")
    if max_bytes is not None and max_bytes < 1:
        raise ValueError(f"max_bytes={max_bytes} must be positive, or None to disable (--max-bytes)")
    ordered = list(samples)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(ordered)
    shards: list[list[SourceSample]] = []
    current: list[SourceSample] = []
    current_bytes = 0
    for sample in ordered:
        size = _tar_bytes(sample) if max_bytes is not None else 0
        if current and (len(current) >= max_samples or (max_bytes is not None and current_bytes + size > max_bytes)):
            shards.append(current)
            current, current_bytes = [], 0
        current.append(sample)
        current_bytes += size
    if current:
        shards.append(current)
    return shards


def _plan_digest(samples: list[SourceSample]) -> str:
    """A fingerprint of what a shard will hold: keys, labels and the identity of each image."""
    digest = hashlib.sha256()
    for sample in samples:
        if sample.data is not None:
            identity = hashlib.sha256(sample.data).hexdigest()
        else:
            stat = os.stat(sample.path)
            identity = f"{sample.path}:{stat.st_size}:{stat.st_mtime_ns}"
        digest.update(f"{sample.key}\t{sample.label}\t{sample.ext}\t{identity}\n".encode())
    return digest.hexdigest()


def _write_one_shard(job: _ShardJob) -> ShardEntry:
    """Write one planned shard with webdataset's TarWriter to a temporary name, then rename it."""
    final = Path(job.out_dir) / shard_file_name(job.name, job.number)
    # One tar per planned shard: the boundaries are fixed by the plan (which keeps re-runs
    # resumable and lets shards be written in parallel).
    with atomic_output(final) as partial, webdataset.TarWriter(str(partial), mtime=_FIXED_MTIME) as writer:
        for sample in job.samples:
            writer.write({"__key__": sample.key, sample.ext: sample.read(), "cls": sample.label})
    return ShardEntry(name=final.name, samples=len(job.samples), bytes=final.stat().st_size)


def _manifest_path(out_dir: Path, name: str) -> Path:
    return out_dir / f".{name}-plan.json"


def _read_manifest(path: Path) -> dict[str, str]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))["shards"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return {}


def write_shards(listing: SourceListing, out_dir: str | Path, name: str, *, max_samples: int = 10000,
                 max_bytes: int | None = None, shuffle_seed: int | None = 0, workers: int = 1,
                 progress: bool = True) -> ShardIndex:
    """Write (or complete) the shard set ``name`` in ``out_dir``, its index and class map.

    Args:
        listing: the source's samples and class names.
        out_dir: output folder (created if missing).
        name: shard set name; shards are ``{name}-000000.tar``, ``{name}-000001.tar``, ...
        max_samples: most samples per shard.
        max_bytes: most bytes per shard (``None``: no limit).
        shuffle_seed: shuffle samples with this seed before sharding; ``None`` keeps source order.
        workers: processes writing shards in parallel.
        progress: show a progress bar.

    Returns:
        The index, also written to ``{out_dir}/{name}-index.json``.
    """
    if not _NAME_PATTERN.match(name):
        raise ValueError(f"shard set name {name!r} must be letters, digits, '_', '-' or '.' (--name)")
    if workers < 1:
        raise ValueError(f"workers={workers} must be at least 1 (--workers)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = plan_shards(listing.samples, max_samples, max_bytes, shuffle_seed)
    digests = {shard_file_name(name, number): _plan_digest(samples) for number, samples in enumerate(plan)}
    previous = _read_manifest(_manifest_path(out, name))
    keep = {file for file, digest in digests.items() if previous.get(file) == digest and (out / file).is_file()}
    # Shards from an earlier, different plan must go before the new plan is recorded, or a later
    # re-run would take them for complete.
    for stale in out.glob(f"{glob.escape(name)}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
        if stale.name not in keep:
            stale.unlink()
    write_json_atomic(_manifest_path(out, name), {"shards": digests})
    jobs = [_ShardJob(number, samples, str(out), name) for number, samples in enumerate(plan)
            if shard_file_name(name, number) not in keep]
    _logger.info("%s: %d samples in %d shards (%d kept from an earlier run, %d to write)", out / name,
                 len(listing.samples), len(plan), len(keep), len(jobs))
    entries = {file: ShardEntry(file, len(plan[number]), (out / file).stat().st_size)
               for number, file in enumerate(digests) if file in keep}
    bar = tqdm(total=sum(len(job.samples) for job in jobs), unit="img", desc=f"writing {name} shards",
               disable=not progress)
    with bar:
        if workers == 1 or len(jobs) <= 1:
            for entry in map(_write_one_shard, jobs):
                entries[entry.name] = entry
                bar.update(entry.samples)
        else:
            with multiprocessing.Pool(min(workers, len(jobs))) as pool:
                for entry in pool.imap_unordered(_write_one_shard, jobs):
                    entries[entry.name] = entry
                    bar.update(entry.samples)
    index = ShardIndex(name=name, shards=[entries[file] for file in digests], classes=list(listing.classes),
                       total=len(listing.samples))
    write_json_atomic(class_map_path(out, name), {cls: label for label, cls in enumerate(listing.classes)})
    write_index(index_path(out, name), index)
    return index
