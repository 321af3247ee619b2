"""launch/submit.py: the sbatch script it renders, what it refuses, and (slow) real SLURM runs.

The slow tests start a real single-node SLURM with job accounting (the ``slurm_cluster`` fixture of
tests/conftest.py, needs root) once per session and stop it at the end.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit
from helpers import BIN, REPO, train_losses
from omegaconf import OmegaConf
from slurm_fixtures import (
    assert_same_training, release_requeued, sacct_states, wait_for_end, wait_for_step, wait_until,
)

from anchorformer.config import SlurmConfig, from_dict, load
from anchorformer.run_folder import RunFolder
from anchorformer.slurm_job import TrainingJob


def _load_submit_module():
    """launch/submit.py as a module (launch/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("anchorformer_launch_submit",
                                                  REPO / "launch" / "submit.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


submit = _load_submit_module()

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
    job = TrainingJob.from_config(cfg)
    assert job.cfg == cfg
    delayed = job.checkpoint()
    # What submitit dumps over the job pickle must survive the trip.
    resumed = cloudpickle.loads(cloudpickle.dumps(delayed)).function
    assert isinstance(resumed, TrainingJob) and resumed is not job
    assert resumed.requeues == 1 and resumed.cfg.train.resume == "auto"
    assert resumed.cfg.slurm == cfg.slurm and resumed.cfg.model == cfg.model
    assert job.cfg.train.resume == "none", "the submitted job must stay as it was"
    assert resumed.checkpoint().function.requeues == 2
    assert TrainingJob(job.config, requeues=2).checkpoint() is None, \
        "slurm.max_requeues must stop requeuing"


def test_requeued_job_validates_its_config_with_the_code_it_runs_on(recipe: Path):
    job = TrainingJob.from_config(load(recipe))
    older = {**job.config, "slurm": {k: v for k, v in job.config["slurm"].items()
                                     if k != "max_requeues"}}
    # An option added since the submission takes its default.
    assert TrainingJob(older).cfg.slurm.max_requeues == SlurmConfig().max_requeues
    retired = {**job.config, "slurm": {**job.config["slurm"], "gpus": 8}}
    with pytest.raises(ValueError, match="slurm.gpus"):
        TrainingJob(retired).cfg


def test_cluster_profile_sits_between_recipe_and_options(capsys, monkeypatch, recipe: Path):
    monkeypatch.setenv("USER", "alice")
    profile = REPO / "slurm" / "cluster_profile.example.yaml"
    _, flags, config_yaml = _dry_run(capsys, "--profile", str(profile), "--qos", "high",
                                     str(recipe), "slurm.account=other")
    assert flags["partition"] == "gpu" and flags["constraint"] == "h100"  # from the profile
    assert flags["qos"] == "high" and flags["account"] == "other"         # options and overrides win
    assert flags["output"].startswith("/checkpoint/alice/anchorformer/runs/recipe/slurm/")
    assert "module load cuda/12.4" in config_yaml


def test_cluster_profile_with_unknown_key_is_refused(capsys, tmp_path: Path, recipe: Path):
    profile = tmp_path / "profile.yaml"
    profile.write_text("slurm: {partitoin: gpu}\n")
    assert submit.main(["--profile", str(profile), str(recipe)]) == 2
    assert "did you mean 'slurm.partition'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Against a real SLURM (the slurm_cluster fixture): the demo config, 1 node, 2 tasks, gloo on CPU.

MAX_STEPS = 40
SIGNAL_AFTER_STEP = 5
# The demo recipe, shrunk so that a run takes seconds: one 32-wide block, 40 steps of 2 x 16, two
# DataLoader workers per rank (SLURM signals them too).
TINY = ["model.depth=1", "model.embed_dim=32", "model.num_heads=2",
        "model.num_anchors=4", "data.num_workers=2", "train.global_batch_size=32",
        "train.micro_batch_size=16", f"train.max_steps={MAX_STEPS}", "schedule.epochs=1",
        "schedule.warmup_epochs=0", "logging.every_steps=1", "logging.progress_bar=false"]
JOB_OPTIONS = ["--nodes", "1", "--gpus-per-node", "2", "--cpus-per-task", "1", "--time", "20",
               "--signal-delay", "60"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Run folders and the embedded dataset cache shared by the SLURM tests."""
    return tmp_path_factory.mktemp("slurm")


def _submit_command(workdir: Path, run_name: str, *extra: str) -> list[str]:
    """``launch/submit.py`` on the demo config."""
    return [sys.executable, str(REPO / "launch" / "submit.py"), *JOB_OPTIONS, *extra,
            str(REPO / "configs" / "demo.yaml"), *TINY, f"logging.output_dir={workdir / 'runs'}",
            f"logging.run_name={run_name}", f"data.cache_dir={workdir / 'cache'}"]


def _submit_cli(workdir: Path, run_name: str, *extra: str) -> tuple[str, str]:
    """Run ``launch/submit.py`` on the demo config; returns (job id, its output)."""
    done = subprocess.run(_submit_command(workdir, run_name, *extra), capture_output=True, text=True, cwd=REPO,
                          timeout=600)
    assert done.returncode == 0, f"submit failed:\n{done.stdout}{done.stderr}"
    match = re.search(r"submitted job (\S+)", done.stdout)
    assert match, done.stdout
    return match.group(1), done.stdout


@pytest.fixture(scope="module")
def reference_run(slurm_cluster, workdir: Path) -> dict:
    """The demo config submitted to SLURM and run to the end without interruption."""
    job_id, out = _submit_cli(workdir, "reference")
    run_dir = workdir / "runs" / "reference"
    state = wait_for_end(slurm_cluster, job_id, run_dir / "slurm" / f"{job_id}_0_log.err")
    return {"job_id": job_id, "out": out, "run_dir": run_dir, "state": state, "cluster": slurm_cluster}


@pytest.mark.slow
def test_submitted_demo_job_finishes_with_metrics_and_checkpoint_in_the_run_folder(reference_run):
    job_id, run_dir, out = reference_run["job_id"], reference_run["run_dir"], reference_run["out"]
    assert reference_run["state"] == "COMPLETED", sacct_states(reference_run["cluster"], job_id)
    # What submit printed, and the job id kept in the run folder.
    assert f"tensorboard --logdir {run_dir}" in out and "2 tasks on CPU" in out
    assert RunFolder(run_dir).slurm_job_id.read_text().strip() == job_id
    # submitit's logs, one pair per task, and the tasks' results, under {run}/slurm.
    slurm_dir = run_dir / "slurm"
    assert str(slurm_dir / f"{job_id}_0_log.out") in out
    for rank in (0, 1):
        assert (slurm_dir / f"{job_id}_{rank}_log.err").is_file()
    results = submitit.SlurmJob(slurm_dir, job_id, tasks=(0, 1)).results()
    assert [(r.status, r.step, r.requeues) for r in results] == [("completed", MAX_STEPS, 0)] * 2
    # Metrics, TensorBoard and the checkpoint where the README says.
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == MAX_STEPS
    assert 0.0 <= summary["metrics"]["eval/top1"] <= 100.0
    assert results[0].metrics["eval/top1"] == summary["metrics"]["eval/top1"]
    assert sorted(train_losses(run_dir)) == list(range(1, MAX_STEPS + 1))
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{MAX_STEPS}" and (run_dir / "checkpoints" / latest).is_dir()
    # Accounting saw both tasks of the step.
    ntasks = subprocess.run(["sacct", "-j", f"{job_id}.0", "-n", "-P", "-o", "NTasks"],
                            capture_output=True, text=True, check=True).stdout.split()
    assert ntasks == ["2"]


@pytest.mark.slow
@pytest.mark.parametrize("interruption", ["scancel --signal=TERM", "scontrol requeue"])
def test_preemption_checkpoints_requeues_and_resumes_to_the_same_result(reference_run, workdir: Path,
                                                                        interruption: str, record_property):
    run_name = interruption.split()[-1].removeprefix("--signal=").lower()
    cluster = reference_run["cluster"]
    job_id, _ = _submit_cli(workdir, run_name)
    run_dir = workdir / "runs" / run_name
    log = run_dir / "slurm" / f"{job_id}_0_log.err"
    latest = run_dir / "checkpoints" / "latest"

    wait_for_step(cluster, job_id, log, SIGNAL_AFTER_STEP, MAX_STEPS)
    assert not latest.exists()
    signalled = time.time()
    # TERM reaches every process of the step, the loader workers included. scancel --signal: the
    # job keeps running and requeues itself; scontrol requeue: SLURM ends it (KILL after KillWait,
    # 30 s) and restarts it.
    subprocess.run([*interruption.split(), job_id], check=True)
    # Keep signalling until the checkpoint is complete: signals arriving while the ranks agree
    # and write must neither corrupt it nor requeue twice. (scancel retries for minutes once
    # the job is being requeued; such a retrying call is cut short.)
    while interruption.startswith("scancel") and not latest.exists() and time.time() - signalled < 30:
        try:
            subprocess.run(interruption.split() + [job_id], capture_output=True, timeout=2)
        except subprocess.TimeoutExpired:
            break
        time.sleep(0.05)
    wait_until("the checkpoint written on the signal", latest.exists, timeout=30, interval=0.05)
    signal_to_checkpoint = latest.stat().st_mtime - signalled
    wait_until("the job to leave RUNNING", lambda: "JobState=RUNNING" not in cluster.run(
        ["scontrol", "show", "job", job_id], check=False).stdout, timeout=30, interval=0.1)
    signal_to_exit = time.time() - signalled
    record_property("signal_to_checkpoint_s", round(signal_to_checkpoint, 3))
    record_property("signal_to_exit_s", round(signal_to_exit, 3))
    print(f"\n{interruption}: checkpoint complete ('latest' moved) after {signal_to_checkpoint:.2f} s, "
          f"job no longer running after {signal_to_exit:.2f} s")
    stopped_at = int(latest.read_text().strip().removeprefix("step_"))
    assert SIGNAL_AFTER_STEP <= stopped_at < MAX_STEPS
    assert "killed by signal" not in log.read_text()

    # Requeued (same id); SLURM holds requeued jobs ~2 min: release it now.
    release_requeued(cluster, job_id)

    assert wait_for_end(cluster, job_id, log, runs=2) == "COMPLETED"
    assert sacct_states(cluster, job_id) == ["REQUEUED", "COMPLETED"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == MAX_STEPS
    assert summary["resumed_from"].endswith(f"step_{stopped_at}")
    results = submitit.SlurmJob(run_dir / "slurm", job_id, tasks=(0, 1)).results()
    assert [(r.status, r.requeues) for r in results] == [("completed", 1)] * 2

    assert_same_training(run_dir, reference_run["run_dir"], MAX_STEPS)


@pytest.mark.slow
def test_scancel_still_ends_the_job_after_its_checkpoint_and_a_busy_folder_is_refused(reference_run,
                                                                                      workdir: Path):
    cluster = reference_run["cluster"]
    job_id, _ = _submit_cli(workdir, "cancelled")
    run_dir = workdir / "runs" / "cancelled"
    log = run_dir / "slurm" / f"{job_id}_0_log.err"
    wait_for_step(cluster, job_id, log, SIGNAL_AFTER_STEP, MAX_STEPS)
    # A second run on the folder, while the job uses it: refused at the door.
    second = subprocess.run(_submit_command(workdir, "cancelled"), capture_output=True, text=True, cwd=REPO,
                            timeout=600)
    assert second.returncode == 2 and "nothing was submitted" in second.stderr, second.stderr[-3000:]
    assert f"is in use by SLURM job {job_id}" in second.stderr and "logging.run_name" in second.stderr
    subprocess.run(["scancel", job_id], check=True)
    assert wait_for_end(cluster, job_id, log) == "CANCELLED"
    time.sleep(3)  # a requeue from the job (which would revive it) would show by now
    assert sacct_states(cluster, job_id) == ["CANCELLED"]
    assert (run_dir / "checkpoints" / "latest").exists()
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "stopped"


@pytest.mark.slow
def test_a_request_the_partition_cannot_run_is_refused_naming_the_option(slurm_cluster, workdir: Path):
    cpus = int(subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True, check=True).stdout)
    # 2 tasks x (cpus) CPUs on a node of `cpus` CPUs: SLURM would keep it pending forever.
    refused = subprocess.run([*_submit_command(workdir, "too_big"), "--cpus-per-task", str(cpus)],
                             capture_output=True, text=True, cwd=REPO, timeout=600)
    assert refused.returncode == 2, refused.stdout + refused.stderr[-3000:]
    assert f"error: option --cpus-per-task: 2 task(s) x {cpus} CPUs = {2 * cpus} CPUs per node, but the " \
           f"nodes of partition 'debug' have at most {cpus} CPUs" in refused.stderr
    accounted = subprocess.run(["sacct", "-n", "-X", "-a", "--name", "too_big", "-o", "JobID"],
                               capture_output=True, text=True, check=True).stdout
    assert not accounted.strip(), "nothing may be submitted"
    assert not (workdir / "runs" / "too_big").exists()


@pytest.mark.slow
def test_local_executor_runs_the_same_job(reference_run, workdir: Path):
    job_id, out = _submit_cli(workdir, "local", "--local")
    assert "finished: completed" in out
    run_dir = workdir / "runs" / "local"
    assert (run_dir / "slurm" / f"{job_id}_0_log.err").is_file()
    assert_same_training(run_dir, reference_run["run_dir"], MAX_STEPS)


def _sbatch_template(template: str, workdir: Path, run_name: str, *options: str,
                     env: dict[str, str] | None = None) -> tuple[str, Path]:
    """sbatch one of slurm/*.sbatch on the demo config; returns (job id, its output file)."""
    output = workdir / f"{run_name}.out"
    cmd = ["sbatch", "--parsable", "--gpus-per-node=0", "--time=20", f"--output={output}", *options,
           str(REPO / "slurm" / template), *TINY, f"logging.output_dir={workdir / 'runs'}",
           f"logging.run_name={run_name}", f"data.cache_dir={workdir / 'cache'}"]
    job_env = {**os.environ, "CONFIG": "configs/demo.yaml", "PYTHON": sys.executable, **(env or {})}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=job_env, check=True)
    return done.stdout.strip().split(";")[0], output


@pytest.mark.slow
def test_srun_template_requeues_itself_after_usr1_and_resumes(reference_run, workdir: Path):
    job_id, output = _sbatch_template("train_srun.sbatch", workdir, "srun_template",
                                      "--ntasks-per-node=2", "--cpus-per-task=1")
    run_dir, cluster = workdir / "runs" / "srun_template", reference_run["cluster"]
    wait_for_step(cluster, job_id, output, SIGNAL_AFTER_STEP, MAX_STEPS)
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True)
    release_requeued(cluster, job_id)
    assert wait_for_end(cluster, job_id, output, runs=2) == "COMPLETED"
    log = output.read_text()
    assert "requeuing job" in log and "resumed from" in log
    assert sacct_states(cluster, job_id) == ["REQUEUED", "COMPLETED"]
    assert_same_training(run_dir, reference_run["run_dir"], MAX_STEPS)


@pytest.mark.slow
def test_deepspeed_template_trains_from_a_hostfile_and_requeues_itself_after_term(reference_run, workdir: Path):
    deepspeed = str(BIN / "deepspeed")
    job_id, output = _sbatch_template("train_deepspeed.sbatch", workdir, "deepspeed_template",
                                      "--cpus-per-task=2",
                                      env={"DEEPSPEED": deepspeed, "SLOTS_PER_NODE": "2"})
    cluster = reference_run["cluster"]
    wait_for_step(cluster, job_id, output, SIGNAL_AFTER_STEP, MAX_STEPS)
    # TERM reaches both launcher processes, the ranks and their workers: the `deepspeed` command
    # must outlive it (the template ignores TERM for it), else the step ends and kills the ranks.
    subprocess.run(["scancel", "--signal=TERM", job_id], check=True)
    release_requeued(cluster, job_id)
    assert wait_for_end(cluster, job_id, output, runs=2) == "COMPLETED", output.read_text()[-4000:]
    log = output.read_text()
    assert "task 0: Terminated" not in log and "requeuing job" in log and "resumed from" in log
    assert sacct_states(cluster, job_id) == ["REQUEUED", "COMPLETED"]
    run_dir = workdir / "runs" / "deepspeed_template"
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
    assert (run_dir / f"hostfile.{job_id}").read_text() == f"{host} slots=2\n"
    assert "deepspeed launcher" in log  # the ranks came from the DeepSpeed launcher
    assert_same_training(run_dir, reference_run["run_dir"], MAX_STEPS)
