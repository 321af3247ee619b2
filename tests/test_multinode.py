"""Training across nodes (slow): a real SLURM of 3 nodes on this machine, each node a network
namespace with its own host name, address, slurmd and sshd (the ``multinode_cluster`` fixture,
``tests/slurm_cluster.py start --nodes 3``; needs root).

Every job trains the demo recipe shrunk to seconds, one rank per node, and must give the loss of
every step and the final metrics of the same ranks run on one node: across 2 and 3 nodes with
``launch/submit.py``, after ``scontrol requeue``, after a node dies (its slurmd and tasks killed:
SLURM requeues the job onto the spare node), through both sbatch templates, and through
``deepspeed --hostfile`` with pdsh and ssh between the nodes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import BIN, REPO
from slurm_cluster import SLURMD_TIMEOUT_S, NamespaceCluster
from slurm_fixtures import (
    FINAL_STATES, MAX_STEPS, RANK_ENV, Run, assert_same_training, hostnames, job_overrides, job_segments,
    release_requeued, sacct_states, submit, submit_one, submitted, wait_for_end, wait_for_step, wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("nodes_back")]

@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Run folders and the embedded dataset cache of this module's jobs (on the filesystem every node sees)."""
    return tmp_path_factory.mktemp("multinode")


@pytest.fixture(scope="module")
def plain_runs(multinode_cluster: NamespaceCluster, deepspeed_ops_built, workdir: Path) -> dict[str, Run]:
    """2 and 3 ranks, each on one node (the references) and one per node, submitted together and
    run to the end: {"1x2", "2x1", "1x3", "3x1"} (nodes x tasks per node)."""
    layouts = {"1x2": (1, 2), "2x1": (2, 1), "1x3": (1, 3), "3x1": (3, 1)}
    submissions = {name: submit(multinode_cluster, workdir, name, nodes, tasks)
                   for name, (nodes, tasks) in layouts.items()}
    runs = {name: submitted(submission, workdir, name) for name, submission in submissions.items()}
    for run in runs.values():
        assert wait_for_end(multinode_cluster, run.job_id, run.log) == "COMPLETED", run.log.read_text()[-3000:]
    return runs


def _step_layout(cluster: NamespaceCluster, job_id: str) -> tuple[list[str], int]:
    """(hosts, tasks) of the job's first srun step, as accounting recorded them."""
    step = cluster.run(["sacct", "-j", f"{job_id}.0", "-n", "-P", "-o", "NodeList,NTasks"]).stdout
    node_list, tasks = step.split()[0].split("|")
    return hostnames(cluster, node_list), int(tasks)


@pytest.mark.parametrize("nodes", [2, 3])
def test_a_job_over_nodes_trains_as_the_same_ranks_on_one_node(multinode_cluster, plain_runs, nodes: int):
    spread, together = plain_runs[f"{nodes}x1"], plain_runs[f"1x{nodes}"]
    hosts, tasks = _step_layout(multinode_cluster, spread.job_id)
    assert len(set(hosts)) == nodes and tasks == nodes, (hosts, tasks)
    hosts, tasks = _step_layout(multinode_cluster, together.job_id)
    assert len(hosts) == 1 and tasks == nodes, (hosts, tasks)
    assert_same_training(spread.run_dir, together.run_dir, MAX_STEPS)


def test_a_requeued_two_node_job_resumes_to_the_same_result(multinode_cluster, plain_runs, workdir: Path):
    run = submit_one(multinode_cluster, workdir, "requeued", 2)
    latest = run.run_dir / "checkpoints" / "latest"
    wait_for_step(multinode_cluster, run.job_id, run.log, 3, MAX_STEPS)
    multinode_cluster.run(["scontrol", "requeue", run.job_id])
    # Both ranks finish the step, write one checkpoint and leave; SLURM restarts the job.
    wait_until("the checkpoint written on the signal", latest.exists, timeout=60, interval=0.05)
    release_requeued(multinode_cluster, run.job_id)
    assert wait_for_end(multinode_cluster, run.job_id, run.log, runs=2) == "COMPLETED"
    assert sacct_states(multinode_cluster, run.job_id) == ["REQUEUED", "COMPLETED"]
    assert "resumed from" in run.log.read_text()
    assert_same_training(run.run_dir, plain_runs["1x2"].run_dir, MAX_STEPS)


