"""Repeated augmentation in the shard stream, as DeiT's RASampler: any repeat count on any number of
ranks (3 repeats on 2 and 4 ranks), every image's copies on consecutive distinct ranks where the
ranks suffice, augmented differently, in nearly the same step; equal steps per rank; exact resume."""
import json
import random
from collections import defaultdict

import pytest
import torch
from data_fixtures import write_jpeg_shards

from anchorformer.config import AugmentConfig
from anchorformer.data import build_train_stream

AUGMENT = AugmentConfig(scale=(0.5, 1.0), re_prob=0.25)
REPEATS = 3
BATCH = 4


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """64 training samples in 8 shards of 8."""
    return write_jpeg_shards(tmp_path_factory.mktemp("ra"), "train", count=64, per_shard=8)


def _stream(shards, rank, world_size, num_workers):
    pattern, index = shards
    return build_train_stream(pattern, index=index, num_classes=10, rank=rank, world_size=world_size,
                              micro_batch_size=BATCH, num_workers=num_workers, seed=5, image_size=16,
                              augment=AUGMENT, mixup=None, shuffle_buffer=6, repeated_aug=REPEATS, return_keys=True)


def _copies(shards, world_size, num_workers):
    """{key: [(rank, step, image), ...]} over one epoch of every rank."""
    copies = defaultdict(list)
    for rank in range(world_size):
        stream = _stream(shards, rank, world_size, num_workers)
        batches = list(stream)
        assert len(batches) == stream.steps_per_epoch == 64 // (BATCH * world_size)
        for step, (images, _, keys) in enumerate(batches):
            for image, key in zip(images, keys):
                copies[key].append((rank, step, image))
    return copies


def _all_different(images):
    return all(not torch.equal(a, b) for i, a in enumerate(images) for b in images[i + 1:])


def test_three_repeats_on_four_ranks_put_the_copies_on_three_consecutive_ranks(shards):
    copies = _copies(shards, world_size=4, num_workers=2)
    # Each (rank, worker) trains on 8 samples, taking them in turn from its 3 copies of 3 readers:
    # 3, 3 and 2 from each, so every reader's first two samples get 3 copies and its third one 2.
    assert sorted(len(c) for c in copies.values()) == [2] * 8 + [3] * 16
    for key, seen in copies.items():
        ranks = sorted(rank for rank, _, _ in seen)
        assert len(set(ranks)) == len(ranks), f"{key}: two copies on one rank {ranks}"
        assert any({(first + i) % 4 for i in range(len(ranks))} == set(ranks) for first in range(4)), ranks
        steps = [step for _, step, _ in seen]
        assert max(steps) - min(steps) <= 2, f"{key}: copies {steps} steps apart (2 workers alternate)"
        assert _all_different([image for _, _, image in seen]), f"{key}: two copies augmented alike"


def test_three_repeats_on_two_ranks_use_both_ranks_for_every_image(shards):
    copies = _copies(shards, world_size=2, num_workers=1)
    # 32 samples per rank from 3 copies: 11, 11, 10 from each of a reader's copies.
    assert sorted(len(c) for c in copies.values()) == [2] * 2 + [3] * 20
    for key, seen in copies.items():
        assert {rank for rank, _, _ in seen} == {0, 1}, f"{key} stayed on one rank"
        assert _all_different([image for _, _, image in seen]), f"{key}: two copies augmented alike"


@pytest.mark.parametrize("world_size", [2, 4])
def test_resume_with_three_repeats_reproduces_the_uninterrupted_batches(shards, world_size):
    rank, workers = 1, 2
    uninterrupted = list(_stream(shards, rank, world_size, workers))
    stop = random.Random(world_size).randrange(1, len(uninterrupted))
    first = _stream(shards, rank, world_size, workers)
    before = [batch for _, batch in zip(range(stop), first)]
    state = json.loads(json.dumps(first.state_dict()))
    resumed = _stream(shards, rank, world_size, workers)
    resumed.load_state_dict(state)
    after = list(resumed)
    assert len(before) + len(after) == len(uninterrupted)
    for expected, got in zip(uninterrupted, before + after):
        assert expected[2] == got[2]
        assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])
