"""``data.pipeline=fast`` against timm's transform on the same seeds: decoding, the crop boxes and
flips, RandAugment's op choices and magnitudes, erasing, whole augmented images; and the fast
stream's exact resume with 0 and 2 workers and its skip counting."""
import io
import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from benchmark_fixtures import one_torch_thread  # noqa: F401  (one thread: the tests are tiny)
from benchmarks.report import photo_crops
from data_fixtures import digit_jpeg, interrupted_batches, write_jpeg_shards, write_raw_tar

from anchorformer.config import AugmentConfig, MixupSection
from anchorformer.data import build_train_stream
from anchorformer.data.batch_augment import AUGMENT_OPS
from anchorformer.data.fast_transforms import FastTrainTransform, augment_in_worker, decode_rgb
from anchorformer.data.stages import decode_pil, seeded_rngs
from anchorformer.data.transforms import build_train_transform

DEIT = AugmentConfig()  # the DeiT recipe's augmentation (at 64 px)
SEEDS = range(300)


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photo() -> bytes:
    """A real photo crop (shorter side 300-427 px) as JPEG bytes."""
    return _jpeg(next(photo_crops(1)))


def _as_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def test_decoding_gives_pillows_pixels_and_refuses_what_pillow_refuses(photo):
    png = io.BytesIO()
    Image.open(io.BytesIO(photo)).save(png, format="PNG")
    grey = _jpeg(Image.open(io.BytesIO(photo)).convert("L"))
    for data in (photo, png.getvalue(), grey, digit_jpeg(3)):
        assert torch.equal(decode_rgb(data), _as_tensor(decode_pil(data)))
    for broken in (b"not an image", photo[:200]):
        with pytest.raises(OSError):
            decode_rgb(broken)


def test_crop_boxes_and_flips_are_timms_on_every_seed(photo):
    """Same seed, same box and flip: the crops agree to one level (the tensor resize vs Pillow's)."""
    for interpolation in ("bicubic", "random"):
        augment = AugmentConfig(interpolation=interpolation, auto_augment=None, color_jitter=0.0, re_prob=0.0)
        crop, flip = build_train_transform(augment, 64).transforms[:2]
        fast = FastTrainTransform(augment, 64, on_device=False)
        pixels, image = decode_rgb(photo), decode_pil(photo)
        for seed in SEEDS:
            with seeded_rngs(seed):
                expected = _as_tensor(flip(crop(image))).int()
            with seeded_rngs(seed):
                got = fast.crop_and_flip(pixels).int()
            assert (got - expected).abs().max() <= 1, f"seed {seed}, {interpolation}"


class _Log:
    """Wraps a timm op's aug_fn: logs (function, level args) and applies it."""

    def __init__(self, fn, log):
        self.fn, self.log = fn, log

    def __call__(self, image, *args, **kwargs):
        self.log.append((self.fn.__name__.lstrip("_"), tuple(float(arg) for arg in args)))
        return self.fn(image, *args, **kwargs)


def test_randaugment_draws_timms_ops_and_magnitudes_on_every_seed(photo):
    timm_transform = build_train_transform(DEIT, 64)
    augment = timm_transform.transforms[2]
    timm_log: list = []
    for op in augment.ops:
        op.aug_fn = _Log(op.aug_fn, timm_log)
    planner = FastTrainTransform(DEIT, 64, on_device=True)
    image, pixels = decode_pil(photo), decode_rgb(photo)
    chosen: Counter = Counter()
    for seed in SEEDS:
        timm_log.clear()
        with seeded_rngs(seed):
            timm_transform(image)
        with seeded_rngs(seed):
            planned = planner(pixels)
        ours = [(AUGMENT_OPS[op_id], (arg,)) for op_id, arg, _ in planned.ops]
        expected = [(name, args if args else (0.0,)) for name, args in timm_log]
        assert ours == expected, f"seed {seed}"
        chosen.update(name for name, _ in ours)
    # Not a vacuous match: 2 layers x p 0.5 over 15 ops, every op drawn.
    assert len(chosen) == 15 and 0.4 < sum(chosen.values()) / (2 * len(SEEDS)) < 0.6


def test_fast_images_are_timms_on_the_same_seeds_erasing_noise_included(photo):
    augment = AugmentConfig(re_prob=0.5)
    timm_transform, fast = build_train_transform(augment, 64), FastTrainTransform(augment, 64, on_device=False)
    image, pixels = decode_pil(photo), decode_rgb(photo)
    expected, planned = [], []
    for seed in range(64):
        with seeded_rngs(seed):
            expected.append(timm_transform(image))
        with seeded_rngs(seed):
            planned.append(fast(pixels))
    got, expected = augment_in_worker(planned, fast), torch.stack(expected)
    erased = 0
    for row, image_plan in enumerate(planned):
        for top, left, height, width, _ in image_plan.erasures:
            box = (row, slice(None), slice(top, top + height), slice(left, left + width))
            assert torch.equal(got[box], expected[box])  # timm's own noise, from the same torch RNG state
            erased += 1
    assert 16 < erased < 48
    level = 1.0 / (255 * 0.229)
    difference = (got - expected).abs()
    # RandAugment is timm's own code on Pillow; only the crop's resize differs, by a level, which
    # a contrast or solarize op may amplify at a few pixels.
    assert difference.mean() < 0.05 * level and (difference < 1e-5).float().mean() > 0.97


