"""Resume on another number of ranks or another ZeRO stage.

Data (fast): the shard streams of an epoch interrupted on one layout finish it on another with
every remaining sample once, each optimizer step with the samples it had on the first layout,
augmented the same; the next epoch is a fresh one of the new layout.

Training (slow, real DeepSpeed on gloo, real processes): this file is also the worker script that
torchrun launches. Source runs (1 rank ZeRO-0, 2 ranks ZeRO-2, 2 ranks ZeRO-3) train RUN_STEPS steps
on the embedded digits shards, checkpointing after STOP_STEP; resumed runs continue such a
checkpoint on (2, ZeRO-3), (1, ZeRO-1) and (2, ZeRO-0, half the micro-batch). Their losses must
follow the uninterrupted source run, their Adam moments right after the resume must equal the
source's at the checkpoint, and their EMA at the end the source's.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from data_fixtures import write_jpeg_shards
from helpers import REPO, cpu_env

from anchorformer.config import AugmentConfig
from anchorformer.data import build_train_stream

NUM_CLASSES = 10
GLOBAL_BATCH = 8
AUGMENT = AugmentConfig(scale=(0.5, 1.0))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """80 samples in 10 shards of 8: 10 steps of 8 per epoch."""
    return write_jpeg_shards(tmp_path_factory.mktemp("reshard"), "train", count=80, per_shard=8)


def _streams(shards, world_size: int, micro: int, num_workers: int):
    pattern, index = shards
    return [build_train_stream(pattern, index=index, num_classes=NUM_CLASSES, rank=rank, world_size=world_size,
                               micro_batch_size=micro, num_workers=num_workers, seed=5, image_size=16,
                               augment=AUGMENT, mixup=None, shuffle_buffer=6, return_keys=True,
                               global_batch_size=GLOBAL_BATCH)
            for rank in range(world_size)]


def _steps(streams, count: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Each optimizer step's samples over all ranks (key -> image), for ``count`` steps or to the end."""
    accumulation = streams[0].accumulation
    iterators = [iter(stream) for stream in streams]
    steps = []
    while count is None or len(steps) < count:
        step: dict[str, torch.Tensor] = {}
        try:
            for iterator in iterators:
                for _ in range(accumulation):
                    images, _, keys = next(iterator)
                    step.update(zip(keys, images))
        except StopIteration:
            break
        steps.append(step)
    return steps


@pytest.mark.parametrize("before, after", [
    ((2, 2, 2), (1, 4, 0)),   # 2 ranks x 2 workers, micro 2 (2 accumulated) -> 1 rank, micro 4, in-process
    ((1, 4, 0), (4, 1, 2)),   # 1 rank -> 4 ranks x 2 workers, micro 1
    ((2, 4, 0), (2, 2, 2)),   # same ranks, other micro-batch and workers
])
def test_an_interrupted_epoch_finishes_on_another_layout_with_each_sample_once(shards, before, after):
    uninterrupted = _steps(_streams(shards, *before))
    assert len(uninterrupted) == 10
    first = _streams(shards, *before)
    done = _steps(first, 3)
    states = [stream.state_dict() for stream in first]
    resumed = _streams(shards, *after)
    for stream in resumed:
        if after[0] == before[0]:
            stream.load_state_dict(states[stream.rank])  # same number of ranks: each its own share
        else:
            stream.load_resharded(states)
    rest = _steps(resumed)
    assert [sorted(step) for step in done + rest] == [sorted(step) for step in uninterrupted]
    every_key = Counter(key for step in done + rest for key in step)
    assert every_key == Counter(key for step in uninterrupted for key in step)
    for expected, got in zip(uninterrupted[3:], rest):  # each sample augmented with its origin seed
        assert all(torch.equal(expected[key], got[key]) for key in expected)
    for stream in resumed:
        stream.set_epoch(1)
    fresh = _streams(shards, *after)
    for stream in fresh:
        stream.set_epoch(1)
    assert [sorted(step) for step in _steps(resumed)] == [sorted(step) for step in _steps(fresh)]


def test_a_resharded_epoch_resumes_again_exactly_and_on_a_third_layout(shards):
    uninterrupted = [sorted(step) for step in _steps(_streams(shards, 2, 2, 2))]
    first = _streams(shards, 2, 2, 2)
    done = _steps(first, 2)
    second = _streams(shards, 1, 4, 0)
    second[0].load_resharded([stream.state_dict() for stream in first])
    done += _steps(second, 3)
    same = _streams(shards, 1, 4, 0)  # the same layout again: exact, from the saved positions
    same[0].load_state_dict(second[0].state_dict())
    done += _steps(same, 2)
    third = _streams(shards, 4, 1, 0)
    for stream in third:
        stream.load_resharded([same[0].state_dict()])
    rest = _steps(third)
    assert [sorted(step) for step in done + rest] == uninterrupted


