"""launch/train.py, the one entry point, under every launcher: plain python, torchrun, the deepspeed
launcher (its --local_rank argument) and srun (rank and master from SLURM variables)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import BIN, REPO, cpu_env

TRAIN = str(REPO / "launch" / "train.py")


def _tiny_run(out: Path, cache: Path, name: str, zero_stage: int) -> list[str]:
    """Overrides turning the demo recipe into a 3-step run of a small model."""
    return ["configs/demo.yaml", f"logging.output_dir={out}", f"logging.run_name={name}",
            f"data.cache_dir={cache}", "data.num_workers=1", "train.max_steps=3",
            "train.global_batch_size=32", "train.micro_batch_size=16", "logging.progress_bar=false",
            "model.patch_size=4", "model.depth=2", "model.embed_dim=48", "model.num_heads=2", "model.num_anchors=8",
            f"deepspeed.zero_stage={zero_stage}"]


def _run(command: list[str], timeout: int = 400) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, env=cpu_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=timeout)


def _check_finished(proc: subprocess.CompletedProcess, run_dir: Path, world_size: int) -> None:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    assert "completed: epoch 0, step 3, validation top-1" in proc.stdout
    assert f"tensorboard --logdir {run_dir / 'tensorboard'}" in proc.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 3
    meta = json.loads((run_dir / "checkpoints" / "step_3" / "meta.json").read_text())
    assert meta["world_size"] == world_size


def test_help_config_lists_every_key_with_help():
    proc = _run([sys.executable, TRAIN, "--help-config"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "deepspeed.zero_stage (int, default 1): ZeRO stage" in proc.stdout
    assert "train.resume (str, default 'auto')" in proc.stdout


def test_bad_override_exits_before_any_work_with_the_key(tmp_path):
    proc = _run([sys.executable, TRAIN, "configs/demo.yaml", "optim.lrr=1e-3",
                 f"logging.output_dir={tmp_path}"], timeout=120)
    assert proc.returncode == 2
    assert "config key 'optim.lrr'" in proc.stderr and "did you mean 'optim.lr'" in proc.stderr
    assert not any(tmp_path.iterdir())  # no run folder was created


@pytest.mark.slow
def test_plain_python_single_process(tmp_path, embedded_cache_dir):
    proc = _run([sys.executable, TRAIN, *_tiny_run(tmp_path, embedded_cache_dir, "single", 0)])
    _check_finished(proc, tmp_path / "single", world_size=1)


@pytest.mark.slow
def test_torchrun_two_processes_zero2(tmp_path, embedded_cache_dir):
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29581",
                 TRAIN, *_tiny_run(tmp_path, embedded_cache_dir, "torchrun", 2)])
    _check_finished(proc, tmp_path / "torchrun", world_size=2)
    assert "(torchrun launcher, gloo" in proc.stderr


@pytest.mark.slow
def test_deepspeed_launcher_two_processes_zero3(tmp_path, embedded_cache_dir):
    proc = _run([sys.executable, str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", "29582",
                 TRAIN, *_tiny_run(tmp_path, embedded_cache_dir, "deepspeed", 3)])
    _check_finished(proc, tmp_path / "deepspeed", world_size=2)
    assert "(deepspeed launcher, gloo" in proc.stderr


@pytest.mark.slow
def test_srun_two_tasks_reads_slurm_variables(slurm_cluster, tmp_path, embedded_cache_dir):
    proc = _run(["srun", "--ntasks", "2", "--nodes", "1", "--cpus-per-task", "1", "--chdir", str(REPO),
                 sys.executable, TRAIN, *_tiny_run(tmp_path, embedded_cache_dir, "srun", 1)])
    _check_finished(proc, tmp_path / "srun", world_size=2)
    assert "(slurm launcher, gloo" in proc.stderr
