"""Shared fixtures (kept minimal and generic)."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
from slurm_cluster import DEFAULT_NODES_STATE_DIR, DEFAULT_STATE_DIR, ClusterPaths, NamespaceCluster, OneNodeCluster
from slurm_fixtures import restore_nodes

# DeepSpeed's JIT-built ops (the CPU shared-memory all-reduce) are cached per checkout, for this
# process and every subprocess and SLURM job of the tests: another checkout's build lock never stalls us.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions"))


@pytest.fixture(scope="session")
def embedded_cache_dir(tmp_path_factory) -> Path:
    """One cache folder for the embedded digits shards, built on first use and shared by the
    session's tests (``data.cache_dir`` / ``prepare_embedded_dataset(cache_dir)``)."""
    return tmp_path_factory.mktemp("embedded_cache")


@contextlib.contextmanager
def _running_cluster(*options: str) -> Iterator[None]:
    """The tests/slurm_cluster.py cluster that ``options`` select, started (a no-op if it runs
    already) and stopped at the end if this session started it."""
    script = [sys.executable, str(Path(__file__).with_name("slurm_cluster.py"))]
    was_running = subprocess.run([*script, "status", *options], capture_output=True, timeout=60).returncode == 0
    started = subprocess.run([*script, "start", *options], capture_output=True, text=True, timeout=1800)
    assert started.returncode == 0, f"cannot start SLURM:\n{started.stdout[-2000:]}{started.stderr[-3000:]}"
    yield
    if not was_running:
        subprocess.run([*script, "stop", *options], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[OneNodeCluster]:
    """A real single-node SLURM with accounting (tests/slurm_cluster.py; starting one that already
    runs is a no-op), stopped at the end of the session if the session started it; run its clients
    with ``cluster.run`` (tests/slurm_fixtures.py takes it)."""
    with _running_cluster():
        yield OneNodeCluster(ClusterPaths(DEFAULT_STATE_DIR))


@pytest.fixture(scope="session")
def multinode_cluster() -> Iterator[NamespaceCluster]:
    """A real SLURM of 3 nodes with accounting, each node a network namespace with its own host
    name, address, slurmd and sshd (``tests/slurm_cluster.py start --nodes 3``); run its commands
    with ``cluster.run`` / ``cluster.command`` (the login node) or ``cluster.node_command``."""
    with _running_cluster("--nodes", "3"):
        yield NamespaceCluster(ClusterPaths(DEFAULT_NODES_STATE_DIR), 3)


@pytest.fixture
def nodes_back(multinode_cluster: NamespaceCluster) -> Iterator[None]:
    """After the test, every node of the multi-node cluster usable again: one SLURM left down or
    drained is resumed (so that the next tests can run) and fails this test with its reason."""
    yield
    lost = restore_nodes(multinode_cluster)
    assert not lost, f"the test left nodes unusable (now resumed): {lost}"


@pytest.fixture(scope="session")
def deepspeed_ops_built() -> None:
    """DeepSpeed's CPU communication op, JIT-built into this checkout's TORCH_EXTENSIONS_DIR once
    (about 70 s the first time), so that no test's ranks or nodes wait for the build."""
    build = "from deepspeed.accelerator import get_accelerator; " \
            "get_accelerator().create_op_builder('ShareMemCommBuilder').load()"
    done = subprocess.run([sys.executable, "-c", build], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert done.returncode == 0, f"cannot build DeepSpeed's CPU op:\n{done.stderr[-3000:]}"
