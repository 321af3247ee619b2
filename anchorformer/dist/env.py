"""Who am I in the job: rank, world size and rendezvous address from whichever launcher started
this process (torchrun, the deepspeed launcher, srun, or a plain ``python``), and the process
group's start and end.
"""
from __future__ import annotations

import gc
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal, Mapping, Optional, Sequence

import torch

__all__ = ["DistEnv", "detect", "init", "launch_attempt", "shutdown", "slurm_first_host", "slurm_port"]

logger = logging.getLogger(__name__)

Launcher = Literal["single", "torchrun", "deepspeed", "slurm"]

_environ_before_init: dict[str, Optional[str]] = {}
"""Rendezvous variables as they were before :func:`init` set them (restored by shutdown)."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    """Global rank, 0 .. world_size - 1."""
    world_size: int
    """Number of training processes in the job."""
    local_rank: int
    """Rank on this node (selects the GPU)."""
    local_world_size: int
    """Processes on this node."""
    master_addr: str
    """Host of rank 0 (rendezvous)."""
    master_port: int
    """TCP port of the rendezvous on master_addr."""
    launcher: Launcher
    """Which launcher started this process."""
    backend: Literal["gloo", "nccl"]
    """torch.distributed backend: nccl with CUDA, gloo on CPU."""

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (the process that logs and writes shared files)."""
        return self.rank == 0


def detect(environ: Optional[Mapping[str, str]] = None, argv: Optional[Sequence[str]] = None,
           cuda_available: Optional[bool] = None) -> DistEnv:
    """Read the launcher's variables.

    Args:
        environ: environment to read (default ``os.environ``).
        argv: command line (default ``sys.argv``), searched for the deepspeed launcher's
            ``--local_rank=N``.
        cuda_available: whether to pick nccl (default ``torch.cuda.is_available()``).

    Returns:
        The process's place in the job; a plain ``python`` run is rank 0 of 1 on a free local port.

    Raises:
        ValueError: when the launcher's variables are inconsistent (e.g. rank >= world size).
    """
    env = os.environ if environ is None else environ
    argv = sys.argv if argv is None else argv
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    backend: Literal["gloo", "nccl"] = "nccl" if cuda else "gloo"
    arg_local_rank = _local_rank_argument(argv)

    if "RANK" in env and "WORLD_SIZE" in env:
        launcher: Launcher = ("deepspeed" if "CROSS_RANK" in env or arg_local_rank is not None
                              else "torchrun")
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local_rank = arg_local_rank if arg_local_rank is not None else _int(env, "LOCAL_RANK", 0)
        local_world = _int(env, "LOCAL_WORLD_SIZE", 0) or _int(env, "LOCAL_SIZE", 0) or world
        result = DistEnv(rank, world, local_rank, local_world, env.get("MASTER_ADDR", "127.0.0.1"),
                         _int(env, "MASTER_PORT", 29500), launcher, backend)
    elif "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        # Inside an srun step (a batch script alone has no STEP variables: one process).
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
        result = DistEnv(
            rank=_int(env, "SLURM_PROCID"), world_size=_int(env, "SLURM_STEP_NUM_TASKS"),
            local_rank=_int(env, "SLURM_LOCALID", 0),
            local_world_size=_slurm_tasks_on_node(env.get("SLURM_STEP_TASKS_PER_NODE", ""),
                                                  _int(env, "SLURM_NODEID", 0)),
            master_addr=env.get("MASTER_ADDR") or slurm_first_host(nodelist),
            master_port=_int(env, "MASTER_PORT", 0) or slurm_port(_int(env, "SLURM_JOB_ID", 0)),
            launcher="slurm", backend=backend)
    else:
        result = DistEnv(0, 1, 0, 1, "127.0.0.1", _free_port(), "single", backend)

    if not 0 <= result.rank < result.world_size:
        raise ValueError(f"{result.launcher} launcher gave rank {result.rank} outside world size "
                         f"{result.world_size}; check RANK / WORLD_SIZE (or SLURM_PROCID / "
                         f"SLURM_STEP_NUM_TASKS)")
    if not 0 <= result.local_rank < max(result.local_world_size, 1):
        raise ValueError(f"{result.launcher} launcher gave local rank {result.local_rank} outside "
                         f"the {result.local_world_size} processes of this node")
    return result


