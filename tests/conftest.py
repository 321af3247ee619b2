"""Shared fixtures (kept minimal and generic)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

# DeepSpeed's JIT-built ops (the CPU shared-memory all-reduce) are cached per checkout, for this
# process and every subprocess and SLURM job of the tests: another checkout's build lock never stalls us.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions"))


@pytest.fixture(scope="session")
def embedded_cache_dir(tmp_path_factory) -> Path:
    """One cache folder for the embedded digits shards, built on first use and shared by the
    session's tests (``data.cache_dir`` / ``prepare_embedded_dataset(cache_dir)``)."""
    return tmp_path_factory.mktemp("embedded_cache")


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[None]:
    """A real single-node SLURM with accounting (tests/slurm_cluster.py; starting one that already
    runs is a no-op), stopped at the end of the session if the session started it."""
    script = [sys.executable, str(Path(__file__).with_name("slurm_cluster.py"))]
    was_running = subprocess.run([*script, "status"], capture_output=True, timeout=60).returncode == 0
    started = subprocess.run([*script, "start"], capture_output=True, text=True, timeout=1800)
    assert started.returncode == 0, f"cannot start SLURM:\n{started.stdout[-2000:]}{started.stderr[-3000:]}"
    yield
    if not was_running:
        subprocess.run([*script, "stop"], capture_output=True, text=True, timeout=300)
