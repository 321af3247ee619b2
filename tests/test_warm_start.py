"""model.pretrained_checkpoint naming a timm ViT/DeiT: refused before any work when its shape differs,
else converted once into the run folder (anchors from the run's own training images) and trained
from; a resumed run converts nothing again."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
from safetensors import safe_open
from safetensors.torch import save_file

from anchorformer import config, dist
from anchorformer.config import ConfigError
from anchorformer.engine import run_training
from anchorformer.engine.preflight import check_run
from anchorformer.run_folder import RunFolder

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def _vit_file(folder: Path, depth: int) -> Path:
    """A timm DeiT of the demo's shape (16 px, patch 4, width 192, 3 heads), as a lab's file."""
    vit = timm.create_model("deit_tiny_patch16_224", img_size=16, patch_size=4, depth=depth, num_classes=10)
    path = folder / f"deit_depth{depth}.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    return path


def _cfg(tmp_path: Path, cache: Path, source: Path, *overrides: str) -> config.RootConfig:
    return config.load(DEMO, [f"model.pretrained_checkpoint={source}", f"data.cache_dir={cache}",
                              f"logging.output_dir={tmp_path / 'runs'}", "logging.run_name=warm", "data.num_workers=0",
                              "model.init_images=64", "model.init_fit_steps=2", "logging.progress_bar=false",
                              "schedule.epochs=1", "schedule.warmup_epochs=0", "train.max_steps=2", *overrides])


def test_a_vit_of_another_depth_is_refused_before_any_work(tmp_path, embedded_cache_dir):
    cfg = _cfg(tmp_path, embedded_cache_dir, _vit_file(tmp_path, depth=3))
    with pytest.raises(ConfigError) as refusal:
        check_run(cfg, world_size=1)
    assert refusal.value.key == "model.pretrained_checkpoint" and "depth 3 (source) vs 4 (target)" in str(refusal.value)
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_vit_is_converted_once_into_the_run_folder_and_trained_from(tmp_path, embedded_cache_dir, caplog):
    source = _vit_file(tmp_path, depth=4)
    caplog.set_level("INFO")
    result = run_training(_cfg(tmp_path, embedded_cache_dir, source), stop_signals=())
    assert result.status == "completed" and result.step == 2
    folder = RunFolder.of(_cfg(tmp_path, embedded_cache_dir, source))
    with safe_open(str(folder.warm_start), framework="pt") as handle:
        report = json.loads(handle.metadata()["conversion"])
    assert report["qk_rule"] == "sym" and report["anchors"]["images"] == 64
    assert report["source"]["path"] == str(source)
    assert config.load(folder.config).model.pretrained_checkpoint == str(folder.warm_start)  # what it trained from
    converted_at = folder.warm_start.stat().st_mtime_ns
    assert sum("converting the ViT/DeiT" in message for message in caplog.messages) == 1

    resumed = run_training(_cfg(tmp_path, embedded_cache_dir, source, "train.max_steps=3"), stop_signals=())
    assert resumed.step == 3 and folder.warm_start.stat().st_mtime_ns == converted_at
    assert sum("converting the ViT/DeiT" in message for message in caplog.messages) == 1
    dist.shutdown()
