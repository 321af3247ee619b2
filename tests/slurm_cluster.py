"""Start or stop a real SLURM cluster, with job accounting, on this machine.

Two layouts, each with its own state folder, so that both can run at once:

- **one node** (the default): this host is the controller and the only node, configs in
  /etc/slurm. Used by the SLURM tests of tests/test_submit.py and for trying ``launch/submit.py``.
- **several nodes** (``--nodes N``, N >= 2): each node is a network namespace with its own
  hostname (node1 .. nodeN), its own address on a bridge that exists only inside the namespaces,
  its own slurmd and sshd. A controller namespace holds the bridge, slurmctld, slurmdbd and the
  database; it is also the login node from which jobs are submitted. Used by tests/test_multinode.py.

    python tests/slurm_cluster.py start [--nodes N] [--state-dir DIR]   # installs what is missing, starts it
    python tests/slurm_cluster.py status [--nodes N] [--state-dir DIR]  # which daemons run, sinfo
    python tests/slurm_cluster.py stop [--nodes N] [--state-dir DIR]    # stops it, if this checkout started it
    python tests/slurm_cluster.py exec --nodes N [--on NODE] -- COMMAND  # a command on the login node (or NODE)

It needs root and a Debian-like system. What ``start`` does, in order (each step is skipped when
already done, so running it again is harmless; for several nodes it also restarts a node whose
daemons died):

1. ``apt-get install slurm-wlm munge mariadb-server slurmdbd`` (and for several nodes ``pdsh
   openssh-server openssh-client iproute2``) when a program is missing.
2. Writes slurm.conf and slurmdbd.conf with this machine's CPUs and memory (no GPUs), process
   tracking through /proc and no task plugin, so neither cgroups nor systemd are needed. One node:
   ``/etc/slurm/``, for ``hostname -s``. Several nodes: ``STATE/etc/`` (clients find it through
   ``SLURM_CONF``), plus the hosts file and the ssh keys and configs of the nodes. A config it did
   not write is never overwritten.
3. Several nodes: creates the namespaces, the bridge and a veth pair per node (all inside the
   namespaces: the machine's own network, routes and /etc/hosts stay untouched).
4. Starts munged (one node: the system's, as user munge; several: a private one with its own key
   and socket), a private MariaDB server (data, socket and logs in the state folder, TCP on
   127.0.0.1 only), creates the accounting database and its user, starts slurmdbd, registers the
   cluster with sacctmgr, starts slurmctld and the slurmd of each node (and each node's sshd).
5. Waits until ``sinfo`` shows every node idle and ``sacct`` answers.

A node namespace is a machine of its own for the network only: its daemons and job processes see
the same filesystem (the checkout, /tmp), and a private mount namespace binds the cluster's hosts
file over /etc/hosts (every node name -> its bridge address, so that gloo, which binds to the
host name, reaches every rank) and the cluster's ssh client config over /etc/ssh/ssh_config (root
reaches every node by key: ``ssh node2``, pdsh, ``deepspeed --hostfile``). A dead node is noticed
within ``SlurmdTimeout`` (10 s) and comes back by itself when its slurmd registers again
(``ReturnToService=2``).

Everything the cluster writes (spool, logs, pid files, database, keys) lives under the state
folder: ``/var/tmp/anchorformer-slurm`` (one node) or ``/var/tmp/anchorformer-slurm-nodes`` by
default. Delete it after ``stop`` for a fresh cluster.

Several checkouts on one machine share one cluster of each layout. ``start`` records which
checkout started the daemons (``owner`` in the state folder); ``stop`` stops them only for that
checkout (``--force`` for any), so one checkout's ``make slurm-down`` or test session does not pull
the cluster from under another's jobs. ``stop`` ends every process it started by its pid, then
whatever still runs in the node namespaces (job leftovers), then removes the namespaces.
``status`` exits 0 when every daemon runs, 3 otherwise.
"""
from __future__ import annotations

import argparse
import logging
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

logger = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path("/var/tmp/anchorformer-slurm")
DEFAULT_NODES_STATE_DIR = Path("/var/tmp/anchorformer-slurm-nodes")
SLURM_CONF = Path("/etc/slurm/slurm.conf")
SLURMDBD_CONF = Path("/etc/slurm/slurmdbd.conf")
CLUSTER_NAME = "anchorformer"
NODES_CLUSTER_NAME = "anchorformer_nodes"
ACCOUNT_NAME = "anchorformer"
PARTITION_NAME = "debug"
DB_NAME = "slurm_acct_db"
DB_USER = "slurm"
DB_PORT = 3307  # not MariaDB's usual 3306, so a system database server is left alone
# First line of the configs it writes; it names tools/, where this script lived, so that configs
# written before its move to tests/ are still recognised as its own.
CONFIG_MARKER = "# Written by AnchorFormer tools/slurm_cluster.py"
APT_PACKAGES = ("slurm-wlm", "munge", "mariadb-server", "slurmdbd")
REQUIRED_PROGRAMS = ("slurmctld", "slurmd", "slurmdbd", "sacctmgr", "sacct", "sinfo", "munged",
                     "mariadbd", "mariadb-install-db", "mariadb")
NODES_APT_PACKAGES = (*APT_PACKAGES, "pdsh", "openssh-server", "openssh-client", "iproute2")
NODES_REQUIRED_PROGRAMS = (*REQUIRED_PROGRAMS, "mungekey", "pdsh", "sshd", "ssh", "ssh-keygen", "ip",
                           "nsenter", "unshare")
