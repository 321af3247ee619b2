"""The recipes in configs/: every one loads and fits the world size it is written for; in1k_* hold
DeiT's main.py defaults; each deit_* baseline differs from its AnchorFormer recipe in the model
alone; the distillation loss is DeiT's; every distilled recipe, and small_cpu.yaml on an image
folder packed into shards, trains through launch/train.py (made tiny on the command line)."""
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F
from data_fixtures import make_jpeg_tree
from dense_fixtures import train_recipe
from helpers import REPO, cpu_env
from torch import nn

from anchorformer import config
from anchorformer.config import LossConfig
from anchorformer.engine.optim import peak_lr
from anchorformer.tasks.losses import ClassificationLoss

CONFIGS = REPO / "configs"
RECIPES = sorted(path.name for path in CONFIGS.glob("*.yaml"))
DISTILLED = [name for name in RECIPES if "distilled" in name]
TINY_TEACHER = "regnety_002"  # the smallest RegNetY, standing in for DeiT's regnety_160
TINY_MODEL = {"patch_size": 4, "depth": 1, "embed_dim": 32, "num_heads": 2}


def _load(name: str, overrides: tuple[str, ...] = ()) -> config.RootConfig:
    return config.load(CONFIGS / name, list(overrides))


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_loads_and_fits_the_world_size_it_is_written_for(name):
    cfg = _load(name, ("model.num_classes=5",) if name == "small_cpu.yaml" else ())
    world_size = cfg.slurm.nodes * cfg.slurm.gpus_per_node
    assert config.check_world_size(cfg, world_size) >= 1
    assert timm.is_model(cfg.model.name), cfg.model.name
    if cfg.loss.distillation != "none":
        assert timm.is_model(cfg.loss.teacher_model) and cfg.loss.teacher_checkpoint
        assert hasattr(timm.create_model(cfg.model.name, pretrained=False, img_size=32, **TINY_MODEL),
                       "set_distilled_training"), f"{name} distills into a model without a distillation token"


@pytest.mark.parametrize("size", ["tiny", "small", "base", "tiny_distilled", "small_distilled", "base_distilled"])
def test_in1k_recipes_hold_deit_main_py_defaults(size):
    cfg = _load(f"in1k_{size}.yaml")
    d, s, t = cfg.data, cfg.schedule, cfg.train
    assert (s.epochs, s.warmup_epochs, s.warmup_lr, s.min_lr, s.decay) == (300, 5, 1e-6, 1e-5, "cosine")
    assert t.global_batch_size == 1024 and peak_lr(cfg) == pytest.approx(5e-4 * 1024 / 512)
    assert (cfg.optim.name, cfg.optim.weight_decay, cfg.optim.eps, t.grad_clip) == ("adamw", 0.05, 1e-8, 0.0)
    assert cfg.loss.label_smoothing == 0.1 and d.augment.auto_augment == "rand-m9-mstd0.5-inc1"
    assert (d.mixup.mixup_alpha, d.mixup.cutmix_alpha, d.mixup.prob, d.mixup.switch_prob) == (0.8, 1.0, 1.0, 0.5)
    assert (d.augment.re_prob, d.augment.re_mode, d.augment.re_count, d.augment.crop_pct) == (0.25, "pixel", 1, 0.875)
    assert d.repeated_aug == 3 and cfg.model.drop_path_rate == 0.1 and cfg.model.drop_rate == 0.0
    assert t.ema.enabled and t.ema.decay == 0.99996 and t.ema.every_steps == 1
    assert cfg.model.name.startswith("anchorformer_")
    distilled = ("hard", "regnety_160", 0.5) if "distilled" in size else ("none", None, 0.5)
    assert (cfg.loss.distillation, cfg.loss.teacher_model, cfg.loss.distillation_alpha) == distilled


@pytest.mark.parametrize("name", [name for name in RECIPES if name.startswith("deit_")])
def test_each_deit_baseline_differs_from_its_anchorformer_recipe_in_the_model_alone(name):
    twin = name[len("deit_"):]
    anchor, deit = config.to_dict(_load(twin)), config.to_dict(_load(name))
    assert deit["model"]["name"] == anchor["model"]["name"].replace("anchorformer_", "deit_")
    for recipe in (anchor, deit):
        del recipe["model"]["name"], recipe["model"]["pretrained_checkpoint"], recipe["logging"]["run_name"]
    assert deit == anchor


