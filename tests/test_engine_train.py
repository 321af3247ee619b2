"""Single-process training on the real embedded digits shards (DataLoader workers, mixup,
drop path): exact stop/resume through a real signal, NaN-step skipping, TensorBoard contents,
refused checkpoints. Each test runs ``run_training`` in this process (gloo, one rank)."""
from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import timm
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from anchorformer import config
from anchorformer.engine import TrainingDiverged, run_training
from anchorformer.tasks.classification import ClassificationTask

pytestmark = pytest.mark.slow

STEPS = 14  # 11 steps per epoch at micro-batch 128: the runs cross an epoch boundary


def _cfg(out: Path, cache: Path, name: str, **overrides: Any) -> config.RootConfig:
    base = {
        "model": {"name": "anchorformer_tiny_patch16_224", "num_classes": 10, "img_size": 16,
                  "drop_path_rate": 0.1,
                  "kwargs": {"patch_size": 4, "depth": 2, "embed_dim": 48, "num_heads": 2, "num_anchors": 8}},
        "data": {"source": "embedded", "cache_dir": str(cache), "image_size": 16, "num_workers": 2,
                 "shuffle_buffer": 100,
                 "augment": {"auto_augment": None, "re_prob": 0.25, "scale": [0.5, 1.0], "crop_pct": 1.0},
                 "mixup": {"prob": 1.0, "mixup_alpha": 0.8, "cutmix_alpha": 1.0}},
        "optim": {"lr": 2e-3, "lr_reference_batch": 0},
        "schedule": {"epochs": 3, "warmup_epochs": 0.5},
        "train": {"global_batch_size": 128, "micro_batch_size": 128, "precision": "fp32", "device": "cpu",
                  "max_steps": STEPS, "ema": {"enabled": True, "decay": 0.9}},
        "deepspeed": {"zero_stage": 0},
        "checkpoint": {"every_steps": 4, "keep_last": 2},
        "logging": {"output_dir": str(out), "run_name": name, "every_steps": 1, "progress_bar": False,
                    "peak_tflops": 1.0},
    }
    return config.from_dict(_merge(base, overrides))


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and key in base else value
    return merged


def _events(run_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return events


def _losses(run_dir: Path) -> list[float]:
    return [e.value for e in sorted(_events(run_dir).Scalars("train/loss"), key=lambda e: e.step)]


def _hook_loss(monkeypatch, hook: Callable[[int, torch.Tensor], torch.Tensor]) -> None:
    """Route every training loss through ``hook(call_index, loss)``."""
    original = ClassificationTask.training_loss
    calls = {"n": 0}

    def training_loss(self, model, batch):
        loss, logs = original(self, model, batch)
        calls["n"] += 1
        return hook(calls["n"] - 1, loss), logs

    monkeypatch.setattr(ClassificationTask, "training_loss", training_loss)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, embedded_cache_dir) -> tuple[Path, Any, config.RootConfig]:
    out = tmp_path_factory.mktemp("runs")
    cfg = _cfg(out, embedded_cache_dir, "straight")
    return out / "straight", run_training(cfg), cfg


