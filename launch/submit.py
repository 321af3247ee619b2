"""Submit a training run to SLURM through submitit (the only module that knows the scheduler).

    python launch/submit.py [options] CONFIG [section.key=value ...]
    python launch/submit.py --nodes 8 configs/in21k_base.yaml
    python launch/submit.py --dry-run --nodes 8 --gpus-per-node 8 configs/in21k_base.yaml
    python launch/submit.py --local configs/demo.yaml train.device=cpu

Defaults come from the config's ``slurm`` section; the options below override them. One task
per GPU (``slurm.gpus_per_node`` tasks per node); with ``train.device=cpu`` no GPU is requested
and ``--gpus-per-node`` only sets the processes per node. The config is validated (including its
batch split over nodes x tasks) before anything is submitted. The job runs the same trainer as
``launch/train.py``; on USR1 (``--signal-delay`` seconds before ``--time`` runs out) or SIGTERM
(preemption) every rank checkpoints, the job requeues itself and resumes from that checkpoint.
See docs/slurm.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import submitit
from omegaconf import OmegaConf
from submitit.slurm.slurm import SlurmExecutor

from anchorformer.atomic import atomic_write_bytes
from anchorformer.config import (
    ConfigError, RootConfig, from_dict, load, to_dict, to_yaml,
)
from anchorformer.engine import run_lock
from anchorformer.engine.preflight import check_run
from anchorformer.run_folder import RunFolder
from anchorformer.slurm_job import PREEMPT_SIGNAL, TrainingJob

SUBMITIT_SIGNAL_VARIABLE = "SUBMITIT_PREEMPT_SIGNAL"
"""Environment variable naming the signal submitit's job-side handler listens for."""


# Command-line option -> the slurm config field it overrides.
OPTION_FIELDS = {
    "nodes": "nodes", "gpus_per_node": "gpus_per_node", "cpus_per_task": "cpus_per_task",
    "mem": "mem_gb", "partition": "partition", "account": "account", "qos": "qos",
    "constraint": "constraint", "time": "time_min", "exclusive": "exclusive",
    "job_name": "job_name", "comment": "comment", "mail": "mail", "signal_delay": "signal_delay_s",
}


class _ScriptOnlySlurmExecutor(SlurmExecutor):
    """submitit's SLURM executor, used only to render the sbatch script (``--dry-run``), so a
    dry run also works on a machine without ``srun``."""

    @classmethod
    def affinity(cls) -> int:
        return 1


