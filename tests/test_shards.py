"""The train/val shard streams with real JPEG shards and real DataLoader workers: disjoint
coverage across 2 ranks x 2 workers, equal step counts, exact resume, validation exactly once, and
bad input skipped and counted or stopped with a named message (repeated augmentation:
tests/test_repeated_aug.py)."""
import dataclasses
import json
import random
from collections import Counter

import pytest
import torch
from data_fixtures import digit_jpeg, jpeg_listing, write_jpeg_shards, write_raw_tar

from anchorformer.config import AugmentConfig, MixupSection
from anchorformer.data import build_train_stream, build_val_stream
from anchorformer.data.sources import SourceListing
from anchorformer.data.writer import write_shards

NUM_CLASSES = 10
SIZE = 16
TRAIN_AUGMENT = AugmentConfig(scale=(0.5, 1.0), re_prob=0.25)
EVAL_AUGMENT = AugmentConfig(crop_pct=1.0)


@pytest.fixture(scope="module")
def even_shards(tmp_path_factory):
    """64 training samples in 8 shards of 8."""
    return write_jpeg_shards(tmp_path_factory.mktemp("even"), "train", count=64, per_shard=8)


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory):
    """50 samples in shards of 7 (the last holds 1)."""
    return write_jpeg_shards(tmp_path_factory.mktemp("uneven"), "val", count=50, per_shard=7)


def _train(shards, *, rank=0, world_size=1, num_workers=2, batch=4, seed=3, mixup=None, shuffle_buffer=16):
    pattern, index = shards
    return build_train_stream(pattern, index=index, num_classes=NUM_CLASSES, rank=rank, world_size=world_size,
                              micro_batch_size=batch, num_workers=num_workers, seed=seed, image_size=SIZE,
                              augment=TRAIN_AUGMENT, mixup=mixup, label_smoothing=0.1, shuffle_buffer=shuffle_buffer,
                              return_keys=True)


def _val(shards, *, rank=0, world_size=1, num_workers=2, batch=4, index="from-shards", num_classes=NUM_CLASSES):
    pattern, index_path = shards
    return build_val_stream(pattern, index=index_path if index == "from-shards" else index, num_classes=num_classes,
                            rank=rank, world_size=world_size, micro_batch_size=batch, num_workers=num_workers,
                            image_size=SIZE, augment=EVAL_AUGMENT, return_keys=True)


def _keys(stream) -> list[str]:
    return [key for _, _, keys in stream for key in keys]


def test_two_ranks_two_workers_cover_the_epoch_disjointly_with_equal_steps(even_shards):
    streams = [_train(even_shards, rank=rank, world_size=2) for rank in range(2)]
    assert [stream.steps_per_epoch for stream in streams] == [8, 8]
    per_rank = []
    for stream in streams:
        batches = list(stream)
        assert len(batches) == 8
        images, targets, _ = batches[0]
        assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32 and targets.dtype == torch.int64
        per_rank.append([key for _, _, keys in batches for key in keys])
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == [f"train_{i:04d}" for i in range(64)]
    streams[0].set_epoch(1)
    next_epoch = _keys(streams[0])
    assert len(next_epoch) == 32 and next_epoch != per_rank[0]


def test_uneven_shards_still_give_every_rank_the_same_steps(uneven_shards):
    counts = [len(list(_train(uneven_shards, rank=rank, world_size=2, batch=3))) for rank in range(2)]
    assert counts == [50 // 6, 50 // 6]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_at_a_random_point_reproduces_the_uninterrupted_batches(even_shards, num_workers):
    mixup = MixupSection(mixup_alpha=0.8, cutmix_alpha=1.0)
    uninterrupted = list(_train(even_shards, rank=1, world_size=2, num_workers=num_workers, mixup=mixup))
    stop = random.Random(num_workers).randrange(1, 7)
    first = _train(even_shards, rank=1, world_size=2, num_workers=num_workers, mixup=mixup)
    before = [batch for _, batch in zip(range(stop), first)]
    state = json.loads(json.dumps(first.state_dict()))
    assert state["epoch"] == 0 and state["batches"] == stop
    resumed = _train(even_shards, rank=1, world_size=2, num_workers=num_workers, mixup=mixup)
    resumed.load_state_dict(state)
    after = list(resumed)
    assert len(before) + len(after) == len(uninterrupted) == 8
    for expected, got in zip(uninterrupted, before + after):
        assert expected[2] == got[2]
        assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])
    assert got[1].shape == (4, NUM_CLASSES)