def test_run_writes_tensorboard_config_summary_and_checkpoints(uninterrupted):
    run_dir, result, cfg = uninterrupted
    assert result.status == "completed" and result.step == STEPS and result.epoch == 1
    events = _events(run_dir)
    scalars = set(events.Tags()["scalars"])
    expected = {"train/loss", "train/lr", "train/grad_norm", "train/nonfinite_steps", "perf/samples_per_s",
                "perf/step_time_s", "perf/data_wait_s", "perf/tflops_per_device", "perf/mfu",
                "memory/peak_gb", "eval/top1", "eval/top5", "eval/loss", "eval_ema/top1", "eval_ema/top5"}
    assert expected <= scalars, expected - scalars
    assert any(tag.startswith("skipped/train/") for tag in scalars)
    # the anchors at each evaluation (scalars, histograms, maps) and the inputs once, as the model got them
    assert {"anchors/dead_total", "anchors/entropy/layer_00"} <= scalars
    assert "eval/linear_baseline_top1" in scalars and (run_dir / "linear_baseline.json").is_file()
    assert "anchors/degree/layer_00" in events.Tags()["histograms"]
    assert {"inputs/train_batch", "anchors/maps/layer_00"} <= set(events.Tags()["images"])
    assert "config/text_summary" in events.Tags()["tensors"]
    assert len(events.Scalars("train/loss")) == STEPS
    assert len(events.Scalars("eval/top1")) == 2  # end of epoch 1, and at max_steps mid-epoch 2
    # the saved config reloads to the same config
    assert config.load(run_dir / "config.yaml") == cfg
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == STEPS
    assert summary["metrics"]["eval/top1"] == result.metrics["eval/top1"]
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text() == f"step_{STEPS}"
    # every 4 steps + epoch end (11) + final (14), only the newest 2 kept
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["step_12", f"step_{STEPS}"]


def test_signal_stop_then_resume_repeats_the_uninterrupted_run_exactly(
        tmp_path, embedded_cache_dir, uninterrupted, monkeypatch):
    straight_dir, straight, _ = uninterrupted

    def send_usr1_during_step_six(index: int, loss: torch.Tensor) -> torch.Tensor:
        if index == 5:
            os.kill(os.getpid(), signal.SIGUSR1)  # delivered now; honoured at the step boundary
        return loss

    _hook_loss(monkeypatch, send_usr1_during_step_six)
    stopped = run_training(_cfg(tmp_path, embedded_cache_dir, "interrupted"))
    assert stopped.status == "stopped" and stopped.step == 6
    assert (tmp_path / "interrupted" / "checkpoints" / "latest").read_text() == "step_6"
    monkeypatch.undo()

    resumed = run_training(_cfg(tmp_path, embedded_cache_dir, "interrupted"))
    assert resumed.status == "completed" and resumed.step == STEPS
    assert _losses(tmp_path / "interrupted") == _losses(straight_dir)
    for key in ("eval/top1", "eval/loss", "eval_ema/top1", "eval_ema/loss"):
        assert resumed.metrics[key] == straight.metrics[key], key


def test_nonfinite_loss_step_is_skipped_and_counted(tmp_path, embedded_cache_dir, monkeypatch):
    snapshots: list[dict[str, torch.Tensor]] = []
    from anchorformer.engine import trainer as trainer_module

    original_step = trainer_module.Trainer._train_step

    def recording_step(self, batches):
        snapshots.append({n: p.detach().clone() for n, p in self.engine.module.named_parameters()})
        return original_step(self, batches)

    monkeypatch.setattr(trainer_module.Trainer, "_train_step", recording_step)
    _hook_loss(monkeypatch, lambda index, loss: loss * float("nan") if index == 2 else loss)
    result = run_training(_cfg(tmp_path, embedded_cache_dir, "nan", train={"max_steps": 5}))

    assert result.status == "completed" and result.step == 5
    assert result.metrics["run/nonfinite_steps"] == 1
    assert all(torch.equal(snapshots[2][n], snapshots[3][n]) for n in snapshots[2])  # step 3 skipped
    assert not all(torch.equal(snapshots[1][n], snapshots[2][n]) for n in snapshots[1])  # others update
    losses = _losses(tmp_path / "nan")
    assert losses[2] != losses[2] and all(x == x for i, x in enumerate(losses) if i != 2)
    assert _events(tmp_path / "nan").Scalars("train/nonfinite_steps")[-1].value == 1


def _max_weight(tag_dir: Path) -> float:
    """Largest |weight| of a ZeRO-0 checkpoint."""
    module = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    return max(tensor.abs().max().item() for tensor in module.values())