def launch_attempt(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The launcher's name for this start of the job, the same on every rank: SLURM's job id and
    restart count (``slurm4242.1``: requeued once), torchrun's run id and restart count
    (``torchrun-abc.2``), both under torchrun in a SLURM job; None for other launchers."""
    env = os.environ if environ is None else environ
    parts = []
    if env.get("SLURM_JOB_ID"):
        parts.append(f"slurm{env['SLURM_JOB_ID']}.{env.get('SLURM_RESTART_COUNT') or 0}")
    if env.get("TORCHELASTIC_RESTART_COUNT") is not None:
        run_id = re.sub(r"[^A-Za-z0-9_.-]", "_", env.get("TORCHELASTIC_RUN_ID", "none"))
        parts.append(f"torchrun-{run_id}.{env['TORCHELASTIC_RESTART_COUNT']}")
    return "-".join(parts) or None


def init(env: DistEnv, timeout_s: float = 1800.0) -> None:
    """Start the process group (through DeepSpeed's comm layer, which its engine needs).

    Args:
        env: the detected environment.
        timeout_s: how long one collective waits for the other ranks before it raises, in seconds
            (``health.collective_timeout_s``).
    """
    # DeepSpeed picks its accelerator when first imported: CPU runs on a GPU machine must say so.
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if env.backend == "nccl" else "cpu")
    import deepspeed

    if env.backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    # DeepSpeed and torch's env:// rendezvous read these; set them so every launcher looks alike
    # (shutdown() restores the previous values: a later detect() in this process starts clean).
    rendezvous = dict(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
                      LOCAL_WORLD_SIZE=str(env.local_world_size), MASTER_ADDR=env.master_addr,
                      MASTER_PORT=str(env.master_port))
    _environ_before_init.update({key: os.environ.get(key) for key in rendezvous})
    os.environ.update(rendezvous)
    store = _torchrun_attempt_store(env, timeout_s)
    if store is not None:  # DeepSpeed takes over a process group that is up
        torch.distributed.init_process_group(env.backend, store=store, rank=env.rank, world_size=env.world_size,
                                             timeout=timedelta(seconds=timeout_s))
    deepspeed.init_distributed(dist_backend=env.backend, auto_mpi_discovery=False, verbose=False,
                               timeout=timedelta(seconds=timeout_s), rank=env.rank,
                               world_size=env.world_size)
    logger.info("process group up: rank %d/%d (%s launcher, %s, master %s:%d)", env.rank,
                env.world_size, env.launcher, env.backend, env.master_addr, env.master_port)


def _torchrun_attempt_store(env: DistEnv, timeout_s: float) -> Optional[torch.distributed.Store]:
    """Under torchrun, its agent's store with keys of this start only (None elsewhere).

    torchrun's agent keeps one store for all restarts of its group (``--max-restarts``), and the
    ranks' default rendezvous reads it without a prefix: a restarted rank can read the address its
    dead predecessor published and wait forever to connect to it (seen with gloo about half the
    time). A prefix per restart count keeps every start's keys apart.
    """
    restarts = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if env.launcher != "torchrun" or restarts is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    agent_store = torch.distributed.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=False,
                                             timeout=timedelta(seconds=timeout_s))
    return torch.distributed.PrefixStore(f"anchorformer_start{restarts}/", agent_store)


def shutdown() -> None:
    """Destroy the process group if one is up (avoids the ZeRO-3 abort at interpreter exit).

    Goes through DeepSpeed's comm layer, which also drops its cached sub-groups, and restores
    the rendezvous variables :func:`init` set, so a later :func:`detect` / :func:`init` in the
    same process starts clean.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()
        # Free the destroyed group's objects now: a DataLoader worker forked later in this process
        # would otherwise free its copy of them and hang joining gloo threads it does not have.
        gc.collect()
    for key, value in _environ_before_init.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _environ_before_init.clear()


def slurm_port(job_id: int) -> int:
    """Rendezvous port derived from the SLURM job id (same on every node, differs between jobs)."""
    return 15000 + job_id % 20000


def slurm_first_host(nodelist: str) -> str:
    """First host name of a SLURM node list (``node[03-05,9],gpu1`` -> ``node03``).

    Uses ``scontrol show hostnames`` when available, otherwise parses the compact form.
    """
    if not nodelist:
        raise ValueError("SLURM_JOB_NODELIST is empty; cannot find the master host (set MASTER_ADDR)")
    scontrol = shutil.which("scontrol")
    if scontrol:
        out = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True,
                             text=True, check=False)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if match is None:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}; set MASTER_ADDR")
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _slurm_tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """Tasks on node ``node_id`` from SLURM's ``2(x3),1`` notation."""
    counts: list[int] = []
    for part in filter(None, tasks_per_node.split(",")):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            raise ValueError(f"cannot parse SLURM_STEP_TASKS_PER_NODE={tasks_per_node!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts[node_id] if node_id < len(counts) else 1


def _local_rank_argument(argv: Sequence[str]) -> Optional[int]:
    """The deepspeed launcher's ``--local_rank=N`` (or ``--local_rank N``), if present."""
    for i, arg in enumerate(argv):
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            return int(arg.split("=", 1)[1])
        if arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            return int(argv[i + 1])
    return None


def _int(env: Mapping[str, str], name: str, default: Optional[int] = None) -> int:
    value = env.get(name)
    if value is None or value == "":
        if default is None:
            raise ValueError(f"environment variable {name} is missing")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
