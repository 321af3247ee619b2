"""Start or stop a real single-node SLURM cluster, with job accounting, on this machine.

Used by the SLURM tests (tests/test_submit.py) and for trying ``launch/submit.py`` locally:

    python tests/slurm_cluster.py start [--state-dir DIR]   # installs what is missing, starts it
    python tests/slurm_cluster.py status [--state-dir DIR]  # which daemons run, sinfo
    python tests/slurm_cluster.py stop [--state-dir DIR]    # stops it, if this checkout started it

It needs root and a Debian-like system. What ``start`` does, in order (each step is skipped when
already done, so running it again is harmless):

1. ``apt-get install slurm-wlm munge mariadb-server slurmdbd`` when a program is missing.
2. Writes ``/etc/slurm/slurm.conf`` and ``/etc/slurm/slurmdbd.conf`` for ``hostname -s`` with
   this machine's CPUs and memory (no GPUs), process tracking through /proc and no task plugin,
   so neither cgroups nor systemd are needed. A config it did not write is never overwritten.
3. Starts munged (as user munge), a private MariaDB server (data, socket and logs in the state
   folder, TCP on 127.0.0.1 only), creates the accounting database and its user, starts
   slurmdbd, registers the cluster with sacctmgr, starts slurmctld and slurmd.
4. Waits until ``sinfo`` shows the node idle and ``sacct`` answers.

Everything the cluster writes (spool, logs, pid files, database) lives under the state folder,
``/var/tmp/anchorformer-slurm`` by default. Delete it after ``stop`` for a fresh cluster.

Several checkouts on one machine share that one cluster. ``start`` records which checkout started
the daemons (``owner`` in the state folder); ``stop`` stops them only for that checkout (``--force``
for any), so one checkout's ``make slurm-down`` or test session does not pull the cluster from
under another's jobs. ``status`` exits 0 when every daemon runs, 3 otherwise.
"""
from __future__ import annotations

import argparse
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path("/var/tmp/anchorformer-slurm")
SLURM_CONF = Path("/etc/slurm/slurm.conf")
SLURMDBD_CONF = Path("/etc/slurm/slurmdbd.conf")
CLUSTER_NAME = "anchorformer"
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
# munged checks these modes: its socket folder must be traversable by clients, the rest private.
MUNGE_DIRS = {Path("/run/munge"): 0o755, Path("/var/log/munge"): 0o700, Path("/var/lib/munge"): 0o700}
MUNGE_PID_FILE = Path("/run/munge/munged.pid")
CHECKOUT = Path(__file__).resolve().parents[1]
"""The checkout this script belongs to: the owner it records when it starts the cluster."""


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
    def owner_file(self) -> Path:
        """Names the checkout whose ``start`` started the daemons."""
        return self.root / "owner"

    def pid_file(self, daemon: str) -> Path:
        """Pid file of ``daemon`` (slurmctld, slurmd, slurmdbd or mariadbd)."""
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


def _read_pid(pid_file: Path) -> int | None:
    """The pid in ``pid_file`` if that process is alive, else None."""
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # A daemon that exited but is not reaped yet (state Z) is gone for our purposes.
    return None if stat.rsplit(")", 1)[-1].split()[0] == "Z" else pid


def _stop_pid_file(name: str, pid_file: Path, timeout: float = 30) -> None:
    """SIGTERM the process named in ``pid_file`` and wait until it is gone (SIGKILL at timeout)."""
    pid = _read_pid(pid_file)
    if pid is None:
        logger.info("%s is not running", name)
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _read_pid(pid_file) == pid:
        time.sleep(0.2)
    if _read_pid(pid_file) == pid:
        logger.warning("%s (pid %d) ignored SIGTERM for %.0f s; killing it", name, pid, timeout)
        os.kill(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)
    logger.info("stopped %s (pid %d)", name, pid)


# --------------------------------------------------------------------------------------------
# Installation and configuration


def install_if_missing() -> None:
    """apt-get install the SLURM, munge and MariaDB packages when one of their programs is missing."""
    missing = [p for p in REQUIRED_PROGRAMS if shutil.which(p) is None]
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise ClusterError(f"missing programs {missing} and no apt-get to install them; install "
                           f"the packages {' '.join(APT_PACKAGES)} by hand")
    logger.info("installing %s (missing: %s)", " ".join(APT_PACKAGES), ", ".join(missing))
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run(["apt-get", "update", "-q"], timeout=600, env=env)
    _run(["apt-get", "install", "-y", "-q", *APT_PACKAGES], timeout=1200, env=env)
    still_missing = [p for p in REQUIRED_PROGRAMS if shutil.which(p) is None]
    if still_missing:
        raise ClusterError(f"after installing {APT_PACKAGES}, still missing: {still_missing}")


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
    return f"""{CONFIG_MARKER}; state in {paths.root}
ClusterName={CLUSTER_NAME}
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={paths.ctld_spool}
SlurmdSpoolDir={paths.slurmd_spool}
SlurmctldPidFile={paths.pid_file('slurmctld')}
SlurmdPidFile={paths.pid_file('slurmd')}
SlurmctldLogFile={paths.log_dir / 'slurmctld.log'}
SlurmdLogFile={paths.log_dir / 'slurmd.log'}
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
AccountingStorageHost=localhost
JobCompType=jobcomp/none
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mib} State=UNKNOWN
PartitionName={PARTITION_NAME} Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def render_slurmdbd_conf(paths: ClusterPaths, db_password: str) -> str:
    """The slurmdbd.conf text: slurmdbd on localhost, storing into the private MariaDB server."""
    return f"""{CONFIG_MARKER}; state in {paths.root}
