"""Shared fixtures (kept minimal and generic)."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def embedded_cache_dir(tmp_path_factory) -> Path:
    """One cache folder for the embedded digits shards, built on first use and shared by the
    session's tests (``data.cache_dir`` / ``prepare_embedded_dataset(cache_dir)``)."""
    return tmp_path_factory.mktemp("embedded_cache")
