"""Real images and shards for the data tests: JPEG files made from scikit-learn's digits, shards
written with the project's writer, and hand-made damaged shards.

Imported explicitly by tests/test_make_shards.py, tests/test_shards.py and tests/test_embedded.py."""
import io
import json
import tarfile
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from anchorformer.data.sources import SourceListing, SourceSample
from anchorformer.data.writer import write_shards

_DIGITS = load_digits()


def digit_jpeg(number: int, size: int = 16) -> bytes:
    """Digit image ``number`` of the scikit-learn set as RGB JPEG bytes of ``size`` pixels."""
    pixels = np.round(_DIGITS.images[number] * (255.0 / 16.0)).astype(np.uint8)
    image = Image.fromarray(pixels, mode="L").resize((size, size), Image.Resampling.BILINEAR).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_jpeg_tree(root: Path, images_per_class: dict[str, int], size: int = 16) -> dict[str, int]:
    """Write ``root/<class>/<class>_<i>.jpg`` files; returns {relative path without suffix: label}
    with labels by sorted class name (the ImageFolder convention)."""
    labels = {}
    number = 0
    for label, name in enumerate(sorted(images_per_class)):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(images_per_class[name]):
            (root / name / f"{name}_{i}.jpg").write_bytes(digit_jpeg(number, size))
            labels[f"{name}/{name}_{i}"] = label
            number += 1
    return labels


def jpeg_listing(count: int, num_classes: int, size: int = 16, prefix: str = "img") -> SourceListing:
    """``count`` in-memory JPEG samples keyed ``{prefix}_NNNN`` with labels ``i % num_classes``."""
    samples = [SourceSample(key=f"{prefix}_{i:04d}", label=i % num_classes, ext="jpg", data=digit_jpeg(i, size))
               for i in range(count)]
    return SourceListing(samples=samples, classes=[str(label) for label in range(num_classes)])


def write_jpeg_shards(folder: Path, name: str, count: int, per_shard: int, num_classes: int = 10,
                      size: int = 16) -> tuple[str, str]:
    """Shards of ``count`` JPEG samples, ``per_shard`` each; returns (brace pattern, index path)."""
    index = write_shards(jpeg_listing(count, num_classes, size, prefix=name), folder, name, max_samples=per_shard,
                         shuffle_seed=None, progress=False)
    pattern = str(folder / f"{name}-{{000000..{len(index.shards) - 1:06d}}}.tar")
    return pattern, str(folder / f"{name}-index.json")


def write_raw_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A tar shard with exactly the given (member name, bytes) entries, in order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def interrupted_batches(make_stream: Callable[[], object], stop: int) -> list:
    """A training stream stopped after ``stop`` batches, its state saved through JSON, and a fresh
    stream from ``make_stream`` resumed from that state: the batches before the stop, then after."""
    first = make_stream()
    before = [batch for _, batch in zip(range(stop), first)]
    state = json.loads(json.dumps(first.state_dict()))
    resumed = make_stream()
    resumed.load_state_dict(state)
    return before + list(resumed)
