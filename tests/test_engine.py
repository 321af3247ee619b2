"""Fast checks of the engine's parts: launcher detection, lr schedule, parameter groups,
DeepSpeed config, skippable optimizer, losses, EMA, checkpoint lookup, pre-trained loading,
the Trainer's per-step callbacks."""
from __future__ import annotations

import json
import math
import os

import pytest
import timm
import torch
import torch.nn.functional as F
from engine_fixtures import STEPS, cpu_runtime, logged_scalars, synthetic_config, synthetic_task_class
from safetensors.torch import save_file
from torch import nn

import anchorformer.models  # noqa: F401  (registers the models)
from anchorformer import config, dist
from anchorformer.config import LossConfig
from anchorformer.engine import deepspeed_config
from anchorformer.engine.checkpoint import CheckpointError, find_resume_point, model_signature
from anchorformer.engine.ema import ShardedEma
from anchorformer.engine.metrics import measure_forward_flops
from anchorformer.engine.optim import (SGD, AdamW, LrSchedule, build_optimizer, param_groups, peak_lr,
                                       skip_step_where)
from anchorformer.engine.step_guard import StepGuard, StepOutcome, TrainingDiverged
from anchorformer.engine.trainer import StepInfo, Trainer
from anchorformer.run_folder import CheckpointFolder, CheckpointMeta
from anchorformer.tasks import task_class
from anchorformer.tasks.classification import load_pretrained
from anchorformer.tasks.losses import ClassificationLoss, load_teacher, soft_target_cross_entropy


def _tiny(**kwargs) -> nn.Module:
    args = dict(num_classes=10, img_size=16, patch_size=4, depth=3, embed_dim=24, num_heads=2, num_anchors=4)
    return timm.create_model("anchorformer_tiny_patch16_224", **{**args, **kwargs})


def _cfg(**sections) -> config.RootConfig:
    return config.from_dict({"data": {"source": "embedded"}, "model": {"num_classes": 10}, **sections})


# ---------------------------------------------------------------- launcher detection
def test_detect_torchrun():
    env = dist.detect({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "node7", "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "x"},
                      argv=["train.py"], cuda_available=True)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 4, 1, 2)
    assert (env.master_addr, env.master_port, env.launcher, env.backend) == ("node7", 29400, "torchrun", "nccl")


def test_detect_deepspeed_launcher_reads_local_rank_argument():
    env = dist.detect({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
                       "LOCAL_SIZE": "2", "CROSS_RANK": "0"},
                      argv=["train.py", "--local_rank=1", "configs/demo.yaml"], cuda_available=False)
    assert (env.launcher, env.local_rank, env.local_world_size, env.backend) == ("deepspeed", 1, 2, "gloo")


def test_detect_srun_step_derives_master_and_port_from_slurm():
    env = dist.detect({"SLURM_STEP_NUM_TASKS": "16", "SLURM_PROCID": "9", "SLURM_LOCALID": "1",
                       "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
                       "SLURM_STEP_NODELIST": "gpu[017-018]", "SLURM_JOB_ID": "123456"},
                      argv=["train.py"], cuda_available=True)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (9, 16, 1, 8)
    assert env.launcher == "slurm" and env.master_addr == "gpu017"
    assert env.master_port == dist.slurm_port(123456) == 15000 + 123456 % 20000


def test_batch_script_without_srun_step_is_a_single_process():
    env = dist.detect({"SLURM_JOB_ID": "5", "SLURM_PROCID": "0", "SLURM_NTASKS": "8"}, argv=[],
                      cuda_available=False)
    assert (env.launcher, env.world_size) == ("single", 1)


@pytest.mark.parametrize("nodelist, first", [("node5", "node5"), ("gpu[03-05,9],cpu1", "gpu03"),
                                             ("a-b[1,2]", "a-b1")])
def test_slurm_first_host(nodelist, first):
    assert dist.slurm_first_host(nodelist) == first


def test_detect_rejects_inconsistent_variables():
    with pytest.raises(ValueError, match="rank 4 outside world size 4"):
        dist.detect({"RANK": "4", "WORLD_SIZE": "4"}, argv=[], cuda_available=False)
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not an integer"):
        dist.detect({"RANK": "0", "WORLD_SIZE": "two"}, argv=[], cuda_available=False)