# munged checks these modes: its socket folder must be traversable by clients, the rest private.
MUNGE_DIRS = {Path("/run/munge"): 0o755, Path("/var/log/munge"): 0o700, Path("/var/lib/munge"): 0o700}
MUNGE_PID_FILE = Path("/run/munge/munged.pid")
CHECKOUT = Path(__file__).resolve().parents[1]
"""The checkout this script belongs to: the owner it records when it starts the cluster."""

SUBNET = "10.213.0"
"""The /24 of the node namespaces' bridge; it exists only inside the namespaces."""
CONTROLLER = "ctl"
"""Host name of the controller (and login) namespace of the multi-node cluster."""
# More CPUs per node than this machine has: a test runs as many tasks on one node as a 3-node job
# runs in all (slurmd reports the configured resources: SlurmdParameters=config_overrides).
NODE_CPUS = 4
SLURMD_TIMEOUT_S = 10
"""How long a silent node keeps its jobs before SLURM marks it down (SLURM's default: 300 s)."""


class ClusterError(RuntimeError):
    """The local SLURM cluster could not be started or stopped; the message says what failed."""


@dataclass(frozen=True)
class ClusterPaths:
    """Where the cluster keeps its state.

    Args:
        root: the state folder; everything below is derived from it.
    """

    root: Path

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def etc_dir(self) -> Path:
        """Configs, hosts file and ssh settings of the multi-node cluster."""
        return self.root / "etc"

    @property
    def ctld_spool(self) -> Path:
        return self.root / "spool" / "slurmctld"

    @property
    def slurmd_spool(self) -> Path:
        return self.root / "spool" / "slurmd"

    @property
    def db_dir(self) -> Path:
        return self.root / "mariadb"

    @property
    def db_socket(self) -> Path:
        return self.run_dir / "mariadb.sock"

    @property
    def db_password_file(self) -> Path:
        return self.root / "db_password"

    @property
    def munge_dir(self) -> Path:
        """Key, socket, seed, pid and log of the multi-node cluster's private munged."""
        return self.root / "munge"

    @property
    def ssh_dir(self) -> Path:
        return self.root / "ssh"

    @property
    def owner_file(self) -> Path:
        """Names the checkout whose ``start`` started the daemons."""
        return self.root / "owner"

    @property
    def nodes_file(self) -> Path:
        """How many nodes the running multi-node cluster has."""
        return self.root / "nodes"

    def pid_file(self, daemon: str) -> Path:
        """Pid file of ``daemon`` (slurmctld, slurmd, slurmdbd, mariadbd, slurmd-node1, ...)."""
        return self.run_dir / f"{daemon}.pid"


def _run(cmd: list[str], check: bool = True, timeout: float = 60,
         **kwargs: Any) -> subprocess.CompletedProcess:
    """Run a command, capturing its output; on failure raise ClusterError with that output."""
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise ClusterError(f"`{' '.join(cmd)}` failed (exit {result.returncode}):\n"
                           f"{result.stdout}{result.stderr}")
    return result


def _wait_for(what: str, probe: Callable[[], bool], timeout: float, log_hint: Path | None = None) -> None:
    """Poll ``probe()`` every 0.5 s until it returns True; raise ClusterError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe():
            return
        time.sleep(0.5)
    hint = f"; see {log_hint}" if log_hint else ""
    raise ClusterError(f"timed out after {timeout:.0f} s waiting for {what}{hint}")


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists (running or stopped) and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # A daemon that exited but is not reaped yet (state Z) is gone for our purposes.
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _read_pid(pid_file: Path) -> int | None:
    """The pid in ``pid_file`` if that process is alive, else None."""
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if alive(pid) else None


def _stop_pid(name: str, pid: int, timeout: float = 30) -> None:
    """SIGTERM process ``pid`` and wait until it is gone (SIGKILL at timeout)."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive(pid):
        time.sleep(0.2)
    if alive(pid):
        logger.warning("%s (pid %d) ignored SIGTERM for %.0f s; killing it", name, pid, timeout)
        os.kill(pid, signal.SIGKILL)
    logger.info("stopped %s (pid %d)", name, pid)


def _stop_pid_file(name: str, pid_file: Path, timeout: float = 30) -> None:
    """Stop the process named in ``pid_file`` (see :func:`_stop_pid`) and remove the file."""
    pid = _read_pid(pid_file)
    if pid is None:
        logger.info("%s is not running", name)
    else:
        _stop_pid(name, pid, timeout)
    pid_file.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Installation and configuration


def install_if_missing(packages: Sequence[str] = APT_PACKAGES,
                       programs: Sequence[str] = REQUIRED_PROGRAMS) -> None:
    """apt-get install ``packages`` when one of ``programs`` is missing."""
    missing = [p for p in programs if shutil.which(p) is None]
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise ClusterError(f"missing programs {missing} and no apt-get to install them; install "
                           f"the packages {' '.join(packages)} by hand")
    logger.info("installing %s (missing: %s)", " ".join(packages), ", ".join(missing))
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run(["apt-get", "update", "-q"], timeout=600, env=env)
    _run(["apt-get", "install", "-y", "-q", *packages], timeout=1200, env=env)
    still_missing = [p for p in programs if shutil.which(p) is None]
    if still_missing:
        raise ClusterError(f"after installing {packages}, still missing: {still_missing}")


