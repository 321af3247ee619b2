"""What a run's TensorBoard shows, asked of a real TensorBoard server over its HTTP API: the
custom-scalars layout (the run at a glance first, skip counters one chart per split), the anchor
diagnostics' scalars and histograms, and the pictures."""
from __future__ import annotations

import io
import json
import re
import select
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
import timm
import torch
from PIL import Image

import anchorformer.models  # noqa: F401  (registers the models with timm)
from anchorformer.engine.metrics import TensorBoardLogger, Throughput, run_layout, skip_scalars
from anchorformer.models.anchor_diagnostics import AnchorProbe, anchor_diagnostics
from anchorformer.models.anchor_pictures import anchor_pictures, input_grid
from helpers import BIN

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
STARTUP_S = 90


def _get(base: str, route: str, **query: str) -> Any:
    url = f"{base}{route}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture
def tensorboard_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """``(base URL, log dir)`` of a TensorBoard serving ``tmp_path / "logs"`` on a free port (it
    picks one for ``--port 0`` and names it in its serving line); stopped by its pid."""
    logdir = tmp_path / "logs"
    logdir.mkdir()
    command = [str(BIN / "tensorboard"), "--logdir", str(logdir), "--host", "127.0.0.1", "--port", "0",
               "--load_fast", "false", "--reload_interval", "1"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline, output, base = time.monotonic() + STARTUP_S, "", None
        while base is None and time.monotonic() < deadline and proc.poll() is None:
            if select.select([proc.stderr], [], [], 1.0)[0]:
                output += proc.stderr.readline()
                found = re.search(r"at (http://[^ ]+?)/? \(Press CTRL\+C", output)
                base = found.group(1) if found else None
        assert base is not None, f"TensorBoard did not start within {STARTUP_S} s:\n{output[-3000:]}"
        yield base, logdir
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_for_run(base: str, run: str, last_tag: str) -> None:
    """Return once the server has read ``run`` up to its image ``last_tag``, the last thing written
    (it reloads the log dir in the background, possibly while the file is being written)."""
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if last_tag in _get(base, "/data/plugin/images/tags").get(run, {}):
            return
        time.sleep(0.5)
    raise AssertionError(f"TensorBoard did not load run {run!r} within {STARTUP_S} s")


def _write_run(log_dir: Path) -> list[str]:
    """What a training run logs: scalars, skip counters, anchor diagnostics, pictures. Returns the
    picture tags in the order written."""
    torch.manual_seed(0)
    model = timm.create_model("anchorformer_tiny_patch16_224", num_classes=10, img_size=16, patch_size=4, depth=3,
                              embed_dim=48, num_heads=3, num_anchors=8)
    probe = AnchorProbe.from_batch(torch.randn(4, 3, 16, 16))
    logger = TensorBoardLogger(log_dir, enabled=True)
    throughput = Throughput(samples_per_step=8, flops_per_sample=1e6, world_size=1, peak_tflops=1.0)
    for step in (1, 2):
        throughput.add_step(data_wait_s=0.001)
        logger.scalars({"train/loss": 2.0 / step, "train/lr": 1e-3, **throughput.summary()}, step)
        logger.scalars(skip_scalars("train", {"decode_error": 0, "missing_label": step}), step)
        result = anchor_diagnostics(model, probe)
        logger.anchor_diagnostics(result, step)
    logger.scalars({"eval/top1": 50.0, "eval/loss": 1.5, **skip_scalars("val", {"decode_error": 1})}, 2)
    pictures = {"inputs/train_batch": input_grid(probe.images, MEAN, STD),
                **anchor_pictures(result, probe.images, MEAN, STD)}
    logger.images(pictures, 2)
    logger.close()
    return list(pictures)


def test_tensorboard_serves_layout_scalars_histograms_and_images(tensorboard_server):
    base, logdir = tensorboard_server
    picture_tags = _write_run(logdir / "demo")
    _wait_for_run(base, "demo", picture_tags[-1])
    scalars = _get(base, "/data/plugin/scalars/tags")["demo"]

    listing = _get(base, "/data/plugins_listing")
    for plugin in ("scalars", "custom_scalars", "histograms", "images"):
        assert listing[plugin]["enabled"], f"{plugin} is not active: {listing[plugin]}"
    expected = {"train/loss", "perf/data_wait_share", "perf/mfu", "eval/top1", "anchors/dead_total",
                "anchors/dead/layer_00", "anchors/entropy/layer_02", "anchors/cosine_max/layer_01",
                "skipped/train/decode_error", "skipped/train/missing_label", "skipped/val/decode_error"}
    assert expected <= set(scalars), expected - set(scalars)
    histograms = _get(base, "/data/plugin/histograms/tags")["demo"]
    assert {f"anchors/{kind}/layer_{i:02d}" for kind in ("degree", "norm") for i in range(3)} <= set(histograms)
    images = _get(base, "/data/plugin/images/tags")["demo"]
    assert sorted(picture_tags) == ["anchors/maps/layer_00", "anchors/maps/layer_01", "anchors/maps/layer_02",
                            "inputs/train_batch"]
    assert set(picture_tags) <= set(images)
    entry = _get(base, "/data/plugin/images/images", run="demo", tag="anchors/maps/layer_02")[-1]
    with urllib.request.urlopen(f"{base}/data/plugin/images/individualImage?{entry['query']}", timeout=30) as response:
        served = Image.open(io.BytesIO(response.read()))
        assert served.format == "PNG" and served.size == (3 * 48 + 2 * 2, 4 * 48 + 3 * 2)  # 3 views x 4 images

    layout = _get(base, "/data/plugin/custom_scalars/layout")
    categories = [category["title"] for category in layout["category"]]
    assert categories == list(run_layout()) and categories[0] == "At a glance"
    glance = [chart["title"] for chart in layout["category"][0]["chart"]]
    assert glance[:2] == ["loss (train, eval, eval EMA)", "top1 (eval, eval EMA, best)"]
    skips = next(category for category in layout["category"] if category["title"] == "Data: skipped samples")
    assert [chart["multiline"]["tag"] for chart in skips["chart"]] == [["^skipped/train/"], ["^skipped/val/"]]
    # the server resolves a chart's regex to every line it draws: one per skip reason
    train_skips = _get(base, "/data/plugin/custom_scalars/scalars", run="demo", tag="^skipped/train/")
    assert train_skips["regex_valid"]
    assert sorted(train_skips["tag_to_events"]) == ["skipped/train/decode_error", "skipped/train/missing_label"]
    assert [event[2] for event in train_skips["tag_to_events"]["skipped/train/missing_label"]] == [1.0, 2.0]


def test_layout_charts_what_a_user_checks_first_and_every_logged_tag():
    layout = run_layout("mIoU")
    glance = layout["At a glance"]
    patterns = [pattern for charts in layout.values() for _, tags in charts.values() for pattern in tags]
    for tag in ("train/loss", "eval/loss", "eval_ema/loss", "eval/mIoU", "eval/best_mIoU", "train/lr",
                "perf/samples_per_s", "perf/mfu", "perf/data_wait_share", "memory/peak_gb", "perf/step_time_s",
                "perf/step_time_median_s", "perf/step_time_max_s"):
        assert any(re.match(p, tag) for _, tags in glance.values() for p in tags), tag
    for tag in ("train/grad_norm", "train/nonfinite_steps", "train/spike_steps", "perf/tflops_per_device",
                "perf/data_wait_s", "perf/step_time_slowest_rank", "train/epoch", "eval/mAcc", "eval_ema/aAcc", "skipped/val/lost_in_shard",
                "anchors/dead/layer_11", "anchors/cosine_mean/layer_00"):
        assert any(re.match(p, tag) for p in patterns), tag
    others = layout["Training"]["other evaluation metrics"][1][0]
    assert not any(re.match(others, tag) for tag in ("eval/mIoU", "eval/loss", "eval/samples", "eval_ema/best_mIoU"))


def test_data_wait_share_is_the_waited_fraction_of_wall_time():
    throughput = Throughput(samples_per_step=4, flops_per_sample=1.0, world_size=1)
    time.sleep(0.05)
    throughput.add_step(data_wait_s=0.025)
    share = throughput.summary()["perf/data_wait_share"]
    assert 0.2 < share <= 0.5


def test_disabled_logger_writes_nothing(tmp_path):
    logger = TensorBoardLogger(tmp_path / "tb", enabled=False)
    logger.histograms({"x": torch.ones(3)}, 0)
    logger.images({"y": input_grid(torch.zeros(1, 3, 4, 4), MEAN, STD)}, 0)
    logger.close()
    assert not (tmp_path / "tb").exists()
