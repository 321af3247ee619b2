#!/usr/bin/env python
"""Print the run folder of a recipe and its overrides, resolved as launch/train.py resolves it.

The sbatch templates call it to find ``summary.json`` after training:

    python slurm/run_dir.py configs/in21k_base.yaml [section.key=value ...]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from anchorformer.config import ConfigError, load, run_directory  # noqa: E402


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python slurm/run_dir.py RECIPE [section.key=value ...]", file=sys.stderr)
        return 2
    try:
        cfg = load(argv[0], argv[1:])
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(run_directory(cfg).absolute())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