def test_a_dead_node_requeues_the_job_onto_the_spare_node(multinode_cluster, plain_runs, workdir: Path,
                                                          record_property):
    run = submit_one(multinode_cluster, workdir, "node_death", 2, "checkpoint.every_steps=4")
    wait_for_step(multinode_cluster, run.job_id, run.log, 5, MAX_STEPS)  # after the checkpoint of step 4
    [(_, first_nodes)] = job_segments(multinode_cluster, run.job_id)
    victim = hostnames(multinode_cluster, first_nodes)[1]  # not the batch host: its slurmd alone dies
    try:
        multinode_cluster.kill_node(victim)  # slurmd, sshd, the job step and its task: SIGKILL
        killed = time.monotonic()
        wait_until(f"SLURM to mark {victim} down", lambda: multinode_cluster.node_states().get(victim, "")
                   .startswith("down"), timeout=SLURMD_TIMEOUT_S * 9, interval=0.2)
        noticed_s = time.monotonic() - killed
        release_requeued(multinode_cluster, run.job_id)
        # runs=1: accounting may have dropped the first run's record (its node was unreachable)
        assert wait_for_end(multinode_cluster, run.job_id, run.log) in FINAL_STATES
        wait_until("accounting to record the completion", lambda: sacct_states(multinode_cluster, run.job_id)[-1:]
                   == ["COMPLETED"], timeout=60)
        record_property("node_death_noticed_s", round(noticed_s, 1))
        print(f"\n{victim} killed: marked down after {noticed_s:.1f} s, job back and completed "
              f"{time.monotonic() - killed:.1f} s after the kill")
    finally:
        multinode_cluster.start()  # the node comes back and rejoins (ReturnToService=2)
    # The surviving rank requeues the job at once (no person in the loop), so the first run ends
    # REQUEUED or NODE_FAIL, and accounting may drop that record when the node was unreachable.
    segments = job_segments(multinode_cluster, run.job_id)
    states = [state for state, _ in segments]
    assert states[-1] == "COMPLETED" and set(states[:-1]) <= {"NODE_FAIL", "REQUEUED"}, segments
    resumed_on = hostnames(multinode_cluster, segments[-1][1])
    assert victim not in resumed_on and len(resumed_on) == 2, segments
    resumed_from = json.loads((run.run_dir / "summary.json").read_text())["resumed_from"]
    assert int(resumed_from.rsplit("step_", 1)[1]) >= 4, resumed_from
    assert_same_training(run.run_dir, plain_runs["1x2"].run_dir, MAX_STEPS)


def _sbatch(cluster: NamespaceCluster, workdir: Path, template: str, run_name: str, *options: str,
            env: dict[str, str]) -> Run:
    """sbatch one of slurm/*.sbatch on 2 nodes from the login node, on the demo recipe."""
    output = workdir / f"{run_name}.out"
    command = ["sbatch", "--parsable", "--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=20",
               f"--output={output}", *options, str(REPO / "slurm" / template), *job_overrides(workdir, run_name)]
    job_env = {**cluster.env(), **RANK_ENV, "CONFIG": "configs/demo.yaml", "PYTHON": sys.executable, **env}
    done = subprocess.run(cluster.command(command), capture_output=True, text=True, cwd=REPO, env=job_env,
                          check=True)
    return Run(done.stdout.strip().split(";")[0], workdir / "runs" / run_name, output)


@pytest.fixture(scope="module")
def template_runs(multinode_cluster, plain_runs, workdir: Path) -> dict[str, Run]:
    """Both sbatch templates submitted together, 2 nodes each, one rank per node."""
    return {
        "srun": _sbatch(multinode_cluster, workdir, "train_srun.sbatch", "srun_template", "--ntasks-per-node=1",
                        env={}),
        "deepspeed": _sbatch(multinode_cluster, workdir, "train_deepspeed.sbatch", "deepspeed_template",
                             env={"DEEPSPEED": str(BIN / "deepspeed"), "SLOTS_PER_NODE": "1"}),
    }


@pytest.mark.parametrize("template", ["srun", "deepspeed"])
def test_sbatch_templates_train_over_two_nodes(multinode_cluster, plain_runs, template_runs, template: str):
    run = template_runs[template]
    assert wait_for_end(multinode_cluster, run.job_id, run.log) == "COMPLETED", run.log.read_text()[-4000:]
    [(_, nodes)] = job_segments(multinode_cluster, run.job_id)
    assert len(hostnames(multinode_cluster, nodes)) == 2
    if template == "deepspeed":
        hosts = hostnames(multinode_cluster, nodes)
        assert (run.run_dir / f"hostfile.{run.job_id}").read_text() == "".join(f"{h} slots=1\n" for h in hosts)
        assert "deepspeed launcher" in run.log.read_text()
    assert_same_training(run.run_dir, plain_runs["1x2"].run_dir, MAX_STEPS)


def test_deepspeed_hostfile_launch_over_ssh_and_pdsh(multinode_cluster, plain_runs, workdir: Path):
    # As a user on node1 would: a hostfile, passwordless ssh to every node, pdsh, and the
    # variables the ranks need in a .deepspeed_env file (ssh passes no environment).
    hostfile = workdir / "hostfile"
    hostfile.write_text("node1 slots=1\nnode2 slots=1\n")
    environment = workdir / "deepspeed_env"
    rank_env = {**RANK_ENV, "TORCH_EXTENSIONS_DIR": os.environ["TORCH_EXTENSIONS_DIR"]}
    environment.write_text("".join(f"{key}={value}\n" for key, value in rank_env.items()))
    run_dir = workdir / "runs" / "hostfile"
    command = [str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--master_addr", "node1",
               "launch/train.py", "configs/demo.yaml", *job_overrides(workdir, "hostfile")]
    done = subprocess.run(multinode_cluster.node_command("node1", command, REPO), capture_output=True, text=True,
                          timeout=600, env={**os.environ, "DS_ENV_FILE": str(environment)})
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-5000:]
    # pdsh started one launcher per host, over ssh; each host's ranks came from the DeepSpeed launcher.
    assert "pdsh" in log and "node1: " in log and "node2: " in log, log[-3000:]
    assert "(deepspeed launcher, gloo, master node1:" in log
    assert_same_training(run_dir, plain_runs["1x2"].run_dir, MAX_STEPS)
