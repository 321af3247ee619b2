"""Config loading: defaults <- recipe (with base) <- overrides, and every class of bad input
rejected with the key, the allowed values and, for typos, the closest key."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

from anchorformer import config
from anchorformer.config import ConfigError
from anchorformer.data.pipelines import build_train_pipeline

RECIPES = sorted((REPO / "configs").glob("*.yaml"))


@pytest.fixture
def recipe(tmp_path) -> Path:
    (tmp_path / "base.yaml").write_text(
        "data: {source: embedded, image_size: 32}\nmodel: {num_classes: 10, img_size: 32}\noptim: {lr: 1.0e-3}\n")
    path = tmp_path / "child.yaml"
    path.write_text("base: base.yaml\noptim: {weight_decay: 0.1}\ntrain: {micro_batch_size: 32, global_batch_size: 256}\n")
    return path


def test_layers_merge_in_order_defaults_base_recipe_overrides(recipe):
    cfg = config.load(recipe, ["optim.lr=2e-3", "deepspeed.zero_stage=3", "data.augment.scale=[0.5,1.0]"])
    assert cfg.model.img_size == 32                      # base
    assert cfg.optim.weight_decay == 0.1                 # recipe
    assert cfg.optim.lr == 2e-3                          # override wins over base
    assert cfg.deepspeed.zero_stage == 3
    assert cfg.data.augment.scale == (0.5, 1.0)
    assert cfg.schedule.epochs == 300                    # schema default
    assert cfg.logging.run_name == "child"               # named after the recipe file


def test_config_is_read_only(recipe):
    cfg = config.load(recipe)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0  # type: ignore[misc]


def test_yaml_round_trip(recipe, tmp_path):
    cfg = config.load(recipe, ["slurm.setup=['module load cuda']", "model.kwargs={global_pool: avg}"])
    saved = tmp_path / "resolved.yaml"
    saved.write_text(config.to_yaml(cfg))
    assert config.load(saved) == cfg


@pytest.mark.parametrize("override, key, fragment", [
    (["optim.lrr=1e-3"], "optim.lrr", "did you mean 'optim.lr'"),
    (["trian.seed=1"], "trian", "did you mean 'train'"),
    (["deepspeed.zero_stag=2"], "deepspeed.zero_stag", "did you mean 'deepspeed.zero_stage'"),
    (["optim.lr=-0.1"], "optim.lr", "must be > 0"),
    (["deepspeed.zero_stage=4"], "deepspeed.zero_stage", "one of 0, 1, 2, 3"),
    (["train.precision=fp8"], "train.precision", "'fp32', 'bf16', 'bf16-mixed', 'fp16'"),
    (["train.micro_batch_size=abc"], "train.micro_batch_size", "must be an integer"),
    (["train.micro_batch_size=1.5"], "train.micro_batch_size", "must be an integer"),
    (["train.activation_checkpointing=maybe"], "train.activation_checkpointing", "true or false"),
    (["train.global_batch_size=100"], "train.global_batch_size", "not divisible by train.micro_batch_size"),
    (["data.augment.scale=[0.5]"], "data.augment.scale", "must have 2 entries"),
    (["data.augment.hflip=1.5"], "data.augment.hflip", "probability"),
    (["schedule.warmup_epochs=400"], "schedule.warmup_epochs", "must be in [0, epochs=300)"),
    (["deepspeed.offload_param=cpu"], "deepspeed.offload_param", "zero_stage=3"),
    (["loss.distillation=soft"], "loss.teacher_model", "is required"),
    (["data.source=shards"], "data.train_shards", "is required"),
    (["model.num_classes=1000"], "model.num_classes", "must be 10 with data.source=embedded"),
    (["task=pose"], "task", "'classification', 'detection', 'segmentation'"),
    (["optim=3"], "optim", "is a section"),
    (["optim.lr"], "optim.lr", "section.key=value"),
    (["data.augment.three_augment=true"], "data.augment.three_augment", "set data.augment.auto_augment=null"),
    (["data.augment.auto_augment=bogus-m9"], "data.augment.auto_augment", "is not a timm policy"),
    (["model.kwargs={img_size: 64}"], "model.kwargs.img_size", "duplicates model.img_size"),
    (["data.image_size=64"], "model.img_size", "differs from data.image_size=64"),
    (["train.global_batch_size=33", "train.micro_batch_size=33"], "train.micro_batch_size", "must be even"),
    (["data.image_size=4", "model.img_size=4"], "data.image_size", "smaller than the embedded 8x8 digits"),
])
def test_bad_values_name_the_key(recipe, override, key, fragment):
    with pytest.raises(ConfigError) as info:
        config.load(recipe, override)
    assert info.value.key == key
    assert fragment in str(info.value)


def test_the_data_side_receives_the_validated_augmentation(recipe):
    cfg = config.load(recipe, ["data.augment.auto_augment=null", "data.augment.three_augment=true",
                               "data.augment.re_count=2", "data.mixup.mode=pair", "loss.label_smoothing=0.2"])
    d = cfg.data
    pipeline = build_train_pipeline(d.augment, d.image_size, d.mixup, 10, cfg.loss.label_smoothing)
    crop, *_, erasing = pipeline.transform.transforms
    three_augment = [type(step).__name__ for step in pipeline.transform.transforms if hasattr(step, "policy")]
    assert crop.size == (32, 32) and three_augment == ["AutoAugment"] and erasing.max_count == 2
    assert "Solarize" in repr(pipeline.transform) and "RandAugment" not in repr(pipeline.transform)
    mixup = pipeline.worker_mixup
    assert (mixup.mode, mixup.label_smoothing, mixup.mixup_alpha) == ("pair", 0.2, 0.8)
    unmixed = config.load(recipe, ["data.mixup.prob=0"]).data
    assert build_train_pipeline(unmixed.augment, unmixed.image_size, unmixed.mixup, 10, 0.1).worker_mixup is None


def test_unknown_key_in_recipe_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("data: {source: embedded}\nmodel: {num_classes: 10}\ntrain: {micro_batch: 8}\n")
    with pytest.raises(ConfigError, match=r"'train.micro_batch'.*did you mean 'train.micro_batch_size'"):
        config.load(path)


def test_missing_file_bad_yaml_and_base_cycle(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        config.load(tmp_path / "bad.yaml")
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        config.load(tmp_path / "a.yaml")


def test_world_size_must_divide_the_batch(recipe):
    cfg = config.load(recipe)  # global 256, micro 32
    assert config.check_world_size(cfg, 4) == 2          # accumulation steps
    with pytest.raises(ConfigError, match="not divisible by train.micro_batch_size x world size = 32 x 3"):
        config.check_world_size(cfg, 3)


def test_every_option_has_help_text():
    lines = config.describe()
    assert len(lines) > 100
    undocumented = [line for line in lines if line.rstrip().endswith(":") or line.endswith("] ")]
    assert not undocumented, undocumented
    assert any(line.startswith("slurm.signal_delay_s (int, default 120): Seconds") for line in lines)


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipes_load(path):
    cfg = config.load(path)
    assert cfg.logging.run_name == path.stem
    gpus = cfg.slurm.nodes * cfg.slurm.gpus_per_node
    assert config.check_world_size(cfg, gpus) >= 1  # the batch fits the GPUs the recipe names


def test_reading_a_recipe_imports_no_torch():
    """Launchers, submit hosts and slurm/run_dir.py read recipes without torch, timm or the models."""
    probe = ("import sys\nfrom anchorformer import config\nconfig.load('configs/demo.yaml')\n"
             "print(sorted(m for m in ('torch', 'timm', 'anchorformer.models') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
