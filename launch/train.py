#!/usr/bin/env python
"""Train from a recipe; the same command line under every launcher:

    python launch/train.py configs/demo.yaml                                 # one process
    torchrun --nproc_per_node 8 launch/train.py configs/in1k_tiny.yaml       # one box
    deepspeed --num_gpus 8 launch/train.py configs/in1k_tiny.yaml            # (--hostfile for more)
    srun --ntasks-per-node 8 python launch/train.py configs/in21k_base.yaml  # SLURM step

Overrides follow the recipe as ``section.key=value`` (``optim.lr=1e-3 train.resume=none``);
``--help-config`` lists every key with its help text.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

_SIGNALS_BEFORE_IMPORTS: list[tuple[int, float]] = []
"""Stop signals that came while torch and DeepSpeed were importing (seconds): kept, not fatal, and
handed to run_training's StopRequest, which stops after the first step."""


def _keep_stop_signal(signum: int, frame: object) -> None:
    _SIGNALS_BEFORE_IMPORTS.append((signum, time.monotonic()))


if __name__ == "__main__":  # before the heavy imports; anchorformer.dist.stop_signals takes over
    for _stop_signal in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(_stop_signal, _keep_stop_signal)

_CHECKOUT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(_CHECKOUT))
# DeepSpeed's JIT-built ops (e.g. the CPU shared-memory all-reduce) are cached per checkout, so two
# checkouts on one machine never wait on each other's build lock (a set TORCH_EXTENSIONS_DIR wins).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(_CHECKOUT / ".cache" / "torch_extensions"))

from anchorformer import config  # noqa: E402
from anchorformer.dist import detect, uses_cuda  # noqa: E402
from anchorformer.dist.stop_signals import STOP_SIGNALS, StopRequest  # noqa: E402
from anchorformer.engine import run_training  # noqa: E402
from anchorformer.engine.preflight import check_run  # noqa: E402
from anchorformer.engine.run_lock import RunFolderInUse  # noqa: E402
from anchorformer.run_folder import RunFolder  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="recipe YAML, e.g. configs/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    parser.add_argument("--help-config", action="store_true", help="list every config key and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)  # passed by the deepspeed launcher; read by dist.detect
    args = parser.parse_args(argv)
    # From here to the exit a stop signal only asks the trainer to checkpoint at its next step.
    stop = StopRequest(STOP_SIGNALS, received=_SIGNALS_BEFORE_IMPORTS).install()
    if args.help_config:
        print("\n".join(config.describe()))
        return 0
    if args.config is None:
        parser.error("a recipe YAML is required (e.g. configs/demo.yaml)")

    env = None
    try:
        cfg = config.load(args.config, args.overrides)
        env = detect(cuda_available=uses_cuda(cfg.train.device))
        plan = check_run(cfg, env.world_size)  # before any work: no process group, run folder or model yet
    except ValueError as err:  # ConfigError included: a bad recipe, override, input or launcher variable
        if env is None or env.local_rank == 0:  # one line per node, not one per rank
            print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if env.rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {env.rank}] %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        result = run_training(cfg, env=env, stop=stop, plan=plan)
    except RunFolderInUse as err:  # another live run holds the run folder: refused before any work
        if env.local_rank == 0:
            print(f"error: {err}", file=sys.stderr)
        return 2
    if env.rank == 0:
        folder = RunFolder.of(cfg)
        metrics = result.metrics
        if "eval/top1" in metrics:
            evaluation = f", validation top-1 {metrics['eval/top1']:.2f}%" + (
                f" (EMA {metrics['eval_ema/top1']:.2f}%)" if "eval_ema/top1" in metrics else "") + (
                f"; a linear classifier on the pixels: {metrics['eval/linear_baseline_top1']:.2f}%"
                if "eval/linear_baseline_top1" in metrics else "")
        else:
            evaluation = "".join(f", {k} {v:.4g}" for k, v in metrics.items() if k.startswith("eval/"))
        print(f"\n{result.status}: epoch {result.epoch}, step {result.step}{evaluation}")
        print(f"run folder:  {folder.root}  (config.yaml, summary.json, checkpoints/)")
        print(f"TensorBoard: tensorboard --logdir {folder.tensorboard}, then open "
              "http://localhost:6006/#custom_scalars (the run at a glance; docs/tensorboard.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
