"""launch/submit.py: the sbatch script it renders, what it refuses, and (slow) real SLURM runs.

The slow tests start a real single-node SLURM with job accounting (tools/slurm_cluster.py, needs
root) once per session and stop it at the end.
"""
from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import cloudpickle
import pytest

from anchorformer.config import from_dict, load
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]


def _load_submit_module():
    spec = importlib.util.spec_from_file_location("anchorformer_launch_submit", REPO / "launch" / "submit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


submit = _load_submit_module()
from anchorformer.slurm_job import TrainingJob  # noqa: E402  (after submit set the signal name)

# The sbatch options submitit may write, for the script-validity check below.
SBATCH_OPTIONS = {
    "account", "comment", "constraint", "cpus-per-task", "error", "exclusive", "gpus-per-node",
    "job-name", "mail-type", "mail-user", "mem", "nodes", "ntasks-per-node", "open-mode",
    "output", "partition", "qos", "requeue", "signal", "time", "wckey",
}


@pytest.fixture()
def recipe(tmp_path: Path) -> Path:
    """A small recipe with a slurm section, writing its run under tmp_path."""
    path = tmp_path / "recipe.yaml"
    path.write_text(f"""
model: {{name: anchorformer_tiny_patch16_224, num_classes: 10}}
data: {{source: embedded}}
train: {{global_batch_size: 512, micro_batch_size: 8}}
logging: {{output_dir: {tmp_path / 'runs'}}}
slurm: {{nodes: 2, gpus_per_node: 4, cpus_per_task: 6, time_min: 600, partition: gpu}}
""")
    return path


def _sbatch_flags(script: str) -> dict[str, str | bool]:
    """{option: value} of the #SBATCH lines (True for flags without a value)."""
    flags: dict[str, str | bool] = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH"):
            match = re.fullmatch(r"#SBATCH --([a-z-]+)(?:=(.+))?", line)
            assert match, f"malformed sbatch line: {line!r}"
            flags[match.group(1)] = shlex.split(match.group(2))[0] if match.group(2) else True
    return flags


def _dry_run(capsys, *argv: str) -> tuple[str, dict[str, str | bool], str]:
    """Run ``submit.py --dry-run``; returns (script, its #SBATCH flags, resolved config YAML)."""
    assert submit.main(["--dry-run", *argv]) == 0
    out = capsys.readouterr().out
    script_part, config_part = out.split("# resolved config", 1)
    script = script_part.split("\n", 1)[1]
    return script, _sbatch_flags(script), config_part.split("\n", 1)[1]


def test_dry_run_8_nodes_8_gpus_is_a_64_task_script(capsys, recipe: Path):
    script, flags, config_yaml = _dry_run(capsys, "--nodes", "8", "--gpus-per-node", "8", str(recipe))
    assert script.startswith("#!/bin/bash\n")
    assert set(flags) <= SBATCH_OPTIONS, f"unknown sbatch options {set(flags) - SBATCH_OPTIONS}"
    assert flags["nodes"] == "8" and flags["ntasks-per-node"] == "8" and flags["gpus-per-node"] == "8"
    assert int(flags["nodes"]) * int(flags["ntasks-per-node"]) == 64
    # Values the command line did not override come from the recipe's slurm section.
    assert flags["cpus-per-task"] == "6" and flags["partition"] == "gpu" and flags["time"] == "600"
    assert flags["signal"] == "USR1@120" and flags["requeue"] is True
    assert "export SUBMITIT_PREEMPT_SIGNAL=USR1" in script
    srun_lines = [line for line in script.splitlines() if line.startswith("srun ")]
    assert len(srun_lines) == 1 and "-m submitit.core._submit" in srun_lines[0]
    run_dir = recipe.parent / "runs" / "recipe"
    assert flags["output"] == f"{run_dir}/slurm/%j_0_log.out"
    # The printed config is the resolved one, with the command-line values in it.
    cfg = from_dict(OmegaConf.to_container(OmegaConf.create(config_yaml)))
    assert (cfg.slurm.nodes, cfg.slurm.gpus_per_node) == (8, 8)
    assert not run_dir.exists(), "a dry run must not write anything"


def test_dry_run_applies_every_option(capsys, recipe: Path):
    _, flags, _ = _dry_run(
        capsys, "--cpus-per-task", "3", "--mem", "64", "--partition", "long", "--account", "vision",
        "--qos", "high", "--constraint", "h100", "--time", "30", "--signal-delay", "90",
        "--no-exclusive", "--job-name", "my run", "--comment", "ablation: m=30",
        "--mail", "me@example.org", str(recipe))
    assert flags["cpus-per-task"] == "3" and flags["mem"] == "64GB"
    assert (flags["partition"], flags["account"], flags["qos"], flags["constraint"]) == (
        "long", "vision", "high", "h100")
    assert flags["time"] == "30" and flags["signal"] == "USR1@90"
    assert "exclusive" not in flags
    assert flags["job-name"] == "my run" and flags["comment"] == "ablation: m=30"
    assert flags["mail-user"] == "me@example.org" and flags["mail-type"] == "END,FAIL"


def test_dry_run_on_cpu_requests_no_gpus(capsys, recipe: Path):
    _, flags, _ = _dry_run(capsys, "--nodes", "1", "--gpus-per-node", "2", str(recipe),
                           "train.device=cpu", "train.global_batch_size=16")
    assert "gpus-per-node" not in flags
    assert flags["ntasks-per-node"] == "2" and flags["exclusive"] is True


@pytest.mark.parametrize("argv, named", [
    (["--nodes", "0"], "--nodes"),
    (["--gpus-per-node", "0"], "--gpus-per-node"),
    (["--cpus-per-task", "0"], "--cpus-per-task"),
    (["--mem", "-4"], "--mem"),
    (["--signal-delay", "-1"], "--signal-delay"),
    (["--time", "1"], "--signal-delay"),                  # USR1 would come before the job starts
    (["--nodes", "3"], "train.global_batch_size"),         # 512 does not split over 3 x 4 x 8
    (["--local"], "slurm.nodes"),                          # the recipe asks for 2 nodes
    (["@", "slurm.nodez=2"], "did you mean 'slurm.nodes'"),
    (["@", "optim.lr=-1"], "optim.lr"),
    (["@", "train.resume="], "train.resume"),
])
def test_invalid_options_and_configs_are_refused_before_submission(capsys, recipe: Path, argv, named):
    # "@" marks where the recipe goes (overrides follow it).
    argv = [str(recipe) if a == "@" else a for a in argv]
    if str(recipe) not in argv:
        argv.append(str(recipe))
    assert submit.main(argv) == 2
    err = capsys.readouterr().err
    assert named in err and "nothing was submitted" in err
    assert not (recipe.parent / "runs").exists()


def test_missing_recipe_is_refused(capsys, tmp_path: Path):
    assert submit.main([str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--nodes", "two"], ["--dry-run", "--local"], ["--partition", ""],
                                  ["--frobnicate"]])
def test_malformed_command_lines_exit_with_usage(capsys, recipe: Path, argv):
    with pytest.raises(SystemExit) as exc:
        submit.main([*argv, str(recipe)])
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err
    assert not (recipe.parent / "runs").exists()


def test_submission_without_sbatch_is_refused(capsys, monkeypatch, recipe: Path):
    monkeypatch.setenv("PATH", str(recipe.parent))  # a PATH without sbatch: a laptop
    assert submit.main([str(recipe)]) == 2
    assert "sbatch is not on PATH" in capsys.readouterr().err


def test_checkpoint_requeues_a_fresh_copy_that_resumes(recipe: Path):
    cfg = load(recipe, ["train.resume=none", "slurm.max_requeues=2"])
    job = TrainingJob(cfg)
    delayed = job.checkpoint()
    # What submitit dumps over the job pickle must survive the trip.
    resumed = cloudpickle.loads(cloudpickle.dumps(delayed)).function
    assert isinstance(resumed, TrainingJob) and resumed is not job
    assert resumed.requeues == 1 and resumed.cfg.train.resume == "auto"
    assert resumed.cfg.slurm == cfg.slurm and resumed.cfg.model == cfg.model
    assert resumed.checkpoint().function.requeues == 2
    assert TrainingJob(cfg, requeues=2).checkpoint() is None, "slurm.max_requeues must stop requeuing"