AuthType=auth/munge
DbdHost=localhost
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


def write_configs(paths: ClusterPaths) -> None:
    """Create the state folders and write slurm.conf and slurmdbd.conf for this host."""
    for folder in (paths.log_dir, paths.run_dir, paths.ctld_spool, paths.slurmd_spool):
        folder.mkdir(parents=True, exist_ok=True)
    cpus, memory_mib = _node_resources()
    host = socket.gethostname().split(".")[0]
    _write_config(SLURM_CONF, render_slurm_conf(paths, host, cpus, memory_mib), 0o644)
    # slurmdbd refuses a config readable by others (it holds the database password).
    _write_config(SLURMDBD_CONF, render_slurmdbd_conf(paths, _db_password(paths)), 0o600)


# --------------------------------------------------------------------------------------------
# Daemons


def _munge_works() -> bool:
    encoded = subprocess.run(["munge", "-n"], capture_output=True)
    if encoded.returncode != 0:
        return False
    return subprocess.run(["unmunge"], input=encoded.stdout, capture_output=True).returncode == 0


def start_munge() -> None:
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


def _mariadb_answers(paths: ClusterPaths) -> bool:
    return subprocess.run(["mariadb-admin", f"--socket={paths.db_socket}", "--user=root", "ping"],
                          capture_output=True).returncode == 0