def test_hard_distillation_is_deits_and_needs_the_distillation_head():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(12, 10))
    images, labels = torch.randn(4, 3, 2, 2), torch.randint(0, 10, (4,))
    mixed = torch.softmax(torch.randn(4, 10), -1)  # soft (mixup) targets, as in every in1k recipe
    cls_logits, dist_logits = torch.randn(4, 10), torch.randn(4, 10)
    loss = ClassificationLoss(_load("in1k_tiny_distilled.yaml").loss, teacher)
    # DeiT losses.py: base_loss * (1 - alpha) + F.cross_entropy(outputs_kd, teacher(inputs).argmax(1)) * alpha,
    # base = SoftTargetCrossEntropy under mixup
    base = torch.sum(-mixed * F.log_softmax(cls_logits, -1), -1).mean()
    expected = 0.5 * base + 0.5 * F.cross_entropy(dist_logits, teacher(images).argmax(-1))
    assert loss((cls_logits, dist_logits), mixed, images) == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="distillation token"):
        loss(cls_logits, mixed, images)
    plain = ClassificationLoss(LossConfig(label_smoothing=0.1))
    assert plain((cls_logits, dist_logits), labels) == pytest.approx(
        F.cross_entropy(cls_logits, labels, label_smoothing=0.1).item(), rel=1e-6)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A local teacher weights file for 10 classes (DeiT's RegNetY-16GF is 84 M parameters)."""
    path = tmp_path_factory.mktemp("teacher") / f"{TINY_TEACHER}.pth"
    torch.save(timm.create_model(TINY_TEACHER, num_classes=10).state_dict(), path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("name", DISTILLED)
def test_distilled_recipe_trains_two_steps_with_a_local_teacher(name, tiny_teacher, embedded_cache_dir, tmp_path):
    model = _load(name).model
    kwargs = {**TINY_MODEL, **({"num_anchors": 4} if model.name.startswith("anchorformer_") else {})}
    overrides = [
        "data.source=embedded", f"data.cache_dir={embedded_cache_dir}", "data.num_workers=0",
        "data.shuffle_buffer=64", "model.num_classes=10", "model.img_size=16", "data.image_size=16",
        "model.kwargs={" + ", ".join(f"{k}: {v}" for k, v in kwargs.items()) + "}",
        "train.global_batch_size=8", "train.micro_batch_size=8", "train.max_steps=2", "train.precision=fp32",
        "train.device=cpu", "deepspeed.zero_stage=0", "logging.tensorboard=false",
        f"loss.teacher_model={TINY_TEACHER}", f"loss.teacher_checkpoint={tiny_teacher}",
    ]
    if model.pretrained_checkpoint:  # the fine-tunes start from weights of a smaller grid (pos_embed resized)
        pretrained = tmp_path / "pretrained.pth"
        torch.save(timm.create_model(model.name, num_classes=10, img_size=8, **kwargs).state_dict(), pretrained)
        overrides.append(f"model.pretrained_checkpoint={pretrained}")
    summary = train_recipe(name, overrides, tmp_path / "runs", "smoke")
    assert summary["status"] == "completed" and summary["step"] == 2
    resolved = config.load(tmp_path / "runs" / "smoke" / "config.yaml")
    assert (resolved.loss.distillation, resolved.loss.teacher_model) == ("hard", TINY_TEACHER)
    assert resolved.data.repeated_aug == 3 and resolved.train.ema.enabled  # the recipe's own settings ran


@pytest.mark.slow
def test_small_cpu_recipe_trains_on_an_image_folder_packed_into_shards(tmp_path):
    shards = tmp_path / "shards"
    for split, per_class in (("train", 40), ("val", 6)):
        make_jpeg_tree(tmp_path / "my_data" / split, {"cat": per_class, "dog": per_class, "owl": per_class})
        subprocess.run([sys.executable, str(REPO / "tools" / "make_shards.py"), "imagefolder",
                        str(tmp_path / "my_data" / split), "--out", str(shards), "--name", split, "--quiet"],
                       check=True, cwd=tmp_path, env=cpu_env(), timeout=300)
    # the README's command, from the folder holding shards/, with 2 steps instead of 30 epochs
    summary = train_recipe("small_cpu.yaml", ["model.num_classes=3", "train.max_steps=2"], tmp_path / "runs",
                           "small_cpu")
    assert summary["status"] == "completed" and summary["step"] == 2
    assert 0.0 <= summary["metrics"]["eval/top1"] <= 100.0 and summary["metrics"]["eval/samples"] == 18