def _node_resources() -> tuple[int, int]:
    """(CPUs, usable memory in MiB) of this machine, as slurmd will report them."""
    mem_kib = 0
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
                break
    # Slurm drains a node whose RealMemory exceeds what slurmd measures; leave a margin.
    return os.cpu_count() or 1, int(mem_kib / 1024 * 0.9)


@dataclass(frozen=True)
class SlurmNode:
    """One node line of slurm.conf."""

    name: str
    address: str
    cpus: int
    memory_mib: int


def render_slurm_conf(paths: ClusterPaths, host: str, cpus: int, memory_mib: int) -> str:
    """The slurm.conf text for a one-node cluster on ``host``.

    Args:
        paths: state folder layout.
        host: short host name (``hostname -s``), used for the controller and the node.
        cpus: CPUs of the node.
        memory_mib: RealMemory of the node.

    Returns:
        The file content.
    """
    return _render_slurm_conf(paths, CLUSTER_NAME, controller=host, accounting_host="localhost",
                              nodes=[SlurmNode(host, "127.0.0.1", cpus, memory_mib)], daemon_suffix="")


def _render_slurm_conf(paths: ClusterPaths, cluster_name: str, controller: str, accounting_host: str,
                       nodes: Sequence[SlurmNode], daemon_suffix: str, extra_lines: Sequence[str] = (),
                       munge_socket: Path | None = None) -> str:
    """The slurm.conf text both layouts share.

    Args:
        paths: state folder layout.
        cluster_name: ClusterName.
        controller: SlurmctldHost (``host`` or ``host(address)``).
        accounting_host: where slurmdbd listens.
        nodes: the node lines; all of them form the default partition.
        daemon_suffix: appended to slurmd's spool folder, pid and log file names (``-%n``: one
            each per node, when several slurmd share the state folder).
        extra_lines: appended before the node lines.
        munge_socket: a private munged's socket (None: the system's).
    """
    auth_info = f"AuthInfo=socket={munge_socket}\n" if munge_socket else ""
    # Clients and slurmctld reach slurmdbd through the munged named here (default: the system's).
    accounting_auth = f"AccountingStoragePass={munge_socket}\n" if munge_socket else ""
    extra = "".join(f"{line}\n" for line in extra_lines)
    node_lines = "".join(f"NodeName={node.name} NodeAddr={node.address} CPUs={node.cpus} "
                         f"RealMemory={node.memory_mib} State=UNKNOWN\n" for node in nodes)
    partition_nodes = ",".join(node.name for node in nodes)
    return f"""{CONFIG_MARKER}; state in {paths.root}
ClusterName={cluster_name}
SlurmctldHost={controller}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
{auth_info}StateSaveLocation={paths.ctld_spool}
SlurmdSpoolDir={paths.slurmd_spool}{daemon_suffix}
SlurmctldPidFile={paths.pid_file('slurmctld')}
SlurmdPidFile={paths.pid_file('slurmd' + daemon_suffix)}
SlurmctldLogFile={paths.log_dir / 'slurmctld.log'}
SlurmdLogFile={paths.log_dir / f'slurmd{daemon_suffix}.log'}
# No cgroups or systemd in containers: track processes through /proc, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
# No mail server on a test machine: --mail-type is accepted and nothing is sent.
MailProg=/bin/true
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost={accounting_host}
{accounting_auth}JobCompType=jobcomp/none
{extra}{node_lines}PartitionName={PARTITION_NAME} Nodes={partition_nodes} Default=YES MaxTime=INFINITE State=UP
"""


def render_slurmdbd_conf(paths: ClusterPaths, db_password: str, munge_socket: Path | None = None) -> str:
    """The slurmdbd.conf text: slurmdbd on localhost, storing into the private MariaDB server
    (authenticating through a private munged's ``munge_socket``, if given)."""
    auth_info = f"AuthInfo=socket={munge_socket}\n" if munge_socket else ""
    return f"""{CONFIG_MARKER}; state in {paths.root}
AuthType=auth/munge
{auth_info}DbdHost=localhost
SlurmUser=root
PidFile={paths.pid_file('slurmdbd')}
LogFile={paths.log_dir / 'slurmdbd.log'}
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={DB_PORT}
StorageUser={DB_USER}
StoragePass={db_password}
StorageLoc={DB_NAME}
"""


def _write_config(path: Path, text: str, mode: int) -> None:
    """Write a config atomically; refuse to replace one that this script did not write."""
    if path.exists():
        current = path.read_text()
        if not current.startswith(CONFIG_MARKER):
            raise ClusterError(f"{path} exists and was not written by this script; move it away "
                               "(this script only manages its own test cluster)")
        if current == text:
            return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    tmp.replace(path)
    logger.info("wrote %s", path)


def _db_password(paths: ClusterPaths) -> str:
    """The accounting database password, created once and kept in the state folder."""
    if not paths.db_password_file.exists():
        tmp = paths.db_password_file.with_suffix(".tmp")
        tmp.write_text(secrets.token_hex(16))
        tmp.chmod(0o600)
        tmp.replace(paths.db_password_file)
    return paths.db_password_file.read_text().strip()


# --------------------------------------------------------------------------------------------
# The two clusters


def _munge_works(socket_path: Path | None = None) -> bool:
    """Whether a munged answers (on ``socket_path``, or the system's socket)."""
    option = [f"--socket={socket_path}"] if socket_path else []
    encoded = subprocess.run(["munge", *option, "-n"], capture_output=True)
    if encoded.returncode != 0:
        return False
    return subprocess.run(["unmunge", *option], input=encoded.stdout, capture_output=True).returncode == 0