def start_mariadb(paths: ClusterPaths) -> None:
    """Start the private MariaDB server (initialising its data folder once) and create the
    accounting database and user."""
    if not _mariadb_answers(paths):
        if not (paths.db_dir / "mysql").is_dir():
            logger.info("initialising MariaDB data in %s", paths.db_dir)
            _run(["mariadb-install-db", f"--datadir={paths.db_dir}", "--user=root",
                  "--auth-root-authentication-method=socket", "--skip-test-db"], timeout=300)
        log_file = paths.log_dir / "mariadb.log"
        # mariadbd does not daemonize: own session so it outlives this script.
        subprocess.Popen(
            ["mariadbd", "--no-defaults", f"--datadir={paths.db_dir}", "--user=root",
             f"--socket={paths.db_socket}", f"--pid-file={paths.pid_file('mariadbd')}",
             f"--port={DB_PORT}", "--bind-address=127.0.0.1", f"--log-error={log_file}",
             "--innodb-buffer-pool-size=64M"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        _wait_for("MariaDB", lambda: _mariadb_answers(paths), 60, log_file)
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


def _sacctmgr_answers() -> bool:
    return subprocess.run(["sacctmgr", "-n", "-P", "list", "cluster"],
                          capture_output=True).returncode == 0


def _start_slurm_daemon(paths: ClusterPaths, daemon: str) -> None:
    """Start slurmdbd, slurmctld or slurmd (each forks into the background by itself)."""
    if _read_pid(paths.pid_file(daemon)) is not None:
        return
    _run([daemon], timeout=60)
    _wait_for(f"{daemon} to write its pid file", lambda: _read_pid(paths.pid_file(daemon)) is not None,
              30, paths.log_dir / f"{daemon}.log")
    logger.info("%s is up", daemon)


def register_accounting() -> None:
    """Register the cluster, an account and root's association to it with slurmdbd (once).

    root keeps its default account; ``--account anchorformer`` is accepted too.
    """
    clusters = _run(["sacctmgr", "-n", "-P", "list", "cluster", "format=cluster"]).stdout.split()
    if CLUSTER_NAME not in clusters:
        _run(["sacctmgr", "-i", "add", "cluster", CLUSTER_NAME])
    accounts = _run(["sacctmgr", "-n", "-P", "list", "account", "format=account"]).stdout.split()
    if ACCOUNT_NAME not in accounts:
        _run(["sacctmgr", "-i", "add", "account", ACCOUNT_NAME, f"cluster={CLUSTER_NAME}",
              "description=AnchorFormer tests", "organization=anchorformer"])
    associations = _run(["sacctmgr", "-n", "-P", "list", "association",
                         "format=account,user"]).stdout.split()
    if f"{ACCOUNT_NAME}|root" not in associations:
        _run(["sacctmgr", "-i", "add", "user", "root", f"account={ACCOUNT_NAME}",
              f"cluster={CLUSTER_NAME}"])


def _node_state() -> str:
    result = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else ""


def _sacct_answers() -> bool:
    return subprocess.run(["sacct", "-n", "-X", "-a", "-S", "now-1hours"],
                          capture_output=True).returncode == 0


def wait_until_ready(paths: ClusterPaths, timeout: float = 90) -> None:
    """Wait until the node is idle (resuming it once if SLURM marked it down) and sacct answers."""
    deadline = time.monotonic() + timeout

    def node_usable() -> bool:
        state = _node_state()
        if state.startswith(("down", "drain")):
            host = socket.gethostname().split(".")[0]
            subprocess.run(["scontrol", "update", f"NodeName={host}", "State=RESUME"],
                           capture_output=True)
        return state.rstrip("*") in ("idle", "mixed", "allocated")

    _wait_for("the node to be idle in sinfo", node_usable, max(1.0, deadline - time.monotonic()),
              paths.log_dir / "slurmd.log")
    _wait_for("sacct to answer", _sacct_answers, max(1.0, deadline - time.monotonic()),
              paths.log_dir / "slurmdbd.log")


def start(paths: ClusterPaths) -> None:
    """Install (if needed), configure and start the whole cluster; return once it takes jobs.

    Args:
        paths: state folder layout.

    Raises:
        ClusterError: naming the step that failed and the log to read.
    """
    if os.geteuid() != 0:
        raise ClusterError("the local SLURM cluster needs root (it installs packages and starts "
                           "daemons); run it with sudo")
    install_if_missing()
    write_configs(paths)
    if not any(status(paths).values()):  # nothing runs: this checkout starts (and owns) the cluster
        paths.owner_file.write_text(f"{CHECKOUT}\n")
    start_munge()
    start_mariadb(paths)
    _start_slurm_daemon(paths, "slurmdbd")
    _wait_for("slurmdbd to answer sacctmgr", _sacctmgr_answers, 60, paths.log_dir / "slurmdbd.log")
    register_accounting()
    _start_slurm_daemon(paths, "slurmctld")
    _start_slurm_daemon(paths, "slurmd")
    wait_until_ready(paths)
    logger.info("SLURM cluster %r is ready (state in %s)", CLUSTER_NAME, paths.root)


def owner(paths: ClusterPaths) -> Path | None:
    """The checkout that started the running cluster (None: unknown, e.g. started by hand)."""
    try:
        return Path(paths.owner_file.read_text().strip())
    except OSError:
        return None


def stop(paths: ClusterPaths, force: bool = False) -> bool:
    """Stop slurmd, slurmctld, slurmdbd, MariaDB and munged, if this checkout started them.

    Args:
        paths: state folder layout.
        force: stop them whoever started them.

    Returns:
        Whether the daemons were stopped (False: another checkout's cluster, left running).
    """
    started_by = owner(paths)
    if started_by != CHECKOUT and not force and any(status(paths).values()):
        logger.warning("the SLURM cluster in %s was started by %s, not by this checkout (%s); leaving it "
                       "running (stop --force stops it anyway)", paths.root, started_by or "someone else",
                       CHECKOUT)
        return False
    for daemon in ("slurmd", "slurmctld", "slurmdbd", "mariadbd"):
        _stop_pid_file(daemon, paths.pid_file(daemon))
    _stop_pid_file("munged", MUNGE_PID_FILE)
    paths.owner_file.unlink(missing_ok=True)
    return True


def status(paths: ClusterPaths) -> dict[str, bool]:
    """Which daemons run: {name: alive}."""
    alive = {d: _read_pid(paths.pid_file(d)) is not None
             for d in ("mariadbd", "slurmdbd", "slurmctld", "slurmd")}
    alive["munged"] = _read_pid(MUNGE_PID_FILE) is not None
    return alive


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("start", "stop", "status"))
    parser.add_argument("--force", action="store_true",
                        help="stop: also a cluster that another checkout started")
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                        help=f"folder for spool, logs, pid files and the database "
                             f"(default {DEFAULT_STATE_DIR})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s slurm_cluster: %(message)s")
    paths = ClusterPaths(args.state_dir.resolve())
    try:
        if args.action == "start":
            started = time.monotonic()
            start(paths)
            print(f"SLURM cluster ready in {time.monotonic() - started:.1f} s; logs in {paths.log_dir}")
        elif args.action == "stop":
            stop(paths, force=args.force)
        else:
            alive = status(paths)
            for daemon, running in alive.items():
                print(f"{daemon:10s} {'running' if running else 'stopped'}")
            print(f"started by {owner(paths) or 'unknown'}")
            if not all(alive.values()):
                return 3
            print(_run(["sinfo"], check=False).stdout, end="")
    except ClusterError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