def test_the_device_follows_train_device_and_must_fit_the_process_group():
    gloo, nccl = (dist.detect({}, argv=[], cuda_available=cuda) for cuda in (False, True))
    assert not dist.uses_cuda("cpu") and dist.resolve_device("cpu", gloo) == torch.device("cpu")
    with pytest.raises(ValueError, match="train.device=cpu trains on CPU but the process group uses nccl"):
        dist.resolve_device("cpu", nccl)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="train.device=cuda but no CUDA device is visible"):
            dist.uses_cuda("cuda")


def test_in_lockstep_without_process_group_yields_every_item():
    assert list(dist.in_lockstep([1, 2, 3], filler=0, device=torch.device("cpu"))) == [(1, True), (2, True),
                                                                                      (3, True)]


# ---------------------------------------------------------------- optimizer and schedule
def test_lr_schedule_warmup_then_cosine():
    schedule = LrSchedule(peak=1.0, warmup_steps=10, total_steps=110, warmup_lr=0.0, min_lr=0.1)
    assert schedule(0) == 0.0 and schedule(5) == pytest.approx(0.5)
    assert schedule(10) == pytest.approx(1.0)
    assert schedule(60) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert schedule(110) == pytest.approx(0.1) and schedule(500) == pytest.approx(0.1)
    values = [schedule(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_lr_schedule_from_epochs_and_batch_scaling():
    cfg = _cfg(optim={"lr": 5e-4, "lr_reference_batch": 512}, train={"global_batch_size": 1024},
               schedule={"epochs": 10, "warmup_epochs": 2, "decay": "constant"})
    peak = peak_lr(cfg)
    assert peak == pytest.approx(1e-3)
    schedule = LrSchedule.from_config(cfg.schedule, peak, steps_per_epoch=50, total_steps=500)
    assert schedule.warmup_steps == 100 and schedule(300) == pytest.approx(1e-3)


def test_param_groups_exclude_norms_biases_tokens_from_weight_decay():
    model = _tiny()
    groups = param_groups(model, _cfg(optim={"weight_decay": 0.05}).optim)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    decay = {names[id(p)] for g in groups if g["weight_decay"] > 0.0 for p in g["params"]}
    assert {"pos_embed", "cls_token", "norm.weight", "norm.bias", "head.bias", "blocks.0.norm1.weight"} <= no_decay
    assert {"head.weight", "blocks.0.attn.qk_v.weight", "patch_embed.proj.weight"} <= decay
    assert not decay & no_decay and len(decay | no_decay) == len(names)


def test_layer_decay_scales_lr_by_depth():
    model = _tiny()
    groups = param_groups(model, _cfg(optim={"layer_decay": 0.5}).optim)
    scale = {n: g["lr_scale"] for g in groups for n, p in model.named_parameters()
             if any(p is q for q in g["params"])}
    assert scale["head.weight"] == 1.0
    assert scale["blocks.2.mlp.fc1.weight"] == pytest.approx(0.5)
    assert scale["blocks.0.mlp.fc1.weight"] == pytest.approx(0.125)
    assert scale["patch_embed.proj.weight"] == pytest.approx(0.0625)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_a_step_skipped_on_the_device_changes_nothing_and_later_steps_match_an_unskipped_run(name):
    """skip_step_where drops the update in the fused kernel (the host never reads the flag), also
    as the very first step (SGD's momentum buffers), and leaves no trace in the steps after it."""
    optim = _cfg(optim={"name": name, "weight_decay": 0.05}).optim
    model, reference = nn.Linear(4, 2), nn.Linear(4, 2)
    reference.load_state_dict(model.state_dict())
    optimizer, plain = build_optimizer(model, optim), build_optimizer(reference, optim)
    assert isinstance(optimizer, AdamW if name == "adamw" else SGD) and optimizer.defaults["fused"]
    before = [p.detach().clone() for p in model.parameters()]
    for step in range(4):
        for net in (model, reference):
            net.zero_grad()
            net(torch.arange(12.0).view(3, 4) / (step + 1)).square().sum().backward()
        skip_step_where(optimizer, torch.tensor(1.0 if step == 0 else 0.0), torch.device("cpu"))
        optimizer.step()
        if step == 0:
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        else:
            plain.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))
    assert not torch.equal(before[0], model.weight)