def _non_empty(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``launch/submit.py``."""
    parser = argparse.ArgumentParser(
        prog="launch/submit.py", description=__doc__.split("\n\n")[0],
        epilog="Defaults come from the config's slurm section (see docs/slurm.md).")
    parser.add_argument("config", type=Path, help="recipe YAML (e.g. configs/in21k_base.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides, applied after the recipe (and the profile)")
    parser.add_argument("--profile", type=Path, metavar="YAML",
                        help="cluster profile: config sections (usually slurm and logging) shared "
                             "by every run on one cluster, applied between the recipe and the "
                             "overrides; see slurm/cluster_profile.example.yaml")
    resources = parser.add_argument_group("resources (override the config's slurm section)")
    resources.add_argument("--nodes", type=int, help="nodes to allocate")
    resources.add_argument("--gpus-per-node", type=int,
                           help="GPUs per node = training processes per node")
    resources.add_argument("--cpus-per-task", type=int, help="CPU cores per training process")
    resources.add_argument("--mem", type=int, metavar="GB", help="memory per node in GB (0: default)")
    resources.add_argument("--time", type=int, metavar="MINUTES",
                           help="wall-clock limit of one job; the job requeues itself when it runs out")
    resources.add_argument("--signal-delay", type=int, metavar="SECONDS",
                           help=f"send SIG{PREEMPT_SIGNAL} this long before the time limit, "
                                "to checkpoint")
    resources.add_argument("--exclusive", action=argparse.BooleanOptionalAction,
                           help="request whole nodes")
    scheduling = parser.add_argument_group("scheduling")
    for name, help_text in (("--partition", "SLURM partition"), ("--account", "account to charge"),
                            ("--qos", "quality of service"),
                            ("--constraint", "node feature constraint (e.g. h100)"),
                            ("--job-name", "job name in squeue (default: the run name)"),
                            ("--comment", "free-text job comment"),
                            ("--mail", "address for SLURM mail on slurm.mail_type events")):
        scheduling.add_argument(name, type=_non_empty, help=help_text)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true",
                      help="print the sbatch script and the resolved config; submit nothing")
    mode.add_argument("--local", action="store_true",
                      help="run the same job on this machine through submitit's local executor "
                           "and wait for it")
    return parser


def resolve_config(args: argparse.Namespace) -> RootConfig:
    """Load the recipe, apply overrides and the command-line options, and check the launch.

    Args:
        args: parsed command line.

    Returns:
        The validated configuration the job will train with.

    Raises:
        ValueError: a ConfigError naming the config key, or a ValueError naming the
            command-line option, that is wrong.
    """
    profile = profile_overrides(args.profile) if args.profile else []
    cfg = load(args.config, [*profile, *args.overrides])
    changes = {field: getattr(args, option) for option, field in OPTION_FIELDS.items()
               if getattr(args, option) is not None}
    try:
        if changes:
            data = to_dict(cfg)
            data["slurm"].update(changes)
            cfg = from_dict(data)
        _check_launch(cfg, args.local)
        check_run(cfg, cfg.slurm.nodes * cfg.slurm.gpus_per_node)
    except ConfigError as error:
        raise _named_by_option(error, args) from None
    return cfg


def _named_by_option(error: ConfigError, args: argparse.Namespace) -> ValueError:
    """The error naming the command-line option that set the key, when one did."""
    option = next((o for o, f in OPTION_FIELDS.items() if error.key == f"slurm.{f}"), None)
    if option is None or getattr(args, option) is None:
        return error
    return ValueError(f"option --{option.replace('_', '-')}: {error.detail}")


def profile_overrides(path: Path) -> list[str]:
    """A cluster profile YAML as ``section.key=value`` overrides (values as JSON, a YAML subset).

    Args:
        path: the profile; a mapping of config sections.

    Returns:
        One override per leaf value, checked later by the config loader like any override.

    Raises:
        ValueError: when the file is missing, unreadable or not a mapping of sections.
    """
    if not path.is_file():
        raise ValueError(f"--profile: cluster profile {str(path)!r} does not exist")
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as error:  # yaml and OmegaConf errors alike mean "bad YAML"
        raise ValueError(f"--profile: cannot parse {str(path)!r}: {error}") from error
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"--profile: {str(path)!r} must be a mapping of config sections "
                         "(e.g. slurm: {partition: gpu})")
    overrides: list[str] = []

    def flatten(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                flatten(f"{prefix}.{key}", item)
        else:
            overrides.append(f"{prefix}={json.dumps(value)}")

    for section, values in data.items():
        flatten(str(section), values)
    return overrides


def _check_launch(cfg: RootConfig, local: bool) -> None:
    """Checks of the launch itself: signal timing, local node count (the batch split over the job's
    ranks is :func:`check_run`'s)."""
    slurm = cfg.slurm
    if slurm.signal_delay_s >= slurm.time_min * 60:
        raise ConfigError("slurm.signal_delay_s",
                          f"{slurm.signal_delay_s} s (--signal-delay) must be shorter than the "
                          f"time limit slurm.time_min={slurm.time_min} min (--time)")
    if local and slurm.nodes != 1:
        raise ConfigError("slurm.nodes",
                          f"--local runs on this machine: it needs 1 node, got {slurm.nodes}")


@dataclass(frozen=True)
class NodeOffer:
    """One node of one partition, as ``sinfo`` reports it."""

    partition: str
    default: bool
    """Whether it is the cluster's default partition (sbatch without --partition)."""
    cpus: int
    memory_mb: int
    gpus: int


_GPU_GRES = re.compile(r"gpu(?::[^:,(]+)?:(\d+)")
"""The count in a gres entry: gpu:8, gpu:a100:8, gpu:a100:8(S:0-1)."""


def partition_nodes() -> Optional[list[NodeOffer]]:
    """Every node of every partition (``sinfo -N``); None where sinfo is missing or fails."""
    if shutil.which("sinfo") is None:
        return None
    done = subprocess.run(["sinfo", "-h", "-N", "-o", "%P|%c|%m|%G"], capture_output=True, text=True,
                          timeout=60)
    if done.returncode != 0:
        logging.getLogger(__name__).warning("sinfo failed (%s): the request is not checked against the "
                                            "partition", done.stderr.strip())
        return None
    nodes = []
    for line in done.stdout.split():
        partition, cpus, memory, gres = line.split("|")
        nodes.append(NodeOffer(partition.rstrip("*"), partition.endswith("*"), int(cpus.rstrip("+")),
                               int(memory.rstrip("+")), sum(int(n) for n in _GPU_GRES.findall(gres))))
    return nodes


def check_request(cfg: RootConfig, nodes: Sequence[NodeOffer]) -> None:
    """Refuse a request that the partition can never run (SLURM would keep it pending forever,
    ``Reason=PartitionConfig``): per node CPUs (tasks x cpus_per_task), GPUs and memory, then the
    number of nodes that offer all three.

    Args:
        cfg: the resolved configuration.
        nodes: what the cluster offers (:func:`partition_nodes`).

    Raises:
        ConfigError: naming the slurm key (and so the option) to change.
    """
    slurm = cfg.slurm
    names = sorted({node.partition for node in nodes})
    partition = slurm.partition or next((node.partition for node in nodes if node.default), None)
    if partition is None:
        return  # no default partition: sbatch itself asks for --partition
    if partition not in names:
        raise ConfigError("slurm.partition", f"partition {partition!r} does not exist on this cluster "
                                             f"(sinfo lists {', '.join(names)})")
    members = [node for node in nodes if node.partition == partition]
    tasks = slurm.gpus_per_node
    needs = {  # key: (amount per node, NodeOffer field, what it is)
        "slurm.cpus_per_task": (tasks * slurm.cpus_per_task, "cpus",
                                f"{tasks} task(s) x {slurm.cpus_per_task} CPUs = {tasks * slurm.cpus_per_task} CPUs"),
        "slurm.gpus_per_node": (tasks if uses_gpus(cfg) else 0, "gpus", f"{tasks} GPUs (one per task)"),
        "slurm.mem_gb": (slurm.mem_gb * 1024, "memory_mb", f"{slurm.mem_gb} GB of memory"),
    }
    for key, (amount, field, what) in needs.items():
        most = max(getattr(node, field) for node in members)
        if amount > most:
            offered = f"{most / 1024:.0f} GB" if field == "memory_mb" else f"{most} {field[:-1].upper()}s"
            raise ConfigError(key, f"{what} per node, but the nodes of partition {partition!r} have at most "
                                   f"{offered}: the job could never start; ask for less")
    fitting = [node for node in members if all(getattr(node, f) >= a for a, f, _ in needs.values())]
    if len(fitting) < slurm.nodes:
        raise ConfigError("slurm.nodes", f"{slurm.nodes} nodes, but partition {partition!r} has {len(fitting)} "
                                         "with the CPUs, GPUs and memory asked per node: the job could never "
                                         "start; ask for fewer")


def submitit_folder(cfg: RootConfig) -> Path:
    """Where submitit keeps the job's pickles and logs (``slurm.folder`` or ``{run}/slurm``)."""
    return Path(cfg.slurm.folder).absolute() if cfg.slurm.folder else RunFolder.of(cfg).absolute().slurm


def uses_gpus(cfg: RootConfig) -> bool:
    """Whether the job asks SLURM for GPUs (not with ``train.device=cpu``)."""
    return cfg.train.device != "cpu"


def sbatch_parameters(cfg: RootConfig) -> dict[str, Any]:
    """submitit SLURM parameters (sbatch vocabulary) for this config.

    Args:
        cfg: validated configuration.

    Returns:
        Keyword arguments for ``SlurmExecutor.update_parameters``.
    """
    slurm = cfg.slurm
    params: dict[str, Any] = {
        "job_name": slurm.job_name or str(cfg.logging.run_name),
        "time": slurm.time_min,
        "nodes": slurm.nodes,
        "ntasks_per_node": slurm.gpus_per_node,
        "cpus_per_task": slurm.cpus_per_task,
        # The job's submitit must listen for the signal sbatch asks for (whatever signal the
        # submitting process's submitit was imported with).
        "setup": [f"export {SUBMITIT_SIGNAL_VARIABLE}={PREEMPT_SIGNAL}", *slurm.setup],
        "additional_parameters": {
            "signal": f"{PREEMPT_SIGNAL}@{slurm.signal_delay_s}",
            "requeue": True,  # requeue on preemption, and let the job requeue itself
        },
    }
    if uses_gpus(cfg):
        params["gpus_per_node"] = slurm.gpus_per_node
    if slurm.mem_gb:
        params["mem"] = f"{slurm.mem_gb}GB"
    if slurm.exclusive:
        params["exclusive"] = True
    for name in ("partition", "account", "qos", "constraint", "comment"):
        if getattr(slurm, name):
            params[name] = getattr(slurm, name)
    if slurm.mail:
        params["mail_user"] = slurm.mail
        params["mail_type"] = slurm.mail_type
    return params


def render_sbatch_script(cfg: RootConfig) -> str:
    """The sbatch script submitit would write for this config (nothing is written or submitted)."""
    executor = _ScriptOnlySlurmExecutor(submitit_folder(cfg), max_num_timeout=cfg.slurm.max_requeues)
    executor.update_parameters(**sbatch_parameters(cfg))
    # submitit has no public "render" call; this is the text its submission writes.
    return executor._make_submission_file_text(executor._submitit_command_str, uid="dry-run")


def make_executor(cfg: RootConfig, local: bool) -> submitit.AutoExecutor:
    """submitit's AutoExecutor for SLURM (or its local executor), configured from ``cfg``."""
    folder = submitit_folder(cfg)
    if local:
        # The local executor's processes inherit this environment.
        os.environ[SUBMITIT_SIGNAL_VARIABLE] = PREEMPT_SIGNAL
        executor = submitit.AutoExecutor(folder, cluster="local",
                                         local_max_num_timeout=cfg.slurm.max_requeues)
        executor.update_parameters(
            timeout_min=cfg.slurm.time_min, tasks_per_node=cfg.slurm.gpus_per_node,
            gpus_per_node=cfg.slurm.gpus_per_node if uses_gpus(cfg) else 0)
        return executor
    if shutil.which("sbatch") is None:
        raise RuntimeError("sbatch is not on PATH: submit from a SLURM login node, or use --local "
                           "(this machine) or --dry-run (print the script)")
    executor = submitit.AutoExecutor(folder, cluster="slurm",
                                     slurm_max_num_timeout=cfg.slurm.max_requeues)
    executor.update_parameters(**{f"slurm_{k}": v for k, v in sbatch_parameters(cfg).items()})
    return executor


def _write_job_id(folder: RunFolder, job_id: str) -> None:
    """Record the job id in the run folder (atomically)."""
    folder.root.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder.slurm_job_id, (job_id + "\n").encode())


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = resolve_config(args)
    except ValueError as error:  # ConfigError included
        print(f"error: {error}\nnothing was submitted", file=sys.stderr)
        return 2
    slurm = cfg.slurm
    tasks = slurm.nodes * slurm.gpus_per_node
    layout = (f"{slurm.nodes} node(s) x {slurm.gpus_per_node} task(s) = {tasks} tasks"
              f"{'' if uses_gpus(cfg) else ' on CPU'}")
    if args.dry_run:
        print(f"# sbatch script submitit would write to {submitit_folder(cfg)} ({layout}):")
        print(render_sbatch_script(cfg))
        print(f"# resolved config (run folder {RunFolder.of(cfg).absolute().root}):")
        print(to_yaml(cfg), end="")
        return 0
    try:
        executor = make_executor(cfg, args.local)
        offers = None if args.local else partition_nodes()
        if offers:
            check_request(cfg, offers)
        run_lock.check_free(RunFolder.of(cfg).absolute(), me=None)  # a live run in the folder: refused
    except ConfigError as error:
        print(f"error: {_named_by_option(error, args)}\nnothing was submitted", file=sys.stderr)
        return 2
    except RuntimeError as error:
        print(f"error: {error}\nnothing was submitted", file=sys.stderr)
        return 2
    job = executor.submit(TrainingJob.from_config(cfg))
    _write_job_id(RunFolder.of(cfg).absolute(), job.job_id)
    if not args.local:  # locked for the job from now on: a second submission is refused while it waits
        run_lock.claim_for_job(RunFolder.of(cfg).absolute(), job.job_id)
    print(f"submitted job {job.job_id} ({'local' if args.local else 'SLURM'}, {layout})")
    print(f"logs: {job.paths.stdout} (rank 0 output), {job.paths.stderr} (rank 0 errors)")
    print(f"run folder: {RunFolder.of(cfg).absolute().root}")
    print(f"follow it: tensorboard --logdir {RunFolder.of(cfg).absolute().tensorboard}")
    if args.local:
        summary = job.results()[0]
        evaluation = ", ".join(f"{k} {v:.4g}" for k, v in summary.metrics.items()
                               if k.startswith("eval/"))
        print(f"finished: {summary.status} at step {summary.step} after {summary.requeues} "
              f"requeue(s); {evaluation}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