def test_resume_rejects_changed_settings(even_shards):
    stream = _train(even_shards, num_workers=2)
    state = stream.state_dict()
    with pytest.raises(ValueError, match="seed: saved 3, now 4"):  # other workers resume: tests/test_reshard.py
        _train(even_shards, num_workers=1, seed=4).load_state_dict(state)


def test_validation_sees_each_sample_exactly_once_across_ranks_and_workers(uneven_shards):
    streams = [_val(uneven_shards, rank=rank, world_size=2) for rank in range(2)]
    assert sum(stream.num_samples for stream in streams) == 50
    seen = Counter()
    for stream in streams:
        keys = []
        for images, targets, batch_keys in stream:
            assert images.shape[1:] == (3, 16, 16)
            assert targets.tolist() == [int(key.split("_")[1]) % NUM_CLASSES for key in batch_keys]
            keys += batch_keys
        assert len(keys) == stream.num_samples
        seen.update(keys)
    assert seen == Counter(f"val_{i:04d}" for i in range(50))


def test_pipe_urls_and_the_index_json_name_the_same_shards(uneven_shards):
    pattern, index = uneven_shards
    folder = pattern.rsplit("/", 1)[0]
    urls = [f"pipe:cat {folder}/val-{i:06d}.tar" for i in range(8)]
    from_pipes = _keys(_val((urls, index), num_workers=1))
    from_index = _keys(_val((index, None), index=None, num_workers=1))
    assert from_pipes == from_index and len(from_index) == 50


def _damaged_shards(folder):
    """Three shards: a corrupt JPEG and a sample without cls among good ones, and a truncated tar."""
    good = [(f"ok_{i}", digit_jpeg(i)) for i in range(6)]
    write_raw_tar(folder / "bad-000000.tar", [
        ("ok_0.jpg", good[0][1]), ("ok_0.cls", b"0"),
        ("corrupt.jpg", b"\xff\xd8\xff\xe0 this is not a jpeg"), ("corrupt.cls", b"1"),
        ("nolabel.jpg", good[1][1]),
        ("ok_1.jpg", good[1][1]), ("ok_1.cls", b"1")])
    write_raw_tar(folder / "bad-000001.tar", [(f"{key}.{ext}", data if ext == "jpg" else str(i).encode())
                                              for i, (key, data) in enumerate(good[2:]) for ext in ("jpg", "cls")])
    truncated = folder / "bad-000002.tar"
    write_raw_tar(truncated, [(f"t_{i}.{ext}", digit_jpeg(10 + i, size=64) if ext == "jpg" else b"2")
                              for i in range(4) for ext in ("jpg", "cls")])
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    return str(folder / "bad-{000000..000002}.tar")


def test_bad_samples_and_truncated_shard_are_skipped_and_counted(tmp_path):
    pattern = _damaged_shards(tmp_path)
    stream = build_val_stream(pattern, index=None, num_classes=NUM_CLASSES, rank=0, world_size=1, micro_batch_size=4,
                              num_workers=2, image_size=SIZE, augment=EVAL_AUGMENT, return_keys=True)
    keys = _keys(stream)
    assert {"ok_0", "ok_1", "ok_2", "ok_3", "ok_4", "ok_5"} <= set(keys)
    assert "corrupt" not in keys and "nolabel" not in keys
    counts = stream.skip_counts()
    assert counts["decode_error"] == 1 and counts["missing_label"] == 1 and counts["unreadable_shard"] == 1

    train = build_train_stream(pattern, index=None, num_classes=NUM_CLASSES, rank=0, world_size=1,
                               micro_batch_size=2, num_workers=2, seed=0, image_size=SIZE, augment=TRAIN_AUGMENT,
                               mixup=None)
    assert len(list(train)) == train.steps_per_epoch
    assert train.skip_counts()["decode_error"] >= 1 and train.skip_counts()["unreadable_shard"] >= 1


def test_validation_counts_samples_a_damaged_shard_lost_against_the_index_per_evaluation(tmp_path):
    pattern, index = write_jpeg_shards(tmp_path, "val", count=12, per_shard=6, size=64)
    second = tmp_path / "val-000001.tar"
    second.write_bytes(second.read_bytes()[:3000])
    stream = _val((pattern, index), num_workers=0)
    for _ in range(2):  # the counts are one evaluation's, not a running total
        yielded = len(_keys(stream))
        counts = stream.skip_counts()
        assert counts["unreadable_shard"] == 1 and 0 < counts["lost_in_shard"] == 12 - yielded