def test_step_guard_judges_spikes_against_the_median_of_applied_steps_and_keeps_its_window():
    train = _cfg(train={"spike_threshold": 3.0, "spike_window": 3, "spike_patience": 2}).train
    guard = StepGuard(train, torch.device("cpu"))

    def decide(judge: StepGuard, loss: float, nonfinite: float = 0.0) -> float:
        skip, values = judge.decide(torch.tensor([nonfinite, 2 * loss, 0.0]), micro_batches=2)
        assert values[0].item() == loss and values[1].item() == (nonfinite > 0)
        return skip.item()

    assert [decide(guard, loss) for loss in (2.0, 40.0, 3.0)] == [0.0, 0.0, 0.0]  # filling: not judged
    assert decide(guard, 1.0, nonfinite=1.0) == 1.0  # skipped, and not in the window
    assert decide(guard, 9.5) == 1.0 and decide(guard, 8.5) == 0.0  # 3 x median(2, 40, 3) = 9
    clone = StepGuard(train, torch.device("cpu"))
    clone.load_state_dict(guard.state_dict())  # window (8.5, 40, 3): 3 x median = 25.5
    assert [decide(judge, loss) for judge in (clone, guard) for loss in (26.0, 25.0)] == [1.0, 0.0, 1.0, 0.0]
    for step, spike in ((7, True), (8, True)):
        outcome = StepOutcome(step, 0.1, float("nan"), nonfinite=False, spike=spike, stop=False)
        if step == 8:
            with pytest.raises(TrainingDiverged, match="for 2 steps in a row .steps 7-8.") as diverged:
                guard.account(outcome)
            assert (diverged.value.first_step, diverged.value.last_step, guard.spike_steps) == (7, 8, 2)
        else:
            guard.account(outcome)
            assert guard.in_streak and guard.streak_start == 7


# ---------------------------------------------------------------- DeepSpeed config
def test_deepspeed_config_per_stage():
    cfg = _cfg(train={"global_batch_size": 256, "micro_batch_size": 32, "precision": "bf16", "grad_clip": 1.0},
               deepspeed={"zero_stage": 3, "offload_optimizer": "cpu", "offload_param": "cpu"})
    ds = deepspeed_config.build(cfg, world_size=4)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        256, 32, 2)
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"] and ds["gradient_clipping"] == 1.0
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == "cpu"
    assert zero["offload_param"]["device"] == "cpu" and "stage3_prefetch_bucket_size" in zero
    plain = deepspeed_config.build(_cfg(deepspeed={"zero_stage": 0}, train={"precision": "fp32"}), 8)
    assert plain["zero_optimization"] == {"stage": 0} and not plain["bf16"]["enabled"]
    with pytest.raises(config.ConfigError, match="train.global_batch_size"):
        deepspeed_config.build(cfg, world_size=3)


def test_bf16_mixed_keeps_fp32_weights_under_torch_autocast():
    ds = deepspeed_config.build(_cfg(train={"precision": "bf16-mixed"}), world_size=1)
    assert not ds["bf16"]["enabled"] and ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    plain = deepspeed_config.build(_cfg(train={"precision": "bf16"}), world_size=1)
    assert plain["bf16"]["enabled"] and not plain["torch_autocast"]["enabled"]


# ---------------------------------------------------------------- losses
def test_soft_targets_equal_hard_cross_entropy_for_one_hot():
    logits, labels = torch.randn(6, 5), torch.randint(0, 5, (6,))
    assert soft_target_cross_entropy(logits, F.one_hot(labels, 5).float()) == pytest.approx(
        F.cross_entropy(logits, labels).item(), rel=1e-6)


