"""The embedded digits dataset: deterministic stratified split, shards cached once, safe when
several processes prepare it at once, and readable by the streams."""
import multiprocessing
from collections import Counter

import pytest

from anchorformer.config import AugmentConfig
from anchorformer.data import build_val_stream, prepare_embedded_dataset
from anchorformer.data.embedded import EMBEDDED_VAL_SIZE, digits_listing
from anchorformer.data.index import read_index


def test_split_is_deterministic_stratified_and_disjoint():
    train, val = digits_listing("train", 16), digits_listing("val", 16)
    assert len(train.samples) == 1500 and len(val.samples) == EMBEDDED_VAL_SIZE == 297
    assert not {s.key for s in train.samples} & {s.key for s in val.samples}
    assert [s.key for s in digits_listing("val", 16).samples] == [s.key for s in val.samples]
    per_class = Counter(s.label for s in val.samples)
    assert sorted(per_class) == list(range(10)) and min(per_class.values()) >= 28


def test_prepare_writes_shards_once_and_reuses_the_cache(tmp_path):
    dataset = prepare_embedded_dataset(tmp_path, image_size=24)
    assert dataset.num_classes == 10
    assert read_index(dataset.train_index).total == 1500 and read_index(dataset.val_index).total == 297
    shard = tmp_path / "digits-24px" / "val-000000.tar"
    written = shard.stat().st_mtime_ns
    assert prepare_embedded_dataset(tmp_path, image_size=24) == dataset
    assert shard.stat().st_mtime_ns == written
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary folder may be left"

    stream = build_val_stream(dataset.val_shards, index=dataset.val_index, num_classes=10, rank=0, world_size=1,
                              micro_batch_size=64, num_workers=2,
                              image_size=24, augment=AugmentConfig(crop_pct=1.0), return_keys=True)
    keys = []
    for images, _, batch_keys in stream:
        assert images.shape[1:] == (3, 24, 24)
        keys += batch_keys
    assert sorted(keys) == sorted(s.key for s in digits_listing("val", 8).samples)


def _prepare(cache_dir: str) -> str:
    return prepare_embedded_dataset(cache_dir, image_size=16).train_shards


@pytest.mark.slow
def test_two_processes_preparing_at_once_get_the_same_complete_cache(tmp_path):
    with multiprocessing.get_context("fork").Pool(2) as pool:
        results = pool.map(_prepare, [str(tmp_path)] * 2)
    assert results[0] == results[1]
    assert read_index(tmp_path / "digits-16px" / "train-index.json").total == 1500
    assert [p.name for p in tmp_path.iterdir()] == ["digits-16px"]