def test_persistent_nonfinite_loss_stops_with_the_checkpoint_from_before_the_streak(
        tmp_path, embedded_cache_dir, monkeypatch):
    _hook_loss(monkeypatch, lambda index, loss: loss * float("inf") if index >= 3 else loss)
    cfg = _cfg(tmp_path, embedded_cache_dir, "diverged", train={"nonfinite_patience": 2},
               checkpoint={"every_steps": 2})
    with pytest.raises(TrainingDiverged, match="2 steps in a row"):
        run_training(cfg)
    checkpoints = tmp_path / "diverged" / "checkpoints"
    # steps 4 and 5 were skipped: the checkpoint due at step 4 was not written
    assert (checkpoints / "latest").read_text() == "step_2"
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["step_2"]
    summary = json.loads((tmp_path / "diverged" / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["step"] == 5
    assert summary["diverged"]["first_step"] == 4 and summary["diverged"]["last_step"] == 5
    assert summary["latest_checkpoint"] == str(checkpoints / "step_2")
    assert summary["metrics"]["run/nonfinite_steps"] == 2
    monkeypatch.undo()
    resumed = run_training(_cfg(tmp_path, embedded_cache_dir, "diverged", train={"max_steps": 6}))
    assert resumed.step == 6 and resumed.metrics["run/nonfinite_steps"] == 0


class _NonFiniteGradient(torch.autograd.Function):
    """The identity forward; a NaN gradient backward: a finite loss that spoils the weights."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


def test_a_finite_loss_with_a_nan_gradient_writes_no_checkpoint_of_the_spoiled_weights(
        tmp_path, embedded_cache_dir, monkeypatch):
    _hook_loss(monkeypatch, lambda index, loss: _NonFiniteGradient.apply(loss) if index == 3 else loss)
    cfg = _cfg(tmp_path, embedded_cache_dir, "nan_grad", checkpoint={"every_steps": 2})
    with pytest.raises(TrainingDiverged, match="step 4: .* weight values are NaN/inf although the loss was finite"):
        run_training(cfg)
    checkpoints = tmp_path / "nan_grad" / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_2" and not (checkpoints / "step_4").exists()
    assert math.isfinite(_max_weight(checkpoints / "step_2"))
    summary = json.loads((tmp_path / "nan_grad" / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["step"] == 4
    assert all(math.isfinite(x) for x in _losses(tmp_path / "nan_grad"))  # the loss never told


def test_a_run_diverging_at_lr_1e6_keeps_latest_on_sane_weights_that_resume_at_a_sane_lr(
        tmp_path, embedded_cache_dir):
    """optim.lr=1e6 blows the weights up in one update; the spike guard skips the steps whose loss
    then explodes, no checkpoint is written during them, and `latest` keeps the weights of before."""
    guard = {"spike_threshold": 3.0, "spike_window": 2, "spike_patience": 3, "ema": {"enabled": False}}
    run = _cfg(tmp_path, embedded_cache_dir, "lr1e6", train={**guard, "max_steps": 4}, checkpoint={"every_steps": 2})
    assert run_training(run).status == "completed"  # a sane start: step_2, step_4
    checkpoints = tmp_path / "lr1e6" / "checkpoints"
    sane = _max_weight(checkpoints / "step_4")
    blown = _cfg(tmp_path, embedded_cache_dir, "lr1e6", optim={"lr": 1e6}, train=guard, checkpoint={"every_steps": 2})
    with pytest.raises(TrainingDiverged, match="spiked above 3 x its running median for 3 steps in a row"):
        run_training(blown)
    assert (checkpoints / "latest").read_text() == "step_4" and _max_weight(checkpoints / "step_4") == sane < 100
    summary = json.loads((tmp_path / "lr1e6" / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["metrics"]["run/spike_steps"] == 3
    started = time.time()
    resumed = run_training(_cfg(tmp_path, embedded_cache_dir, "lr1e6", train={**guard, "max_steps": 8}))
    losses = [e.value for e in _events(tmp_path / "lr1e6").Scalars("train/loss") if e.wall_time > started]
    assert resumed.status == "completed" and resumed.metrics["run/spike_steps"] == 0
    assert len(losses) == 4 and all(math.isfinite(x) and x < 5 for x in losses), losses  # steps 5-8


@pytest.mark.parametrize("change, message", [
    ({"model": {"kwargs": {"patch_size": 4, "depth": 3, "embed_dim": 48, "num_heads": 2, "num_anchors": 8}}},
     "another model"),
    ({"train": {"global_batch_size": 64, "micro_batch_size": 64}}, "train.global_batch_size=128; this run uses 64"),
])
def test_resume_refuses_checkpoint_of_other_model_or_global_batch(tmp_path, embedded_cache_dir, uninterrupted,
                                                                  change, message):
    """(Another ZeRO stage or number of processes resumes: tests/test_reshard.py.)"""
    run_dir, _, _ = uninterrupted
    change = {**change, "train": {**change.get("train", {}), "resume": str(run_dir / "checkpoints")}}
    cfg = _cfg(tmp_path, embedded_cache_dir, "other", **change)
    with pytest.raises(ValueError, match=message):  # refused at the door (ConfigError naming train.resume)
        run_training(cfg)


def test_hard_distillation_from_a_local_teacher_checkpoint(tmp_path, embedded_cache_dir):
    arch = {"patch_size": 4, "depth": 2, "embed_dim": 48, "num_heads": 2, "num_anchors": 8}
    teacher = timm.create_model("anchorformer_tiny_patch16_224", num_classes=10, img_size=16, **arch)
    torch.save({"state_dict": teacher.state_dict()}, tmp_path / "teacher.pth")
    cfg = _cfg(tmp_path, embedded_cache_dir, "distilled", train={"max_steps": 3, "ema": {"enabled": False}},
               model={"name": "anchorformer_tiny_distilled_patch16_224"},
               loss={"distillation": "hard", "teacher_model": "anchorformer_tiny_patch16_224",
                     "teacher_checkpoint": str(tmp_path / "teacher.pth"),
                     "teacher_kwargs": {"img_size": 16, **arch}})
    result = run_training(cfg)
    assert result.status == "completed" and result.step == 3
    losses = _losses(tmp_path / "distilled")
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert 0.0 <= result.metrics["eval/top1"] <= 100.0


def test_distillation_needs_a_model_with_a_distillation_token(tmp_path, embedded_cache_dir):
    torch.save(timm.create_model("anchorformer_tiny_patch16_224", num_classes=10).state_dict(),
               tmp_path / "teacher.pth")
    cfg = _cfg(tmp_path, embedded_cache_dir, "plain",
               loss={"distillation": "soft", "teacher_model": "anchorformer_tiny_patch16_224",
                     "teacher_checkpoint": str(tmp_path / "teacher.pth")})
    with pytest.raises(ValueError, match="needs a model with a distillation token"):
        run_training(cfg)


def test_bf16_mixed_trains_fp32_weights_with_bf16_matmuls(tmp_path, embedded_cache_dir, monkeypatch):
    from anchorformer.engine import trainer as trainer_module

    seen: dict[str, set] = {"weights": set(), "matmul outputs": set()}
    original_step = trainer_module.Trainer._train_step

    def recording_step(self, batches):
        fc = self.engine.module.blocks[0].mlp.fc1
        seen["weights"].add(fc.weight.dtype)
        hook = fc.register_forward_hook(lambda module, args, out: seen["matmul outputs"].add(out.dtype))
        try:
            return original_step(self, batches)
        finally:
            hook.remove()

    monkeypatch.setattr(trainer_module.Trainer, "_train_step", recording_step)
    result = run_training(_cfg(tmp_path, embedded_cache_dir, "bf16-mixed",
                               train={"precision": "bf16-mixed", "max_steps": 3, "ema": {"enabled": False}},
                               deepspeed={"zero_stage": 1}))
    assert result.status == "completed" and math.isfinite(result.metrics["eval/loss"])
    assert seen == {"weights": {torch.float32}, "matmul outputs": {torch.bfloat16}}