class SlurmCluster(ABC):
    """What both layouts share: the state folder, the private MariaDB, slurmdbd, accounting, the
    owner record, and stopping every daemon by its pid file.

    Subclasses say where the configs live, how the controller side's commands run, which munged
    they use and how the nodes start.

    Args:
        paths: state folder layout.
    """

    cluster_name = CLUSTER_NAME
    apt_packages: Sequence[str] = APT_PACKAGES
    required_programs: Sequence[str] = REQUIRED_PROGRAMS

    def __init__(self, paths: ClusterPaths):
        self.paths = paths

    # -- what each layout says

    @property
    @abstractmethod
    def slurm_conf(self) -> Path:
        """The slurm.conf of this cluster (slurmdbd.conf lies beside it)."""

    @abstractmethod
    def node_names(self) -> list[str]:
        """The cluster's node names."""

    @abstractmethod
    def _write_configs(self) -> None:
        """Write slurm.conf, slurmdbd.conf and whatever else the daemons read."""

    @abstractmethod
    def _start_munge(self) -> None:
        """Start the munged the cluster authenticates with, unless it answers already."""

    @abstractmethod
    def _munge_pid_file(self) -> Path:
        """Pid file of that munged."""

    @abstractmethod
    def _start_controller_and_nodes(self) -> None:
        """Start slurmctld and every node's daemons (those not running)."""

    @abstractmethod
    def _node_daemons(self) -> dict[str, Path]:
        """{name: pid file} of the daemons on the nodes (stopped first)."""

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` as run on the controller (the login node): clients, slurmdbd, MariaDB."""
        return list(argv)

    def _after_stop(self) -> None:
        """Clean-up once every daemon is stopped."""

    # -- shared

    def env(self) -> dict[str, str]:
        """This process's environment with ``SLURM_CONF`` naming the cluster's config."""
        return {**os.environ, "SLURM_CONF": str(self.slurm_conf)}

    def run(self, argv: Sequence[str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run ``argv`` on the controller (see :meth:`command`) with the cluster's ``SLURM_CONF``."""
        return _run(self.command(argv), check=check, timeout=timeout, env=self.env())

    def daemons(self) -> dict[str, Path]:
        """{name: pid file} of every daemon, in the order they are stopped."""
        return {**self._node_daemons(), "slurmctld": self.paths.pid_file("slurmctld"),
                "slurmdbd": self.paths.pid_file("slurmdbd"), "mariadbd": self.paths.pid_file("mariadbd"),
                "munged": self._munge_pid_file()}

    def status(self) -> dict[str, bool]:
        """Which daemons run: {name: alive}."""
        return {name: _read_pid(pid_file) is not None for name, pid_file in self.daemons().items()}

    def owner(self) -> Path | None:
        """The checkout that started the running cluster (None: unknown, e.g. started by hand)."""
        try:
            return Path(self.paths.owner_file.read_text().strip())
        except OSError:
            return None

    def start(self) -> None:
        """Install (if needed), configure and start the whole cluster; return once it takes jobs.

        Raises:
            ClusterError: naming the step that failed and the log to read.
        """
        if os.geteuid() != 0:
            raise ClusterError("the local SLURM cluster needs root (it installs packages and starts "
                               "daemons); run it with sudo")
        install_if_missing(self.apt_packages, self.required_programs)
        for folder in (self.paths.log_dir, self.paths.run_dir, self.paths.ctld_spool):
            folder.mkdir(parents=True, exist_ok=True)
        self._write_configs()
        if not any(self.status().values()):  # nothing runs: this checkout starts (and owns) the cluster
            self.paths.owner_file.write_text(f"{CHECKOUT}\n")
        self._start_munge()
        self._start_mariadb()
        self._start_daemon("slurmdbd", self.command(["slurmdbd"]))
        _wait_for("slurmdbd to answer sacctmgr", self._sacctmgr_answers, 60,
                  self.paths.log_dir / "slurmdbd.log")
        self._register_accounting()
        self._start_controller_and_nodes()
        self._wait_until_ready()
        logger.info("SLURM cluster %r is ready (state in %s)", self.cluster_name, self.paths.root)

    def stop(self, force: bool = False) -> bool:
        """Stop every daemon (nodes first), if this checkout started them.

        Args:
            force: stop them whoever started them.

        Returns:
            Whether the daemons were stopped (False: another checkout's cluster, left running).
        """
        started_by = self.owner()
        if started_by != CHECKOUT and not force and any(self.status().values()):
            logger.warning("the SLURM cluster in %s was started by %s, not by this checkout (%s); leaving "
                           "it running (stop --force stops it anyway)", self.paths.root,
                           started_by or "someone else", CHECKOUT)
            return False
        for name, pid_file in self.daemons().items():
            _stop_pid_file(name, pid_file)
        self._after_stop()
        self.paths.owner_file.unlink(missing_ok=True)
        return True

    def _start_daemon(self, name: str, argv: list[str], pid_file: Path | None = None) -> None:
        """Start a daemon that forks into the background by itself, unless it runs already, and
        wait for its pid file."""
        pid_file = pid_file or self.paths.pid_file(name)
        if _read_pid(pid_file) is not None:
            return
        _run(argv, timeout=60, env=self.env())
        _wait_for(f"{name} to write its pid file", lambda: _read_pid(pid_file) is not None,
                  30, self.paths.log_dir / f"{name}.log")
        logger.info("%s is up", name)

    def _mariadb_answers(self) -> bool:
        return subprocess.run(["mariadb-admin", f"--socket={self.paths.db_socket}", "--user=root", "ping"],
                              capture_output=True).returncode == 0

    def _start_mariadb(self) -> None:
        """Start the private MariaDB server (initialising its data folder once) and create the
        accounting database and user."""
        paths = self.paths
        if not self._mariadb_answers():
            if not (paths.db_dir / "mysql").is_dir():
                logger.info("initialising MariaDB data in %s", paths.db_dir)
                _run(["mariadb-install-db", f"--datadir={paths.db_dir}", "--user=root",
                      "--auth-root-authentication-method=socket", "--skip-test-db"], timeout=300)
            log_file = paths.log_dir / "mariadb.log"
            # mariadbd does not daemonize: own session so it outlives this script.
            subprocess.Popen(
                self.command(["mariadbd", "--no-defaults", f"--datadir={paths.db_dir}", "--user=root",
                              f"--socket={paths.db_socket}", f"--pid-file={paths.pid_file('mariadbd')}",
                              f"--port={DB_PORT}", "--bind-address=127.0.0.1", f"--log-error={log_file}",
                              "--innodb-buffer-pool-size=64M"]),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True)
            _wait_for("MariaDB", self._mariadb_answers, 60, log_file)
            logger.info("MariaDB is up on 127.0.0.1:%d", DB_PORT)
        password = _db_password(paths)
        statements = [f"CREATE DATABASE IF NOT EXISTS {DB_NAME};"]
        for host in ("localhost", "127.0.0.1"):
            statements += [
                f"CREATE USER IF NOT EXISTS '{DB_USER}'@'{host}' IDENTIFIED BY '{password}';",
                f"ALTER USER '{DB_USER}'@'{host}' IDENTIFIED BY '{password}';",
                f"GRANT ALL ON {DB_NAME}.* TO '{DB_USER}'@'{host}';",
            ]
        _run(["mariadb", f"--socket={paths.db_socket}", "--user=root", "-e", " ".join(statements)])

    def _sacctmgr_answers(self) -> bool:
        return self.run(["sacctmgr", "-n", "-P", "list", "cluster"], check=False).returncode == 0

    def _register_accounting(self) -> None:
        """Register the cluster, an account and root's association to it with slurmdbd (once).

        root keeps its default account; ``--account anchorformer`` is accepted too.
        """
        name = self.cluster_name
        clusters = self.run(["sacctmgr", "-n", "-P", "list", "cluster", "format=cluster"]).stdout.split()
        if name not in clusters:
            self.run(["sacctmgr", "-i", "add", "cluster", name])
        accounts = self.run(["sacctmgr", "-n", "-P", "list", "account", "format=account"]).stdout.split()
        if ACCOUNT_NAME not in accounts:
            self.run(["sacctmgr", "-i", "add", "account", ACCOUNT_NAME, f"cluster={name}",
                      "description=AnchorFormer tests", "organization=anchorformer"])
        associations = self.run(["sacctmgr", "-n", "-P", "list", "association",
                                 "format=account,user"]).stdout.split()
        if f"{ACCOUNT_NAME}|root" not in associations:
            self.run(["sacctmgr", "-i", "add", "user", "root", f"account={ACCOUNT_NAME}", f"cluster={name}"])

    def node_states(self) -> dict[str, str]:
        """{node: state} as sinfo reports it (``idle``, ``alloc``, ``down*``, ...); {} if it fails."""
        result = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False)
        if result.returncode != 0:
            return {}
        return dict(line.split() for line in result.stdout.splitlines() if line.strip())

    def _sacct_answers(self) -> bool:
        return self.run(["sacct", "-n", "-X", "-a", "-S", "now-1hours"], check=False).returncode == 0

    def _wait_until_ready(self, timeout: float = 90) -> None:
        """Wait until every node is usable (resuming once those SLURM marked down) and sacct answers."""
        deadline = time.monotonic() + timeout

        def nodes_usable() -> bool:
            states = self.node_states()
            for node, state in states.items():
                if state.startswith(("down", "drain")):
                    self.run(["scontrol", "update", f"NodeName={node}", "State=RESUME"], check=False)
            return set(states) == set(self.node_names()) and all(
                state.rstrip("*") in ("idle", "mixed", "allocated") for state in states.values())

        _wait_for("every node to be idle in sinfo", nodes_usable, max(1.0, deadline - time.monotonic()),
                  self.paths.log_dir)
        _wait_for("sacct to answer", self._sacct_answers, max(1.0, deadline - time.monotonic()),
                  self.paths.log_dir / "slurmdbd.log")


class OneNodeCluster(SlurmCluster):
    """This host as controller and only node; configs in /etc/slurm, the system's munged."""

    @property
    def slurm_conf(self) -> Path:
        return SLURM_CONF

    def node_names(self) -> list[str]:
        return [socket.gethostname().split(".")[0]]

    def _write_configs(self) -> None:
        self.paths.slurmd_spool.mkdir(parents=True, exist_ok=True)
        cpus, memory_mib = _node_resources()
        _write_config(SLURM_CONF, render_slurm_conf(self.paths, self.node_names()[0], cpus, memory_mib), 0o644)
        # slurmdbd refuses a config readable by others (it holds the database password).
        _write_config(SLURMDBD_CONF, render_slurmdbd_conf(self.paths, _db_password(self.paths)), 0o600)

    def _start_munge(self) -> None:
        """Start munged as user munge, unless a working one already answers."""
        if _munge_works():
            return
        for folder, mode in MUNGE_DIRS.items():
            folder.mkdir(parents=True, exist_ok=True)
            shutil.chown(folder, "munge", "munge")
            folder.chmod(mode)
        if not Path("/etc/munge/munge.key").exists():
            _run(["runuser", "-u", "munge", "--", "mungekey", "--create"])
        _run(["runuser", "-u", "munge", "--", "munged"])
        _wait_for("munged", _munge_works, 20, Path("/var/log/munge/munged.log"))
        logger.info("munged is up")

    def _munge_pid_file(self) -> Path:
        return MUNGE_PID_FILE

    def _start_controller_and_nodes(self) -> None:
        self._start_daemon("slurmctld", ["slurmctld"])
        self._start_daemon("slurmd", ["slurmd"])

    def _node_daemons(self) -> dict[str, Path]:
        return {"slurmd": self.paths.pid_file("slurmd")}


class NamespaceCluster(SlurmCluster):
    """``nodes`` nodes, each a network namespace (own host name, address, slurmd and sshd), and a
    controller namespace holding the bridge, slurmctld, slurmdbd and MariaDB (the login node).

    Args:
        paths: state folder layout; its name prefixes the namespaces' names.
        nodes: number of nodes (node1 .. nodeN).
    """

    cluster_name = NODES_CLUSTER_NAME
    apt_packages = NODES_APT_PACKAGES
    required_programs = NODES_REQUIRED_PROGRAMS

    def __init__(self, paths: ClusterPaths, nodes: int):
        super().__init__(paths)
        if nodes < 2:
            raise ClusterError(f"a multi-node cluster needs at least 2 nodes, got {nodes}")
        self.nodes = nodes

    @classmethod
    def running(cls, paths: ClusterPaths, nodes: int = 2) -> NamespaceCluster:
        """The cluster in ``paths`` with the node count its ``start`` recorded (``nodes`` if none)."""
        try:
            nodes = int(paths.nodes_file.read_text())
        except (OSError, ValueError):
            pass
        return cls(paths, nodes)

    # -- names and addresses

    @property
    def slurm_conf(self) -> Path:
        return self.paths.etc_dir / "slurm.conf"

    @property
    def hosts_file(self) -> Path:
        """Every node name (and the controller's) -> its bridge address; bound over /etc/hosts."""
        return self.paths.etc_dir / "hosts"

    @property
    def ssh_config(self) -> Path:
        """root's ssh client settings on the nodes; bound over /etc/ssh/ssh_config."""
        return self.paths.ssh_dir / "ssh_config"

    @property
    def munge_socket(self) -> Path:
        return self.paths.munge_dir / "munge.socket"

    def node_names(self) -> list[str]:
        return [f"node{index}" for index in range(1, self.nodes + 1)]

    def address(self, host: str) -> str:
        """Bridge address of a node or of the controller."""
        return f"{SUBNET}.1" if host == CONTROLLER else f"{SUBNET}.{10 + int(host.removeprefix('node'))}"

    def namespace(self, host: str) -> str:
        """Name of the network namespace of a node or of the controller (``ip netns list``)."""
        return f"{self.paths.root.name}-{host}"

    def namespace_path(self, host: str) -> Path:
        return Path("/run/netns") / self.namespace(host)

    # -- running commands in the cluster

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` on the login node: the controller's network namespace."""
        return ["nsenter", f"--net={self.namespace_path(CONTROLLER)}", "--", *argv]

    def node_command(self, node: str, argv: Sequence[str], cwd: Path | str = CHECKOUT) -> list[str]:
        """``argv`` on ``node``, in ``cwd``: its network, mount (hosts file, ssh config) and UTS
        (host name) namespaces, those of its running slurmd.

        Raises:
            ClusterError: when the node's slurmd is not running.
        """
        pid = _read_pid(self.paths.pid_file(f"slurmd-{node}"))
        if pid is None:
            raise ClusterError(f"{node} is down (its slurmd is not running); `start` restarts it")
        return ["nsenter", f"--target={pid}", "--net", "--mount", "--uts", f"--wd={cwd}", "--", *argv]

    def _as_machine(self, host: str, argv: Sequence[str]) -> list[str]:
        """``argv`` started as if ``host`` were a machine of its own: in its network namespace, with
        a private mount namespace in which the cluster's hosts file and ssh client config cover
        the machine's, and its own host name (a UTS namespace)."""
        binds = ((self.hosts_file, "/etc/hosts"), (self.ssh_config, "/etc/ssh/ssh_config"))
        script = " && ".join([*(f"mount --bind {shlex.quote(str(source))} {target}" for source, target in binds),
                              f"hostname {host}", f"exec {shlex.join(argv)}"])
        return ["nsenter", f"--net={self.namespace_path(host)}", "unshare", "--mount", "--uts",
                "--propagation", "private", "sh", "-c", script]

    def processes(self, host: str) -> list[int]:
        """Pids of every process in the network namespace of ``host`` (a node or the controller)."""
        try:
            namespace = os.stat(self.namespace_path(host))
        except OSError:
            return []
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                inside = os.stat(entry / "ns" / "net")
            except OSError:  # exited meanwhile, or a kernel thread
                continue
            if (inside.st_ino, inside.st_dev) == (namespace.st_ino, namespace.st_dev) and alive(int(entry.name)):
                pids.append(int(entry.name))
        return pids

    def kill_node(self, node: str) -> list[int]:
        """SIGKILL every process of ``node`` (slurmd, sshd, job steps and tasks): the node dies
        without a word, as a machine that loses power. ``start`` brings it back.

        Returns:
            The pids killed.
        """
        killed = self.processes(node)
        for pid in killed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        logger.info("killed %s: pids %s", node, killed)
        return killed

    # -- start

    def start(self) -> None:
        running = NamespaceCluster.running(self.paths, self.nodes)
        if running.nodes != self.nodes and any(running.status().values()):
            raise ClusterError(f"a {running.nodes}-node cluster runs in {self.paths.root}; stop it first "
                               f"(stop --nodes {running.nodes}) to start one of {self.nodes}")
        super().start()
        self.paths.nodes_file.write_text(f"{self.nodes}\n")

    def _write_configs(self) -> None:
        self.paths.etc_dir.mkdir(parents=True, exist_ok=True)
        for node in self.node_names():
            self.paths.slurmd_spool.with_name(f"slurmd-{node}").mkdir(parents=True, exist_ok=True)
        _, memory_mib = _node_resources()
        nodes = [SlurmNode(name, self.address(name), NODE_CPUS, memory_mib) for name in self.node_names()]
        conf = _render_slurm_conf(
            self.paths, self.cluster_name, controller=f"{CONTROLLER}({self.address(CONTROLLER)})",
            accounting_host=self.address(CONTROLLER), nodes=nodes, daemon_suffix="-%n",
            munge_socket=self.munge_socket,
            extra_lines=["# A node that stops answering is marked down (and its jobs requeued) within",
                         "# seconds, not SLURM's default 5 minutes.",
                         f"SlurmdTimeout={SLURMD_TIMEOUT_S}",
                         "# slurmd reports the resources configured here, not the machine's.",
                         "SlurmdParameters=config_overrides"])
        _write_config(self.slurm_conf, conf, 0o644)
        _write_config(self.slurm_conf.with_name("slurmdbd.conf"),
                      render_slurmdbd_conf(self.paths, _db_password(self.paths), self.munge_socket), 0o600)
        hosts = "".join(f"{self.address(host)} {host}\n" for host in [CONTROLLER, *self.node_names()])
        _write_config(self.hosts_file, f"{CONFIG_MARKER}\n127.0.0.1 localhost\n{hosts}", 0o644)
        self._write_ssh_settings()
        self._create_network()

    def _write_ssh_settings(self) -> None:
        """Keys made here (a host key for every node's sshd, root's key), root login by key only,
        and the client side that trusts the host key and offers root's key."""
        ssh = self.paths.ssh_dir
        ssh.mkdir(mode=0o700, exist_ok=True)
        for key in ("host_key", "id_ed25519"):
            if not (ssh / key).exists():
                _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"anchorformer test cluster {key}",
                      "-f", str(ssh / key)])
        (ssh / "authorized_keys").write_text((ssh / "id_ed25519.pub").read_text())
        host_key = (ssh / "host_key.pub").read_text().split()[:2]
        names = ",".join(f"{host},{self.address(host)}" for host in self.node_names())
        (ssh / "known_hosts").write_text(f"{names} {' '.join(host_key)}\n")
        _write_config(ssh / "sshd_config", f"""{CONFIG_MARKER}
HostKey {ssh / 'host_key'}
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
AuthorizedKeysFile {ssh / 'authorized_keys'}
# The key folder is root's alone (0700), but it lies under /var/tmp (world-writable, sticky),
# which sshd's strict modes refuse on the path to the authorized keys.
StrictModes no
UsePAM no
PrintMotd no
""", 0o600)
        _write_config(self.ssh_config, f"""{CONFIG_MARKER}
Host *
    IdentityFile {ssh / 'id_ed25519'}
    UserKnownHostsFile {ssh / 'known_hosts'}
    StrictHostKeyChecking yes
    BatchMode yes
""", 0o644)

    def _create_network(self) -> None:
        """The controller namespace with the bridge, and each node namespace joined to it by a
        veth pair; all of it created inside the namespaces (the machine's network is untouched)."""
        ctl = self.namespace(CONTROLLER)
        if not self.namespace_path(CONTROLLER).exists():
            _run(["ip", "netns", "add", ctl])
        if _run(["ip", "-n", ctl, "link", "show", "br0"], check=False).returncode != 0:
            _run(["ip", "-n", ctl, "link", "add", "br0", "type", "bridge"])
            _run(["ip", "-n", ctl, "addr", "add", f"{self.address(CONTROLLER)}/24", "dev", "br0"])
            _run(["ip", "-n", ctl, "link", "set", "br0", "up"])
            _run(["ip", "-n", ctl, "link", "set", "lo", "up"])
        for node in self.node_names():
            namespace = self.namespace(node)
            if not self.namespace_path(node).exists():
                _run(["ip", "netns", "add", namespace])
            if _run(["ip", "-n", namespace, "link", "show", "eth0"], check=False).returncode == 0:
                continue
            _run(["ip", "-n", ctl, "link", "add", f"v{node}", "type", "veth", "peer", "name", "eth0",
                  "netns", namespace])
            _run(["ip", "-n", ctl, "link", "set", f"v{node}", "master", "br0", "up"])
            _run(["ip", "-n", namespace, "addr", "add", f"{self.address(node)}/24", "dev", "eth0"])
            _run(["ip", "-n", namespace, "link", "set", "eth0", "up"])
            _run(["ip", "-n", namespace, "link", "set", "lo", "up"])

    def _start_munge(self) -> None:
        """A private munged (own key and socket, as user munge): another cluster's munged may stop."""
        munge = self.paths.munge_dir
        if _munge_works(self.munge_socket):
            return
        munge.mkdir(exist_ok=True)
        shutil.chown(munge, "munge", "munge")
        munge.chmod(0o755)  # clients reach the socket through it
        key = munge / "munge.key"
        if not key.exists():
            _run(["runuser", "-u", "munge", "--", "mungekey", "--create", f"--keyfile={key}"])
        _run(["runuser", "-u", "munge", "--", "munged", f"--socket={self.munge_socket}", f"--key-file={key}",
              f"--pid-file={self._munge_pid_file()}", f"--log-file={munge / 'munged.log'}",
              f"--seed-file={munge / 'munged.seed'}"])
        _wait_for("munged", lambda: _munge_works(self.munge_socket), 20, munge / "munged.log")
        logger.info("munged is up on %s", self.munge_socket)

    def _munge_pid_file(self) -> Path:
        return self.paths.munge_dir / "munged.pid"

    def _start_controller_and_nodes(self) -> None:
        self._start_daemon("slurmctld", self._as_machine(CONTROLLER, ["slurmctld", "-f", str(self.slurm_conf)]))
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation folder
        for node in self.node_names():
            self._start_daemon(f"slurmd-{node}", self._as_machine(
                node, ["slurmd", "-f", str(self.slurm_conf), "-N", node]))
            self._start_daemon(f"sshd-{node}", self._as_machine(
                node, ["/usr/sbin/sshd", "-f", str(self.paths.ssh_dir / "sshd_config"),
                       "-o", f"ListenAddress={self.address(node)}",
                       "-o", f"PidFile={self.paths.pid_file(f'sshd-{node}')}",
                       "-E", str(self.paths.log_dir / f"sshd-{node}.log")]))

    def _node_daemons(self) -> dict[str, Path]:
        return {f"{daemon}-{node}": self.paths.pid_file(f"{daemon}-{node}")
                for node in self.node_names() for daemon in ("slurmd", "sshd")}

    def _after_stop(self) -> None:
        """End what still runs in the namespaces (job steps, tasks, ssh sessions), then remove them."""
        for host in [*self.node_names(), CONTROLLER]:
            for pid in self.processes(host):
                logger.info("killing pid %d left in %s", pid, host)
                os.kill(pid, signal.SIGKILL)
            _wait_for(f"the processes of {host} to end", lambda: not self.processes(host), 30)
            if self.namespace_path(host).exists():
                _run(["ip", "netns", "delete", self.namespace(host)])
        self.paths.nodes_file.unlink(missing_ok=True)