def test_resharding_refuses_mid_step_states_and_other_data(shards):
    first = _streams(shards, 2, 2, 0)
    for stream in first:
        next(iter(stream))  # one micro-batch of two per step
    states = [stream.state_dict() for stream in first]
    with pytest.raises(ValueError, match="inside an optimizer step"):
        _streams(shards, 1, 4, 0)[0].load_resharded(states)
    with pytest.raises(ValueError, match="all 2 saved ranks"):
        _streams(shards, 1, 4, 0)[0].load_resharded(states[:1])
    changed = [{**state, "seed": 6} for state in states]
    with pytest.raises(ValueError, match="seed: saved 6, now 5"):
        _streams(shards, 1, 4, 0)[0].load_resharded(changed)


def _collate_ids(samples: list[int]) -> SimpleNamespace:
    return SimpleNamespace(ids=list(samples), skips={})


def test_the_dense_tasks_stream_resumes_its_global_position_on_another_layout():
    from anchorformer.data.dense import MapTrainStream

    def streams(world_size: int, micro: int) -> list[MapTrainStream]:
        return [MapTrainStream(list(range(40)), _collate_ids, rank=rank, world_size=world_size, micro_batch_size=micro,
                               num_workers=0, seed=2) for rank in range(world_size)]

    def step_samples(ranks: list[MapTrainStream], accumulation: int, count: int) -> list[list[int]]:
        iterators = [iter(stream) for stream in ranks]
        return [sorted(i for it in iterators for _ in range(accumulation) for i in next(it).ids) for _ in range(count)]

    uninterrupted = step_samples(streams(2, 2), 2, 5)  # global batch 8: 2 ranks x 2 x 2 accumulated
    first = streams(2, 2)
    done = step_samples(first, 2, 2)
    resumed = streams(1, 4)
    resumed[0].load_resharded([stream.state_dict() for stream in first])
    assert done + step_samples(resumed, 2, 3) == uninterrupted


# ---------------------------------------------------------------------------------------- training
RUN_STEPS = 6
STOP_STEP = 3
LOSS_ATOL = 1e-4
MOMENT_ATOL = 1e-6
EMA_ATOL = 1e-5
SOURCES = {"z0_w1": (0, 16), "z2_w2": (2, 8), "z3_w2": (3, 8)}
"""run name -> (ZeRO stage, micro-batch); global batch 16"""
RESUMES = {"z0_w1_to_z3_w2": ("z0_w1", 3, 8), "z2_w2_to_z1_w1": ("z2_w2", 1, 8), "z3_w2_to_z0_w2": ("z3_w2", 0, 4)}
"""run name -> (source run, ZeRO stage, micro-batch)"""
LAUNCHES = ((1, ["z0_w1"]), (2, ["z2_w2", "z3_w2", "z0_w1_to_z3_w2", "z3_w2_to_z0_w2"]), (1, ["z2_w2_to_z1_w1"]))
"""(processes, runs in order): each resume after its source"""


def _config(out: Path, cache: str, name: str, stage: int, micro: int, resume: str):
    from anchorformer import config

    return config.from_dict({
        "model": {"name": "anchorformer_tiny_patch16_224", "num_classes": 10, "img_size": 16, "drop_path_rate": 0.0,
                  "kwargs": {"patch_size": 4, "depth": 2, "embed_dim": 48, "num_heads": 2, "num_anchors": 8}},
        "data": {"source": "embedded", "cache_dir": cache, "image_size": 16, "num_workers": 0, "shuffle_buffer": 64,
                 "augment": {"auto_augment": None, "scale": [0.5, 1.0], "crop_pct": 1.0},
                 "mixup": {"prob": 0.0}},  # Mixup draws per batch: batches differ on another layout
        "optim": {"lr": 2e-3, "lr_reference_batch": 0},
        "schedule": {"epochs": 1, "warmup_epochs": 0.05},
        "train": {"global_batch_size": 16, "micro_batch_size": micro, "precision": "fp32", "device": "cpu",
                  "max_steps": RUN_STEPS, "resume": resume, "ema": {"enabled": True, "decay": 0.7}},
        "deepspeed": {"zero_stage": stage},
        "checkpoint": {"every_steps": STOP_STEP, "at_epoch_end": False, "keep_last": 0},
        "logging": {"output_dir": str(out), "run_name": name, "every_steps": 1, "progress_bar": False},
    })