def test_a_truncated_training_shard_loses_samples_that_are_counted_exactly(tmp_path):
    """Over one pass of the reader's shards, delivered + skipped + lost = the index's count."""
    listing = jpeg_listing(18, NUM_CLASSES, size=64, prefix="train")
    samples = list(listing.samples)
    samples[8] = dataclasses.replace(samples[8], data=b"\xff\xd8\xff\xe0 not a jpeg")  # third of shard 1
    index = write_shards(SourceListing(samples, listing.classes), tmp_path, "train", max_samples=6,
                         shuffle_seed=None, progress=False)
    truncated = tmp_path / "train-000002.tar"
    truncated.write_bytes(truncated.read_bytes()[:3000])
    stream = build_train_stream(str(tmp_path / "train-{000000..000002}.tar"), index=str(tmp_path / "train-index.json"),
                                num_classes=NUM_CLASSES, rank=0, world_size=1, micro_batch_size=1, num_workers=0,
                                seed=0, image_size=SIZE, augment=TRAIN_AUGMENT, mixup=None, shuffle_buffer=0,
                                return_keys=True)
    first_pass: list[str] = []
    for _, _, (key,) in stream:
        if key in first_pass:  # the first sample of the second pass (the first sample of a shard)
            break
        first_pass.append(key)
    counts = stream.skip_counts()
    assert counts["unreadable_shard"] == 1 and counts["decode_error"] == 1 and counts["lost_in_shard"] > 0
    assert len(first_pass) + counts["decode_error"] + counts["lost_in_shard"] == index.total == 18


def test_empty_pattern_empty_index_and_label_out_of_range_stop_with_named_messages(tmp_path, uneven_shards):
    missing = str(tmp_path / "nothing-{000000..000003}.tar")
    with pytest.raises(ValueError, match="matches no file .*nothing-000000.tar"):
        _val((missing, None), index=None)
    empty_index = tmp_path / "empty-index.json"
    empty_index.write_text(json.dumps({"name": "empty", "shards": [], "classes": [], "total": 0,
                                       "format": "anchorformer-shards/1"}))
    with pytest.raises(ValueError, match=f"shard index {empty_index} lists no samples"):
        _val((str(empty_index), None), index=None)
    with pytest.raises(ValueError, match="val-index.json has 10 classes but num_classes=5"):
        _val(uneven_shards, num_classes=5)
    with pytest.raises(ValueError, match=r"sample val_000\d in shard .*val-00000\d.tar has label \d outside \[0, 5\)"):
        _keys(_val(uneven_shards, num_classes=5, index=None))


def test_too_few_shards_for_the_readers_is_refused(uneven_shards):
    with pytest.raises(ValueError, match="8 training shards cannot feed 16 readers"):
        _train(uneven_shards, world_size=8, num_workers=2)


def test_state_saved_at_an_epoch_end_resumes_into_the_next_epoch(even_shards):
    uninterrupted = _train(even_shards, num_workers=0)
    list(uninterrupted)
    state = uninterrupted.state_dict()
    uninterrupted.set_epoch(1)
    expected = _keys(uninterrupted)
    resumed = _train(even_shards, num_workers=0)
    resumed.load_state_dict(state)
    assert list(resumed) == [] and len(resumed) == 0  # epoch 0 is done
    resumed.set_epoch(1)
    assert _keys(resumed) == expected


def test_odd_mixup_batch_is_refused_and_three_augment_runs(even_shards):
    # the augmentation options themselves are checked by the config schema (tests/test_config.py)
    with pytest.raises(ValueError, match="even micro_batch_size, got 3"):
        _train(even_shards, batch=3, mixup=MixupSection())
    pattern, index = even_shards
    three = AugmentConfig(auto_augment=None, three_augment=True)
    stream = build_train_stream(pattern, index=index, num_classes=NUM_CLASSES, rank=0, world_size=1,
                                micro_batch_size=16, num_workers=0, seed=0, image_size=SIZE, augment=three, mixup=None)
    images, targets = next(iter(stream))
    assert images.shape == (16, 3, 16, 16) and torch.isfinite(images).all()