def test_label_smoothing_and_distillation():
    logits, labels = torch.randn(4, 10), torch.randint(0, 10, (4,))
    smooth = ClassificationLoss(LossConfig(label_smoothing=0.1))
    assert smooth(logits, labels) == pytest.approx(
        F.cross_entropy(logits, labels, label_smoothing=0.1).item(), rel=1e-6)

    teacher = nn.Sequential(nn.Flatten(), nn.Linear(12, 10))
    images = torch.randn(4, 3, 2, 2)
    cls_logits, dist_logits = torch.randn(4, 10), torch.randn(4, 10)
    hard = ClassificationLoss(LossConfig(label_smoothing=0.0, distillation="hard", teacher_model="x",
                                         teacher_checkpoint="y", distillation_alpha=0.5), teacher)
    expected = 0.5 * F.cross_entropy(cls_logits, labels) + 0.5 * F.cross_entropy(
        dist_logits, teacher(images).argmax(-1))
    assert hard((cls_logits, dist_logits), labels, images) == pytest.approx(expected.item(), rel=1e-6)

    soft = ClassificationLoss(LossConfig(label_smoothing=0.0, distillation="soft", teacher_model="x",
                                         teacher_checkpoint="y", distillation_alpha=1.0, distillation_tau=2.0),
                              teacher)
    p_teacher = F.softmax(teacher(images) / 2.0, -1)
    kl = (p_teacher * (p_teacher.log() - F.log_softmax(dist_logits / 2.0, -1))).sum() * 4.0 / dist_logits.numel()
    assert soft((cls_logits, dist_logits), labels, images) == pytest.approx(kl.item(), rel=1e-5)


def test_teacher_checkpoint_must_exist_and_fit(tmp_path):
    cfg = LossConfig(distillation="hard", teacher_model="anchorformer_tiny_patch16_224",
                     teacher_checkpoint=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="teacher_checkpoint=.*does not exist"):
        load_teacher(cfg, 10, torch.device("cpu"), torch.float32)
    wrong = tmp_path / "wrong.pth"
    torch.save({"state_dict": nn.Linear(2, 2).state_dict()}, wrong)
    cfg = LossConfig(distillation="hard", teacher_model="anchorformer_tiny_patch16_224",
                     teacher_checkpoint=str(wrong))
    with pytest.raises(ValueError, match="does not fit"):
        load_teacher(cfg, 10, torch.device("cpu"), torch.float32)


