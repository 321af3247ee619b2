"""Shared fixtures (kept minimal and generic)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest


@pytest.fixture(scope="session")
def embedded_cache_dir(tmp_path_factory) -> Path:
    """One cache folder for the embedded digits shards, built on first use and shared by the
    session's tests (``data.cache_dir`` / ``prepare_embedded_dataset(cache_dir)``)."""
    return tmp_path_factory.mktemp("embedded_cache")


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[None]:
    """A real single-node SLURM with accounting (tests/slurm_cluster.py; starting one that already
    runs is a no-op), stopped at the end of the session."""
    script = [sys.executable, str(Path(__file__).with_name("slurm_cluster.py"))]
    started = subprocess.run([*script, "start"], capture_output=True, text=True, timeout=1800)
    assert started.returncode == 0, f"cannot start SLURM:\n{started.stdout[-2000:]}{started.stderr[-3000:]}"
    yield
    subprocess.run([*script, "stop"], capture_output=True, text=True, timeout=300)
