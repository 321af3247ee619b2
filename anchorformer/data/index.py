"""The shard index JSON written beside the shards (shard names, samples per shard, classes,
total) and the resolution of a user's shard specification (brace pattern, list, or index JSON)
into URLs with their sample counts."""
import json
import logging
import os
import re
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from anchorformer.atomic import atomic_write_bytes

__all__ = ["INDEX_FORMAT", "ShardEntry", "ShardIndex", "ShardSpec", "write_json_atomic", "write_index",
           "read_index", "index_path", "class_map_path", "find_index", "resolve_shards"]

_logger = logging.getLogger(__name__)

INDEX_FORMAT = "anchorformer-shards/1"


@dataclass(frozen=True)
class ShardEntry:
    """One shard in the index: its file name (relative to the index), samples and bytes."""
    name: str
    samples: int
    bytes: int


@dataclass(frozen=True)
class ShardIndex:
    """The content of ``{name}-index.json``."""
    name: str
    shards: list[ShardEntry]
    classes: list[str]
    total: int
    format: str = INDEX_FORMAT

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass(frozen=True)
class ShardSpec:
    """A resolved shard: the URL webdataset opens and its sample count."""
    url: str
    samples: int


def index_path(folder: str | Path, name: str) -> Path:
    """Where the index of the shards ``{name}-NNNNNN.tar`` in ``folder`` lives."""
    return Path(folder) / f"{name}-index.json"


def class_map_path(folder: str | Path, name: str) -> Path:
    """Where the class-name -> label map of the shards ``{name}-NNNNNN.tar`` lives."""
    return Path(folder) / f"{name}-classes.json"


def write_json_atomic(path: str | Path, content: object) -> None:
    """Write ``content`` as JSON to ``path`` atomically (its folder is created if missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(content, indent=1) + "\n").encode("utf-8"))


def write_index(path: str | Path, index: ShardIndex) -> None:
    """Write ``index`` atomically as JSON."""
    write_json_atomic(path, asdict(index))


def read_index(path: str | Path) -> ShardIndex:
    """Read and check an index JSON.

    Args:
        path: a ``{name}-index.json`` written by ``tools/make_shards.py``.

    Returns:
        The index; a missing, malformed or empty index raises ``ValueError`` naming ``path``.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"shard index {path} does not exist; write it with tools/make_shards.py")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        index = ShardIndex(name=raw["name"], shards=[ShardEntry(**entry) for entry in raw["shards"]],
                           classes=list(raw["classes"]), total=int(raw["total"]), format=raw["format"])
    except (json.JSONDecodeError, KeyError, TypeError) as exn:
        raise ValueError(f"shard index {path} is not an index written by tools/make_shards.py: {exn!r}") from exn
    if index.format != INDEX_FORMAT:
        raise ValueError(f"shard index {path} has format {index.format!r}; this version reads {INDEX_FORMAT!r}")
    if not index.shards or index.total <= 0:
        raise ValueError(f"shard index {path} lists no samples; re-run tools/make_shards.py on a non-empty source")
    counted = sum(entry.samples for entry in index.shards)
    if counted != index.total:
        raise ValueError(f"shard index {path} is inconsistent: total {index.total} but shards hold {counted}")
    return index


def find_index(shards: str, index: str | Path | None = None) -> Path | None:
    """The index JSON of a shard specification: ``index`` when given, ``shards`` itself when it is
    an index, else ``{name}-index.json`` beside the first local shard ``{name}-NNNNNN.tar``.

    Returns:
        The path, or None when the shards have no index beside them.
    """
    if index is not None:
        return Path(index)
    if str(shards).endswith(".json"):
        return Path(shards)
    first = expand_urls(str(shards))[0]
    shard = re.fullmatch(r"(.*)-\d{6}\.tar", _local_path(first)) if _is_local(first) else None
    if shard is None:
        return None
    found = Path(f"{shard.group(1)}-index.json")
    return found if found.is_file() else None


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def _local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def _count_tar_samples(path: str) -> int:
    """Samples (distinct keys) in a local tar; a damaged tar counts those before the damage."""
    keys = set()
    try:
        with tarfile.open(path, "r") as tar:
            keys.update(base_plus_ext(member.name)[0] for member in tar if member.isreg())
    except (tarfile.TarError, OSError) as exn:
        _logger.warning("shard %s is damaged (%r): counted the %d samples before the damage", path, exn, len(keys))
    return len(keys)


def _shard_file_name(url: str) -> str:
    """The ``*.tar`` file name inside a path or URL (``pipe:`` commands included)."""
    names = re.findall(r"[^/\s]+\.tar\b", url)
    return names[-1] if names else url


def resolve_shards(shards: str | list[str], index: str | Path | None) -> tuple[list[ShardSpec], ShardIndex | None]:
    """Turn a shard specification into URLs with sample counts.

    Args:
        shards: a brace pattern (``/data/train-{000000..000127}.tar``, several joined by ``::``),
            a list of URLs, or the path of an index JSON (its shards, relative to it). Local
            paths, ``file://`` and ``pipe:`` URLs are accepted.
        index: the index JSON whose per-shard counts are used; shards are matched to it by file
            name. ``None``: the index named by ``shards`` if that is one, else local tars are
            counted by reading their headers (``pipe:`` URLs then need an index).

    Returns:
        The shards in the given order and the index (``None`` if samples were counted).
    """
    if isinstance(shards, (str, Path)) and str(shards).endswith(".json"):
        index = index or shards
        loaded = read_index(index)
        folder = Path(shards).parent
        urls = [str(folder / entry.name) for entry in loaded.shards]
    else:
        urls = expand_urls(str(shards)) if isinstance(shards, (str, Path)) else [str(url) for url in shards]
        loaded = read_index(index) if index is not None else None
    if not urls:
        raise ValueError(f"shard specification {shards!r} names no shard")
    missing = [url for url in urls if _is_local(url) and not os.path.isfile(_local_path(url))]
    if missing:
        raise ValueError(f"shard pattern {shards!r} matches no file for {len(missing)} of {len(urls)} shards, "
                         f"e.g. {missing[0]}; check the path or write the shards with tools/make_shards.py")
    if loaded is None:
        remote = [url for url in urls if not _is_local(url)]
        if remote:
            raise ValueError(f"cannot count the samples of {remote[0]} without reading it; pass the shards' "
                             f"index JSON (written by tools/make_shards.py) as index=")
        _logger.info("no shard index given: counting the samples of %d shards", len(urls))
        return [ShardSpec(url, _count_tar_samples(_local_path(url))) for url in urls], None
    counts = {entry.name: entry.samples for entry in loaded.shards}
    specs = []
    for url in urls:
        name = _shard_file_name(url)
        if name not in counts:
            raise ValueError(f"shard {url} is not listed in the index {index}; pass the index written "
                             f"together with these shards")
        specs.append(ShardSpec(url, counts[name]))
    return specs, loaded
