#!/usr/bin/env python
"""Print the run folder of a recipe and its overrides, resolved as launch/train.py resolves it.

The sbatch templates call it to find ``summary.json`` after training:

    python slurm/run_dir.py configs/in21k_base.yaml [section.key=value ...]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="slurm/run_dir.py", description=__doc__.split("\n\n")[0],
                                     epilog="Prints one absolute path; exit status 2 for a bad recipe or override.")
    parser.add_argument("recipe", help="recipe YAML, e.g. configs/in21k_base.yaml")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from anchorformer.config import ConfigError, load
    from anchorformer.run_folder import RunFolder

    try:
        cfg = load(args.recipe, args.overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(RunFolder.of(cfg).absolute().root)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
