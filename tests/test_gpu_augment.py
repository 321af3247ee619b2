"""The batched augmentation ops of ``data.augment_on=gpu`` (anchorformer.data.batch_augment), on CPU
tensors: each op gives timm's Pillow pixels at the same argument on real photos, the device-side
normalisation / erasing / Mixup give the pil pipeline's batches, and the gpu path's stream resumes
exactly with 0 and 2 workers."""
import random

import numpy as np
import pytest
import torch
from PIL import Image
from benchmarks.report import photo_crops
from data_fixtures import interrupted_batches, write_jpeg_shards
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from timm.data import auto_augment

from anchorformer.config import AugmentConfig, MixupSection
from anchorformer.data import build_train_stream
from anchorformer.data.batch_augment import AUGMENT_OPS, GEOMETRIC_OPS, RESAMPLE_CODES, apply_ops, erase_boxes
from anchorformer.data.pipelines import build_train_pipeline
from anchorformer.data.transforms import _posterize
from benchmark_fixtures import one_torch_thread  # noqa: F401  (one thread: the tests are tiny)

FILL = (124, 116, 104)
_TIMM_OPS = {fn.__name__: fn for fn in auto_augment.NAME_TO_OP.values()} | {"posterize": _posterize}
_PIL_RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                 "bicubic": Image.Resampling.BICUBIC}
# Arguments as timm's level functions produce them (ranges of rand-m*-inc1 and the AutoAugment policies).
ARGS = {"auto_contrast": [0.0], "equalize": [0.0], "invert": [0.0], "posterize": [0, 1, 4, 8],
        "solarize": [0, 100, 256], "solarize_add": [0, 50, 110], "color": [0.1, 1.0, 1.9],
        "contrast": [0.1, 0.63, 1.9], "brightness": [0.1, 1.37, 1.9], "sharpness": [0.1, 1.6, 1.9],
        "rotate": [-30.0, 0.0, 13.1], "shear_x": [-0.3, 0.17], "shear_y": [0.12, 0.3],
        "translate_x_rel": [-0.45, 0.1], "translate_y_rel": [0.2, -0.33], "translate_x_abs": [-50.0, 17.5],
        "translate_y_abs": [33.3]}


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    """Six 72 x 64 crops of real photos (edges, textures and flat areas)."""
    return [crop.resize((72, 64), Image.Resampling.BICUBIC) for crop in photo_crops(6)]


def _tensor(images: list[Image.Image]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(image)).permute(2, 0, 1) for image in images]).float()


def _ours(kind: str, photos: list[Image.Image], arg: float, resample: str = "bicubic") -> torch.Tensor:
    count = len(photos)
    ops = torch.full((count, 1), AUGMENT_OPS.index(kind))
    args = torch.full((count, 1), float(arg), dtype=torch.float64)
    modes = torch.full((count, 1), RESAMPLE_CODES[resample])
    return apply_ops(_tensor(photos), ops, args, modes, torch.tensor(FILL, dtype=torch.float32))


def _timm(kind: str, photos: list[Image.Image], arg: float, resample: str = "bicubic") -> torch.Tensor:
    extra = {"fillcolor": FILL, "resample": _PIL_RESAMPLE[resample]} if kind in GEOMETRIC_OPS else {}
    level = () if kind in ("auto_contrast", "equalize", "invert") else (arg,)
    return _tensor([_TIMM_OPS[kind](photo, *level, **extra) for photo in photos])


@pytest.mark.parametrize("kind", AUGMENT_OPS)
def test_each_op_gives_timms_pixels_exactly_at_every_argument_and_resample_mode(photos, kind):
    for arg in ARGS[kind]:
        for resample in ("bicubic", "bilinear", "nearest") if kind in GEOMETRIC_OPS else ("bicubic",):
            ours, expected = _ours(kind, photos, arg, resample), _timm(kind, photos, arg, resample)
            assert torch.equal(ours, expected), f"{kind}({arg}, {resample}): {(ours != expected).float().mean()}"