def _moments(trainer) -> dict[str, list[torch.Tensor]]:
    """Every parameter's whole AdamW moments (a collective under ZeRO 1-3)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    zero = trainer.engine.optimizer
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        # ZeRO 1-2 link every group's state to the weights right after the first group's first
        # step, when the other groups have none yet: link again (DeepSpeed 0.19.8)
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
    moments = {}
    for name, param in trainer.engine.module.named_parameters():
        if trainer.cfg.deepspeed.zero_stage == 0:
            moments[name] = [trainer.optimizer.state[param][key].clone() for key in ("exp_avg", "exp_avg_sq")]
        else:
            moments[name] = [safe_get_full_optimizer_state(param, key).clone() for key in ("exp_avg", "exp_avg_sq")]
    return moments


def _run(out: Path, cache: str, name: str) -> None:
    """One run of SOURCES or RESUMES in this launch; the main rank saves what the test compares."""
    from anchorformer import dist
    from anchorformer.engine import Trainer

    if name in SOURCES:
        stage, micro = SOURCES[name]
        cfg = _config(out, cache, name, stage, micro, "none")
    else:
        source, stage, micro = RESUMES[name]
        cfg = _config(out, cache, name, stage, micro, str(out / source / "checkpoints" / f"step_{STOP_STEP}"))
    trainer = Trainer(cfg, dist.detect())
    record: dict[str, Any] = {}
    if name in RESUMES:
        resumed = trainer.resume()
        record.update(moments=_moments(trainer), conversion_s=resumed.conversion_s, resharded=resumed.resharded)
    else:
        def at_stop(trainer, info) -> None:
            if info.step == STOP_STEP:
                record["moments"] = _moments(trainer)
        trainer.add_step_callback(at_stop)
    try:
        trainer.fit()
        record["ema"] = trainer.ema.full_state_dict()
    finally:
        trainer.close()
    if dist.rank() == 0:
        torch.save(record, out / f"{name}.pt")


def worker(out: Path, cache: str, runs: list[str]) -> None:
    from anchorformer import dist

    env = dist.detect()
    dist.init(env)
    try:
        for name in runs:
            _run(out, cache, name)
    finally:
        dist.shutdown()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, embedded_cache_dir) -> Path:
    """All runs, in three launches (1 process, 2 processes, 1 process)."""
    out = tmp_path_factory.mktemp("resharded")
    for processes, runs in LAUNCHES:
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                               "--master_port", "29571", __file__, "--out", str(out), "--cache",
                               str(embedded_cache_dir), *runs], cwd=REPO, env=cpu_env(OMP_NUM_THREADS="1"),
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out


def _losses(run_dir: Path) -> list[float]:
    from engine_fixtures import logged_scalars

    return logged_scalars(run_dir, "train/loss")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RESUMES))
def test_a_run_resumed_on_another_layout_follows_the_uninterrupted_one(trained, name):
    source = RESUMES[name][0]
    expected, got = torch.load(trained / f"{source}.pt"), torch.load(trained / f"{name}.pt")
    assert got["resharded"] and got["conversion_s"] is not None
    for param, (exp_avg, exp_avg_sq) in expected["moments"].items():
        assert torch.allclose(got["moments"][param][0], exp_avg, rtol=0, atol=MOMENT_ATOL), param
        assert torch.allclose(got["moments"][param][1], exp_avg_sq, rtol=0, atol=MOMENT_ATOL), param
    uninterrupted, resumed = _losses(trained / source), _losses(trained / name)
    assert len(uninterrupted) == RUN_STEPS and len(resumed) == RUN_STEPS - STOP_STEP
    deviation = max(abs(a - b) for a, b in zip(uninterrupted[STOP_STEP:], resumed))
    assert deviation <= LOSS_ATOL, f"{name}: {resumed} vs {uninterrupted[STOP_STEP:]}"
    ema_deviation = max((got["ema"][key] - value).abs().max().item() for key, value in expected["ema"].items())
    assert ema_deviation <= EMA_ATOL, f"{name}: EMA differs by {ema_deviation}"
    figures = trained / "figures.json"
    results = json.loads(figures.read_text()) if figures.exists() else {}
    results[name] = {"loss_deviation": deviation, "ema_deviation": ema_deviation, "conversion_s": got["conversion_s"]}
    figures.write_text(json.dumps(results, indent=1))
    print(f"{name}: loss deviation {deviation:.2e}, EMA deviation {ema_deviation:.2e}, "
          f"conversion {got['conversion_s']:.2f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cache", required=True)
    parser.add_argument("runs", nargs="+")
    arguments = parser.parse_args()
    worker(arguments.out, arguments.cache, arguments.runs)
