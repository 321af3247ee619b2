"""Where a run writes: the folder named by the ``logging`` section."""
from __future__ import annotations

from pathlib import Path

from anchorformer.config.schema import RootConfig

__all__ = ["run_directory"]


def run_directory(cfg: RootConfig) -> Path:
    """The run folder: ``{logging.output_dir}/{logging.run_name}`` (``run`` when unnamed)."""
    return Path(cfg.logging.output_dir) / (cfg.logging.run_name or "run")