def cluster_for(nodes: int, state_dir: Path | None = None, as_recorded: bool = False) -> SlurmCluster:
    """The one-node cluster (``nodes`` 1) or the multi-node one, in ``state_dir`` or the default
    folder of that layout.

    Args:
        nodes: 1, or the number of nodes of the multi-node cluster.
        state_dir: its state folder (default: the layout's).
        as_recorded: take the node count that the running cluster's ``start`` recorded instead of
            ``nodes`` (so that ``stop`` and ``status`` need not repeat it).
    """
    if nodes == 1:
        return OneNodeCluster(ClusterPaths((state_dir or DEFAULT_STATE_DIR).resolve()))
    paths = ClusterPaths((state_dir or DEFAULT_NODES_STATE_DIR).resolve())
    return NamespaceCluster.running(paths, nodes) if as_recorded else NamespaceCluster(paths, nodes)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # exec's command follows "--"; kept apart so that its own options are not taken for ours.
    split = argv.index("--") if "--" in argv else len(argv)
    argv, command = argv[:split], argv[split + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("start", "stop", "status", "exec"))
    parser.add_argument("--nodes", type=int, default=1,
                        help="1 (default): this host is the only node; N >= 2: N nodes in network namespaces")
    parser.add_argument("--force", action="store_true",
                        help="stop: also a cluster that another checkout started")
    parser.add_argument("--state-dir", type=Path,
                        help=f"folder for spool, logs, pid files and the database (default "
                             f"{DEFAULT_STATE_DIR}, or {DEFAULT_NODES_STATE_DIR} for several nodes)")
    parser.add_argument("--on", metavar="NODE", help="exec: run on this node instead of the login node")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s slurm_cluster: %(message)s")
    if args.nodes < 1:
        parser.error(f"--nodes must be at least 1, got {args.nodes}")
    cluster = cluster_for(args.nodes, args.state_dir, as_recorded=args.action != "start")
    try:
        if args.action == "start":
            started = time.monotonic()
            cluster.start()
            print(f"SLURM cluster ready in {time.monotonic() - started:.1f} s; logs in {cluster.paths.log_dir}")
        elif args.action == "stop":
            cluster.stop(force=args.force)
        elif args.action == "exec":
            if not isinstance(cluster, NamespaceCluster) or not command:
                parser.error("exec needs --nodes N (N >= 2) and a command after --")
            where = cluster.node_command(args.on, command, Path.cwd()) if args.on else cluster.command(command)
            return subprocess.run(where, env=cluster.env()).returncode
        else:
            daemons = cluster.status()
            for daemon, running in daemons.items():
                print(f"{daemon:10s} {'running' if running else 'stopped'}")
            print(f"started by {cluster.owner() or 'unknown'}")
            if not all(daemons.values()):
                return 3
            print(cluster.run(["sinfo"], check=False).stdout, end="")
    except ClusterError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