# ---------------------------------------------------------------- EMA, FLOPs, pre-trained weights
def test_ema_update_swap_and_state_round_trip():
    model = nn.Linear(3, 1)
    ema = ShardedEma(model, decay=0.5)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(2.0)
    ema.update()
    assert torch.allclose(ema.shadow["weight"], start + 1.0)
    with ema.swapped_in():
        assert torch.allclose(model.weight, start + 1.0)
    assert torch.allclose(model.weight, start + 2.0)
    restored = ShardedEma(model, decay=0.5)
    state = ema.state_dict()
    restored.load_state_dict(state)
    assert torch.equal(restored.full_state_dict()["weight"], ema.shadow["weight"]) and restored.updates == 1
    two_ranks = [{"updates": 1, "chunks": {}} for _ in range(2)]  # each rank's half of every flat average
    for name, average in ema.shadow.items():
        padded = torch.zeros(2 * -(-average.numel() // 2))
        padded[: average.numel()] = average.reshape(-1)
        for rank, half in enumerate(padded.chunk(2)):
            two_ranks[rank]["chunks"][name] = half
    resharded = ShardedEma(model, decay=0.5)
    resharded.load_resharded(two_ranks)
    assert all(torch.equal(resharded.shadow[n], ema.shadow[n]) for n in ema.shadow) and resharded.updates == 1
    with pytest.raises(ValueError, match="another model"):
        ShardedEma(nn.Linear(4, 1), 0.5).load_state_dict(state)


def test_forward_flops_are_measured():
    assert measure_forward_flops(nn.Linear(8, 4, bias=False), torch.zeros(1, 8)) == 2 * 8 * 4


def test_pretrained_weights_load_with_new_head_and_resized_pos_embed(tmp_path):
    source = _tiny(num_classes=21)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    target = _tiny(num_classes=10, img_size=32)
    load_pretrained(target, str(path))
    assert torch.equal(target.blocks[1].mlp.fc1.weight, source.blocks[1].mlp.fc1.weight)
    assert target.pos_embed.shape == (1, 65, 24)
    with pytest.raises(ValueError, match="does not exist"):
        load_pretrained(target, str(tmp_path / "none.safetensors"))
    with pytest.raises(ValueError):
        load_pretrained(_tiny(depth=5), str(path))


def test_unknown_task_lists_the_registered_ones():
    assert task_class("classification").__name__ == "ClassificationTask"
    with pytest.raises(ValueError, match="unknown task 'pose'.*classification"):
        task_class("pose")


# ---------------------------------------------------------------- checkpoint lookup
def test_checkpoint_lookup_and_compatibility_messages(tmp_path):
    folder = CheckpointFolder(tmp_path / "ckpt")
    signature = model_signature(_tiny(), "anchorformer_tiny_patch16_224")
    layout = {"zero_stage": 2, "world_size": 8, "precision": "bf16", "global_batch_size": 64, "optimizer": "adamw"}

    def expect(**changes) -> CheckpointMeta:
        return CheckpointMeta(**{**signature, **layout, **changes})

    def find(resume: str, **changes):
        return find_resume_point(resume, folder, expect(**changes))

    assert find("auto") is None and find("none") is None
    with pytest.raises(CheckpointError, match="neither a checkpoints folder"):
        find(str(tmp_path / "elsewhere"))
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "latest").write_text("step_7")
    with pytest.raises(CheckpointError, match="names 'step_7'.*not a complete checkpoint"):
        find("auto")

    tag = tmp_path / "ckpt" / "step_7"
    tag.mkdir()
    (tag / "meta.json").write_text(json.dumps({**signature, **layout}))
    assert find("auto").tag.path == tag == find(str(tag)).tag.path
    assert find("auto").meta.world_size == 8
    find("auto", zero_stage=3, world_size=4)  # another layout: resharded
    with pytest.raises(CheckpointError, match="another model"):
        find_resume_point("auto", folder, CheckpointMeta(**{**model_signature(_tiny(depth=4), "x"), **layout}))
    with pytest.raises(CheckpointError, match="train.precision=bf16; this run uses bf16-mixed"):
        find("auto", precision="bf16-mixed")
    with pytest.raises(CheckpointError, match="train.global_batch_size=64; this run uses 32"):
        find("auto", global_batch_size=32)
    (tag / "meta.json").write_text(json.dumps({**signature, **layout, "optimizer": "sgd"}))
    find("auto", optimizer="sgd")
    with pytest.raises(CheckpointError, match="optim.name=sgd on 8 ranks at ZeRO stage 2; only AdamW"):
        find("auto", optimizer="sgd", world_size=4)
    (tag / "meta.json").write_text(json.dumps({**signature, "zero_stage": 2, "world_size": 8}))  # older meta
    find("auto", precision="bf16-mixed", global_batch_size=32)


def test_init_and_shutdown_leave_the_environment_as_they_found_it(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    env = dist.detect(cuda_available=False)
    dist.init(env)
    try:
        assert dist.world_size() == 1 and os.environ["WORLD_SIZE"] == "1"
    finally:
        dist.shutdown()
    assert "RANK" not in os.environ and dist.detect(cuda_available=False).launcher == "single"


def _fit_synthetic(cfg, task_class) -> tuple[Trainer, object, list[StepInfo], list[int]]:
    """Fit ``cfg`` in this process: the (closed) trainer, its result, every step's StepInfo and the
    trainer's step count when the host took it in."""
    env = dist.detect(environ={}, argv=[], cuda_available=False)
    dist.init(env)
    try:
        trainer = Trainer(cfg, env, task=task_class(cfg, cpu_runtime(env)))
        infos: list[StepInfo] = []
        taken_at: list[int] = []
        trainer.add_step_callback(lambda caller, info: (infos.append(info), taken_at.append(caller.step)))
        try:
            return trainer, trainer.fit(), infos, taken_at
        finally:
            trainer.close()
    finally:
        dist.shutdown()


@pytest.mark.parametrize("guard", [False, True])
def test_a_loss_spike_is_skipped_and_counted_with_the_guard_on_and_a_short_run_logs_at_its_end(tmp_path, guard):
    """A loss 50x the others at step 5: the guard (threshold 3, median of 2) skips its update and
    counts it; off, it is an ordinary step. The 6-step run logs once, at its end (logging.every_steps=100),
    and its steps' outcomes reach the host one step late (no log or checkpoint step to wait at)."""
    task_class = synthetic_task_class()
    loss_of = task_class.training_loss
    calls = {"n": 0}

    def spiking_loss(self, model, batch):
        loss, logs = loss_of(self, model, batch)
        calls["n"] += 1
        return (loss * 50 if calls["n"] in (9, 10) else loss), logs  # both micro-batches of step 5

    task_class.training_loss = spiking_loss
    cfg = synthetic_config(tmp_path, "spike", stage=0, micro=4, max_steps=6,
                           spike_threshold=3.0 if guard else 0.0, spike_window=2)
    cfg = config.from_dict({**config.to_dict(cfg), "logging": {**config.to_dict(cfg)["logging"], "every_steps": 100}})
    _, result, infos, taken_at = _fit_synthetic(cfg, task_class)
    assert result.status == "completed" and [info.step for info in infos] == list(range(1, 7))
    assert taken_at == [2, 3, 4, 5, 6, 6]  # each outcome read after the next step was queued; all at the end
    losses = [info.loss for info in infos]
    assert all(math.isfinite(x) for i, x in enumerate(losses) if i != 4)
    logged = logged_scalars(tmp_path / "spike", "train/loss")
    if guard:
        assert math.isnan(losses[4]) and result.metrics["run/spike_steps"] == 1
        assert logged_scalars(tmp_path / "spike", "train/spike_steps") == [1.0]
        assert logged == pytest.approx([sum(losses[:4] + losses[5:]) / 5])
    else:
        assert losses[4] > 10 * max(losses[:4]) and "run/spike_steps" not in result.metrics
        assert logged == pytest.approx([sum(losses) / 6])


def test_compile_modes_that_capture_cuda_graphs_are_refused_on_the_cpu():
    for mode in ("reduce-overhead", "max-autotune"):
        with pytest.raises(config.ConfigError, match=f"'train.compile': {mode} captures CUDA graphs"):
            _cfg(train={"device": "cpu", "compile": mode})
    assert _cfg(train={"device": "cpu", "compile": "default"}).train.compile == "default"


@pytest.mark.slow
def test_the_compile_modes_that_run_on_the_cpu_train_through_deepspeeds_engine_compile(tmp_path):
    """train.compile=default and max-autotune-no-cudagraphs: torch.compile (the inductor's CPU
    backend) through DeepSpeed's engine.compile(); the compiled model's losses follow eager training's."""
    runs = {}
    for mode in ("off", "default", "max-autotune-no-cudagraphs"):
        cfg = synthetic_config(tmp_path, mode, stage=0, micro=8, max_steps=2, compile=mode)
        trainer, result, infos, _ = _fit_synthetic(cfg, synthetic_task_class())
        assert result.status == "completed" and trainer.engine.is_compiled is (mode != "off")
        runs[mode] = [info.loss for info in infos]
    for mode in ("default", "max-autotune-no-cudagraphs"):
        assert runs[mode] == pytest.approx(runs["off"], rel=1e-4), mode


def test_step_callbacks_get_every_optimizer_step_of_a_fit(tmp_path):
    env = dist.detect(environ={}, argv=[], cuda_available=False)
    dist.init(env)
    try:
        cfg = synthetic_config(tmp_path, "callbacks", stage=0, micro=4)  # 2 micro-batches a step
        trainer = Trainer(cfg, env, task=synthetic_task_class()(cfg, cpu_runtime(env)))
        calls: list[tuple[Trainer, StepInfo]] = []
        trainer.add_step_callback(lambda caller, info: calls.append((caller, info)))
        try:
            result = trainer.fit()
        finally:
            trainer.close()
    finally:
        dist.shutdown()
    assert result.step == STEPS
    assert [info.step for _, info in calls] == list(range(1, STEPS + 1))
    assert all(caller is trainer for caller, _ in calls)
    assert all(info.wall_s > 0 for _, info in calls)
    # the step's loss is the one the trainer logs for it (logging.every_steps=1)
    assert [info.loss for _, info in calls] == pytest.approx(logged_scalars(tmp_path / "callbacks", "train/loss"))
