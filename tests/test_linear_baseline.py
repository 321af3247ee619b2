"""The linear baseline beside small runs (tasks/linear_baseline.py): fitted once on the pixels of
real shards (scikit-learn's digits as JPEGs), scored on the validation shards, and the line that
tells the user what to try when the model is below it."""
import numpy as np
import pytest
from data_fixtures import digit_jpeg
from sklearn.datasets import load_digits

from anchorformer.data.sources import SourceListing, SourceSample
from anchorformer.data.writer import write_shards
from anchorformer.tasks.linear_baseline import (
    BASELINE_MAX_TRAIN, BASELINE_PIXELS, LinearBaseline, baseline_applies, baseline_report, fit_linear_baseline,
    read_pixels,
)


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory):
    """400 training and 100 validation digits (true labels) as 24 px JPEG shards with indexes."""
    folder = tmp_path_factory.mktemp("baseline_shards")
    labels = load_digits().target
    for name, ids in (("train", range(400)), ("val", range(400, 500))):
        samples = [SourceSample(key=f"{name}_{i:04d}", label=int(labels[i]), ext="jpg", data=digit_jpeg(i, 24))
                   for i in ids]
        write_shards(SourceListing(samples=samples, classes=[str(c) for c in range(10)]), folder, name,
                     max_samples=150, shuffle_seed=None, progress=False)
    return str(folder / "train-index.json"), str(folder / "val-index.json")


def test_the_baseline_fits_once_on_the_shards_and_scores_the_validation_images(digit_shards):
    train, val = digit_shards
    baseline = fit_linear_baseline(train, val, num_classes=10)
    assert baseline.train_samples == 400 and baseline.val_samples == 100 and baseline.pixels == BASELINE_PIXELS
    assert baseline.top1 >= 80.0, baseline  # digits are nearly linearly separable from their pixels
    assert baseline.seconds > 0
    again = fit_linear_baseline(train, val, num_classes=10)
    assert again.top1 == baseline.top1


def test_pixels_are_downscaled_and_grayscale_keeps_one_channel(digit_shards):
    features, labels = read_pixels(digit_shards[1], None, 10, pixels=8)
    assert features.shape == (100, 64) and features.dtype == np.float32
    assert 0.0 <= features.min() and features.max() <= 1.0
    assert list(labels[:5]) == list(load_digits().target[400:405])


def test_unreadable_shards_are_refused(tmp_path):
    with pytest.raises(ValueError, match="matches no file"):
        fit_linear_baseline(str(tmp_path / "x-{000000..000001}.tar"), str(tmp_path / "y-000000.tar"), num_classes=2)


def test_the_report_says_what_to_try_only_below_the_baseline():
    baseline = LinearBaseline(top1=83.2, train_samples=5000, val_samples=1000, pixels=16, seconds=20.0)
    above = baseline_report(90.0, baseline)
    assert len(above) == 1 and "83.20 %" in above[0] and "model 90.00 %" in above[0]
    below = baseline_report(74.5, baseline)
    assert len(below) == 2 and "model.pretrained_checkpoint=VIT" in below[1] and "ViT/DeiT" in below[1]
    assert "schedule.epochs" in below[1]
    assert baseline_applies(5000) and baseline_applies(BASELINE_MAX_TRAIN)
    assert not baseline_applies(BASELINE_MAX_TRAIN + 1) and not baseline_applies(0)