def test_cpu_path_runs_timms_own_three_augment_and_augmix(photo):
    for augment in (AugmentConfig(auto_augment=None, three_augment=True),
                    AugmentConfig(auto_augment="augmix-m5-w4-d2")):
        timm_transform, fast = build_train_transform(augment, 32), FastTrainTransform(augment, 32, on_device=False)
        with seeded_rngs(1):
            expected = timm_transform(decode_pil(photo))
        with seeded_rngs(1):
            got = augment_in_worker([fast(decode_rgb(photo))], fast)[0]
        assert got.shape == expected.shape == (3, 32, 32)
        assert (got - expected).abs().mean() < 0.05


NUM_CLASSES = 10
SMALL = AugmentConfig(scale=(0.5, 1.0), re_prob=0.25)  # at 16 px


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_jpeg_shards(tmp_path_factory.mktemp("fast"), "train", count=64, per_shard=8)


def _train(shards, *, num_workers=2, mixup=None, pipeline="fast"):
    pattern, index = shards
    return build_train_stream(pattern, index=index, num_classes=NUM_CLASSES, rank=1, world_size=2, micro_batch_size=4,
                              num_workers=num_workers, seed=3, image_size=16, augment=SMALL, mixup=mixup,
                              label_smoothing=0.1, shuffle_buffer=16, return_keys=True, pipeline=pipeline)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_fast_stream_resumes_mid_epoch_with_the_same_keys_and_augmented_tensors(shards, num_workers):
    mixup = MixupSection(mixup_alpha=0.8, cutmix_alpha=1.0)
    uninterrupted = list(_train(shards, num_workers=num_workers, mixup=mixup))
    resumed = interrupted_batches(lambda: _train(shards, num_workers=num_workers, mixup=mixup),
                                  stop=random.Random(num_workers).randrange(1, 7))
    assert len(resumed) == len(uninterrupted) == 8
    for (images, targets, keys), (expected_images, expected_targets, expected_keys) in zip(resumed, uninterrupted):
        assert keys == expected_keys
        assert torch.equal(images, expected_images) and torch.equal(targets, expected_targets)
    # The same samples, augmented as timm does, as the pil pipeline's batches.
    reference = list(_train(shards, num_workers=num_workers, mixup=mixup, pipeline="pil"))
    assert [keys for *_, keys in reference] == [keys for *_, keys in uninterrupted]
    assert max((a[0] - b[0]).abs().max().item() for a, b in zip(reference, uninterrupted)) < 0.1


def test_fast_stream_skips_and_counts_images_it_cannot_decode(tmp_path):
    members = []
    for i in range(8):
        data = b"\xff\xd8 broken jpeg" if i in (2, 5) else digit_jpeg(i)
        members += [(f"s{i}.jpg", data), (f"s{i}.cls", str(i % NUM_CLASSES).encode())]
    write_raw_tar(tmp_path / "train-000000.tar", members)
    stream = build_train_stream(str(tmp_path / "train-000000.tar"), index=None, num_classes=NUM_CLASSES, rank=0,
                                world_size=1, micro_batch_size=2, num_workers=0, seed=0, image_size=16, augment=SMALL,
                                mixup=None, shuffle_buffer=0, return_keys=True, pipeline="fast")
    keys = [key for _, _, batch_keys in stream for key in batch_keys]
    assert "s2" not in keys and "s5" not in keys and len(keys) >= 4
    assert stream.skip_counts()["decode_error"] == 2


@pytest.mark.parametrize("data, key, message", [
    ({"augment_on": "gpu"}, "data.augment_on", "set data.pipeline=fast"),
    ({"pipeline": "torch"}, "data.pipeline", "must be one of 'pil', 'fast'"),
    ({"pipeline": "fast", "augment_on": "gpu", "augment": {"auto_augment": "augmix-m5-w4-d2"}}, "data.augment_on",
     "set data.augment_on=cpu"),
])
def test_config_refuses_pipeline_choices_that_cannot_run_naming_the_key(data, key, message):
    from anchorformer import config

    with pytest.raises(config.ConfigError, match=message) as refused:
        config.from_dict({"model": {"num_classes": 10}, "data": {"source": "embedded", **data}})
    assert refused.value.key == key
    chosen = config.from_dict({"model": {"num_classes": 10},
                               "data": {"source": "embedded", "pipeline": "fast", "augment_on": "gpu"}})
    assert (chosen.data.pipeline, chosen.data.augment_on) == ("fast", "gpu")
    assert (config.from_dict({"model": {"num_classes": 10}, "data": {"source": "embedded"}}).data.pipeline
            == "pil")  # the reference path stays the default
