"""Multi-process training through the real launchers (torchrun, the deepspeed launcher), CPU/gloo.

Each launch runs this file as a script (``worker``) that loops over ZeRO stages 0-3 inside one
process group, re-creating the trainer per stage, so the one-time DeepSpeed start-up is paid once
per launcher. A single-process launch of the same script gives the reference loss curve.

The synthetic data of tests/engine_fixtures.py gives every global optimizer step the same samples
whatever the world size and accumulation, so a 2-process run must reproduce the 1-process loss
curve up to float summation order: asserted with rtol 1e-5 (fp32).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from engine_fixtures import GLOBAL_BATCH, STEPS, cpu_runtime, logged_scalars, synthetic_config, synthetic_task_class
from helpers import REPO, cpu_env

STAGES = (0, 1, 2, 3)
LOSS_RTOL = 1e-5


def _fit(cfg, env, task=None):
    from anchorformer.engine import Trainer

    trainer = Trainer(cfg, env, task=task or synthetic_task_class()(cfg, cpu_runtime(env)))
    try:
        return trainer, trainer.fit()
    finally:
        trainer.close()


def _ema_matches_gathered_weights(out: Path, env) -> dict[str, bool]:
    """ZeRO-3 keeps each rank's EMA partition; it must equal an EMA of the gathered weights, and
    evaluation inside ``swapped_in`` must see exactly those weights (persistent small weights
    included: the persistence threshold keeps norms and biases gathered between steps)."""
    import deepspeed

    from anchorformer.engine import Trainer

    cfg = synthetic_config(out, "ema_zero3", 3, GLOBAL_BATCH // env.world_size, persistence=1000,
                           ema={"enabled": True, "decay": 0.7})
    trainer = Trainer(cfg, env, task=synthetic_task_class()(cfg, cpu_runtime(env)))
    params = dict(trainer.engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        reference = {n: p.detach().float().clone() for n, p in params.items()}
    update = trainer.ema.update

    def update_and_track(keep: torch.Tensor) -> None:
        update(keep=keep)  # 1.0 here: no step of this run is skipped
        with deepspeed.zero.GatheredParameters(list(params.values())):
            for n, p in params.items():
                reference[n].lerp_(p.detach().float(), 1.0 - 0.7)

    def gathered() -> dict[str, torch.Tensor]:
        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {n: p.detach().float().clone() for n, p in params.items()}

    trainer.ema.update = update_and_track
    try:
        trainer.fit()
        full = trainer.ema.full_state_dict()
        trained = gathered()
        trainer.engine(torch.zeros(1, 3, 16, 16))  # a forward gathers the persistent weights
        with trainer.ema.swapped_in():
            trainer.engine(torch.zeros(1, 3, 16, 16))
            inside = gathered()
        trainer.engine(torch.zeros(1, 3, 16, 16))
        after = gathered()
    finally:
        trainer.close()
    persistent = [n for n, p in params.items() if getattr(p, "ds_persist", False)]
    return {"updates": trainer.ema.updates == STEPS, "has_persistent": bool(persistent),
            "average": all(torch.equal(full[n], reference[n]) for n in reference),
            "swapped_in": all(torch.equal(inside[n], full[n]) for n in full),
            "restored": all(torch.equal(after[n], trained[n]) for n in trained)}


def _checkpointing_keeps_gradients(out: Path, env, stage: int) -> float:
    """Largest gradient difference between activation checkpointing on and off (one batch)."""
    from deepspeed.utils import safe_get_full_grad

    from anchorformer.engine import Trainer

    grads = []
    for flag in (False, True):
        cfg = synthetic_config(out, f"ckpt_{stage}_{flag}", stage, GLOBAL_BATCH // env.world_size,
                               activation_checkpointing=flag)
        task = synthetic_task_class()(cfg, cpu_runtime(env))
        trainer = Trainer(cfg, env, task=task)
        try:
            assert trainer.engine.module.grad_checkpointing is flag
            torch.manual_seed(0)
            loss, _ = task.training_loss(trainer.engine, next(iter(trainer.train_stream)))
            trainer.engine.backward(loss)
            grads.append({n: safe_get_full_grad(p).clone() for n, p in trainer.engine.module.named_parameters()})
        finally:
            trainer.close()
    return max((grads[0][n] - grads[1][n]).abs().max().item() for n in grads[0])


def _stop_resume_losses(out: Path, env, stage: int) -> list[float]:
    """Stop after step 2 (request_stop, as a signal handler would), resume, run to STEPS."""
    task_class = synthetic_task_class()
    micro = GLOBAL_BATCH // env.world_size
    cfg = synthetic_config(out, f"resume_{stage}", stage, micro)
    task = task_class(cfg, cpu_runtime(env))
    from anchorformer.engine import Trainer

    trainer = Trainer(cfg, env, task=task)
    loss_of = task.training_loss

    def stop_at_step_two(model, batch):
        if trainer.step == 1:
            trainer.request_stop()
        return loss_of(model, batch)

    task.training_loss = stop_at_step_two
    try:
        first = trainer.fit()
    finally:
        trainer.close()
    assert first.status == "stopped" and first.step == 2, first
    resumed_cfg = synthetic_config(out, f"resume_{stage}", stage, micro, resume="auto")
    _, second = _fit(resumed_cfg, env)
    assert second.status == "completed" and second.step == STEPS, second
    return logged_scalars(out / f"resume_{stage}", "train/loss")


def _anchor_mix_agreed(out: Path, env) -> bool:
    """train.anchor_mix=auto on 2 ranks: rank 0 measures the training and evaluation shapes before
    the first step, every other rank takes its decisions (pinned), none measures them itself."""
    from anchorformer import dist
    from anchorformer.kernels import autotune

    os.environ.pop("ANCHORFORMER_ANCHOR_MIX", None)  # the launch pins torch for the loss comparisons
    _fit(synthetic_config(out, "anchor_mix_auto", 0, micro=4), env)
    agreed = [(e["train"], e["choice"], e["source"]) for e in autotune.decisions() if e["batch"] == 4]
    tables = dist.all_gather_objects(agreed)
    expected_sources = ["measured"] + ["pinned"] * (env.world_size - 1)
    choices = [[choice for _, choice, _ in table] for table in tables]
    return (len(tables[0]) == 2 and all(c == choices[0] for c in choices)
            and [table[0][2] for table in tables] == expected_sources)


def worker(out: Path) -> None:
    """One launch: every ZeRO stage, plus the EMA / checkpointing / resume checks on 2 ranks."""
    import time

    from anchorformer import dist

    env = dist.detect()
    dist.init(env)
    results: dict[str, Any] = {"launcher": env.launcher, "world_size": env.world_size}
    try:
        stages = STAGES if env.world_size > 1 else (0,)
        for stage in stages:
            name = f"stage{stage}"
            cfg = synthetic_config(out, name, stage, micro=4)
            start = time.perf_counter()
            _, result = _fit(cfg, env)
            results[name] = {"status": result.status, "steps": result.step,
                             "seconds": time.perf_counter() - start}
            if env.is_main:
                results[name]["losses"] = logged_scalars(out / name, "train/loss")
                # first step includes start-up; the median of the rest is the steady step time
                times = sorted(logged_scalars(out / name, "perf/step_time_s")[1:])
                results[name]["step_time_s"] = times[len(times) // 2]
        if env.world_size > 1:
            results["ema_zero3"] = _ema_matches_gathered_weights(out, env)
            results["checkpointing_grad_diff"] = {s: _checkpointing_keeps_gradients(out, env, s) for s in (0, 3)}
            results["resume_losses"] = {s: _stop_resume_losses(out, env, s) for s in (2, 3)}
            results["anchor_mix_agreed"] = _anchor_mix_agreed(out, env)
    finally:
        dist.shutdown()
    if env.is_main:
        (out / f"results_{env.launcher}.json").write_text(json.dumps(results, indent=1))


def _launch(prefix: list[str], out: Path, timeout: int = 600) -> dict[str, Any]:
    proc = subprocess.run([*prefix, __file__, "--out", str(out)], cwd=REPO, env=cpu_env(OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    (result,) = out.glob("results_*.json")
    return json.loads(result.read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[float]:
    out = tmp_path_factory.mktemp("single")
    result = _launch([sys.executable], out)
    assert result["launcher"] == "single"
    return result["stage0"]["losses"]


def _check_two_process_run(result: dict[str, Any], reference: list[float]) -> None:
    assert result["world_size"] == 2
    assert len(reference) == STEPS
    for stage in STAGES:
        losses = result[f"stage{stage}"]["losses"]
        assert losses == pytest.approx(reference, rel=LOSS_RTOL), f"ZeRO-{stage}: {losses} vs {reference}"
    assert result["ema_zero3"] == dict.fromkeys(["updates", "has_persistent", "average", "swapped_in", "restored"],
                                                True)
    for stage, diff in result["checkpointing_grad_diff"].items():
        assert diff <= 1e-6, f"ZeRO-{stage}: activation checkpointing changed gradients by {diff}"
    for stage, losses in result["resume_losses"].items():
        uninterrupted = result[f"stage{stage}"]["losses"]
        assert losses == uninterrupted, f"ZeRO-{stage} resume: {losses} vs {uninterrupted}"
    assert result["anchor_mix_agreed"], "the ranks did not take rank 0's anchor-mix decisions"


@pytest.mark.slow
def test_torchrun_two_processes_match_single_process(tmp_path, reference):
    result = _launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                      "--master_port", "29561"], tmp_path)
    assert result["launcher"] == "torchrun"
    _check_two_process_run(result, reference)


@pytest.mark.slow
def test_deepspeed_launcher_two_processes_match_single_process(tmp_path, reference):
    deepspeed_cli = Path(sys.executable).parent / "deepspeed"
    result = _launch([sys.executable, str(deepspeed_cli), "--num_gpus", "2", "--master_port", "29562"],
                     tmp_path)
    assert result["launcher"] == "deepspeed"
    _check_two_process_run(result, reference)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--local_rank", type=int, default=None)  # from the deepspeed launcher
    worker(parser.parse_args().out)