def test_ops_apply_in_each_images_order_and_skip_empty_slots(photos):
    ops = torch.tensor([[AUGMENT_OPS.index("invert"), AUGMENT_OPS.index("posterize")],
                        [AUGMENT_OPS.index("posterize"), AUGMENT_OPS.index("invert")],
                        [-1, -1]])
    args = torch.tensor([[0.0, 2.0], [2.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    out = apply_ops(_tensor(photos[:3]), ops, args, torch.zeros_like(ops), torch.tensor(FILL, dtype=torch.float32))
    posterize, invert = _TIMM_OPS["posterize"], _TIMM_OPS["invert"]
    assert torch.equal(out[0], _tensor([posterize(invert(photos[0]), 2)])[0])
    assert torch.equal(out[1], _tensor([invert(posterize(photos[1], 2))])[0])
    assert torch.equal(out[2], _tensor(photos[2:3])[0])


def test_erasing_fills_only_the_boxes_with_seeded_noise():
    images = torch.zeros(3, 3, 20, 20)
    boxes = torch.tensor([[[2, 3, 5, 4]], [[0, 0, 0, 0]], [[10, 10, 10, 10]]])
    erased = [erase_boxes(images.clone(), boxes, "pixel", torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(erased[0], erased[1])
    changed = erased[0] != 0
    assert changed[0, :, 2:7, 3:7].all() and changed[0].sum() == 3 * 5 * 4
    assert not changed[1].any() and changed[2, :, 10:, 10:].all()
    colour = erase_boxes(images.clone(), boxes, "rand", torch.Generator().manual_seed(7))
    assert colour[0, :, 2:7, 3:7].flatten(1).std(dim=1).max() == 0  # one colour per box and channel
    assert not erase_boxes(images.clone(), boxes, "const", torch.Generator()).any()


SIZE = 16
JITTER_ONLY = AugmentConfig(scale=(0.5, 1.0), auto_augment=None, color_jitter=0.4, re_prob=0.0)
RANDAUGMENT = AugmentConfig(scale=(0.5, 1.0), auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.0)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_jpeg_shards(tmp_path_factory.mktemp("gpu"), "train", count=64, per_shard=8, size=24)


def _stream(shards, pipeline, augment_on, *, augment=JITTER_ONLY, num_workers=0, mixup=None):
    pattern, index = shards
    return build_train_stream(pattern, index=index, num_classes=10, rank=1, world_size=2, micro_batch_size=4,
                              num_workers=num_workers, seed=5, image_size=SIZE, augment=augment, mixup=mixup,
                              label_smoothing=0.1, shuffle_buffer=16, return_keys=True, pipeline=pipeline,
                              augment_on=augment_on)


def _batches(stream) -> list[tuple]:
    """The stream's batches as the training step sees them (the device part applied on the CPU)."""
    out = []
    for images, targets, keys in stream:
        if stream.device_augment is not None:
            images, targets = stream.device_augment(images, targets, torch.device("cpu"))
        out.append((images, targets, keys))
    return out


@pytest.mark.parametrize("augment", [JITTER_ONLY, RANDAUGMENT], ids=["colour-jitter", "randaugment"])
def test_gpu_path_gives_the_pil_pipelines_batches(shards, augment):
    """The same crops, flips, ops, normalisation and Mixup as timm's transform and Mixup in the
    workers, from the same seeds: only the crop's resize on tensors may differ from Pillow's by a
    level (1 / 255 / std ~ 0.018), which a contrast, solarize or equalize op may amplify at a few pixels."""
    mixup = MixupSection(mixup_alpha=0.8, cutmix_alpha=1.0)
    reference = _batches(_stream(shards, "pil", "cpu", augment=augment, mixup=mixup))
    on_device = _batches(_stream(shards, "fast", "gpu", augment=augment, mixup=mixup))
    assert [keys for *_, keys in on_device] == [keys for *_, keys in reference]
    for (images, targets, _), (expected_images, expected_targets, _) in zip(on_device, reference):
        assert torch.allclose(targets, expected_targets)
        difference = (images - expected_images).abs()
        assert difference.mean() < 0.005 and (difference < 1e-5).float().mean() > 0.9


@pytest.mark.parametrize("num_workers", [0, 2])
def test_gpu_path_resumes_mid_epoch_with_the_same_keys_and_augmented_tensors(shards, num_workers):
    options = AugmentConfig(scale=(0.5, 1.0), re_prob=0.5)  # RandAugment + erasing
    mixup = MixupSection(mixup_alpha=0.8, cutmix_alpha=1.0)
    make = lambda: _stream(shards, "fast", "gpu", augment=options, num_workers=num_workers, mixup=mixup)  # noqa: E731
    uninterrupted = _batches(make())
    augment = make().device_augment
    resumed = [(*augment(images, targets, torch.device("cpu")), keys)
               for images, targets, keys in interrupted_batches(make, stop=random.Random(num_workers).randrange(1, 7))]
    assert len(resumed) == len(uninterrupted) == 8
    for (images, targets, keys), (expected_images, expected_targets, expected_keys) in zip(resumed, uninterrupted):
        assert keys == expected_keys
        assert torch.equal(images, expected_images) and torch.equal(targets, expected_targets)


def test_gpu_path_refuses_what_it_does_not_implement():
    with pytest.raises(ValueError, match="data.augment_on=gpu .*set data.pipeline=fast"):
        build_train_pipeline(JITTER_ONLY, SIZE, None, 10, pipeline="pil", augment_on="gpu")
    augmix = AugmentConfig(auto_augment="augmix-m5-w4-d2")
    with pytest.raises(ValueError, match="use data.augment_on=cpu"):
        build_train_pipeline(augmix, 224, None, 10, pipeline="fast", augment_on="gpu")
    build_train_pipeline(augmix, 224, None, 10, pipeline="fast", augment_on="cpu")  # timm's own AugMix on Pillow
    with pytest.raises(ValueError, match="data.pipeline='torch'; choose from"):
        build_train_pipeline(JITTER_ONLY, SIZE, None, 10, pipeline="torch")


@pytest.mark.slow
def test_training_with_augment_on_gpu_follows_the_fast_cpu_pipeline_step_by_step(tmp_path, embedded_cache_dir):
    """The classification task applies the device augmentation to each batch: with colour jitter,
    Mixup and erasing off (the only draw the two paths make differently), training through
    ``augment_on=gpu`` gives the same losses as the fast pipeline augmenting in its workers."""
    from anchorformer import config
    from anchorformer.engine import run_training

    losses = {}
    for augment_on in ("cpu", "gpu"):
        cfg = config.from_dict({
            "model": {"name": "anchorformer_tiny_patch16_224", "num_classes": 10, "img_size": 16, "drop_path_rate": 0.0,
                      "kwargs": {"patch_size": 4, "depth": 1, "embed_dim": 48, "num_heads": 2, "num_anchors": 8}},
            "data": {"source": "embedded", "cache_dir": str(embedded_cache_dir), "image_size": 16, "num_workers": 1,
                     "pipeline": "fast", "augment_on": augment_on,
                     "augment": {"auto_augment": None, "color_jitter": 0.4, "re_prob": 0.0, "scale": [0.5, 1.0]},
                     "mixup": {"prob": 1.0, "mixup_alpha": 0.8, "cutmix_alpha": 1.0}},
            "optim": {"lr": 1e-3, "lr_reference_batch": 0},
            "schedule": {"epochs": 1, "warmup_epochs": 0.0},
            "train": {"global_batch_size": 32, "micro_batch_size": 32, "precision": "fp32", "device": "cpu",
                      "max_steps": 3},
            "deepspeed": {"zero_stage": 0},
            "logging": {"output_dir": str(tmp_path), "run_name": augment_on, "every_steps": 1, "progress_bar": False},
        })
        run_training(cfg)
        events = EventAccumulator(str(tmp_path / augment_on / "tensorboard"))
        events.Reload()
        losses[augment_on] = [event.value for event in sorted(events.Scalars("train/loss"), key=lambda e: e.step)]
    assert len(losses["gpu"]) == 3
    assert losses["gpu"] == pytest.approx(losses["cpu"], rel=1e-5)
