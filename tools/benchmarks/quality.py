"""Quality at equal cost: AnchorFormer vs the DeiT of the same size, one recipe, one wall-clock budget.

Issue 7: the paper claims AnchorFormer is both cheaper and more accurate than DeiT; this measures
it on the embedded digits (``configs/demo.yaml``) at equal training wall-clock.

Protocol (identical for both models; everything else comes from the recipe):

1. Models. AnchorFormer is the recipe's ``model`` (an ``anchorformer_*`` name); DeiT is the timm
   model of the same name with ``deit_`` instead of ``anchorformer_`` and the same ``kwargs`` less
   ``num_anchors`` (same patch size, depth, width, heads, image size, classes, drop path).
2. Calibration, seed 0: ``--calibration-rounds`` rounds, the two models alternating within each;
   one round of a model is a short run of ``--calibration-steps`` optimizer steps after 3 warm-up
   steps, timed as the mean time between the ends of the timed steps (data waits and epoch
   boundaries with their loader restart included, as in real training; no evaluation or
   checkpoint inside the window). A model's s/step is its fastest round: other processes on a
   shared machine only ever slow a round down (on a 2-core CPU shared with other work, the
   median of 3 rounds put the AF/DeiT ratio 15% off the one measured over the long runs; the
   fastest rounds were within 7% of each model's s/step over its training runs).
3. Schedule. Each model gets ``--budget-s`` of training: planned steps = budget / (s/step),
   ``schedule.epochs = max(1, round(planned steps / steps per epoch))`` so the recipe's whole
   learning-rate schedule (linear warm-up + cosine) fits, and ``schedule.warmup_epochs`` keeps the
   recipe's warm-up fraction (recipe warmup_epochs / epochs).
4. Training and evaluation. One run per model and seed (``train.seed``; the models alternate
   within a seed, so a slower or faster machine phase hits both), evaluated once, at the end,
   on the validation split (top-1 of the final weights). Training wall-clock = from ``fit()``
   until the last optimizer step finished (the final evaluation and checkpoint are not in it).
5. Report per model: parameters, forward GMACs per image (FlopCounterMode on the PyTorch paths,
   a multiply-add = 1 MAC), calibrated s/step, s/step measured over all its training runs,
   epochs, steps trained (and planned), training wall-clock, top-1 mean +- sample std over seeds
   and the best seed; then AF - DeiT in top-1 (with its standard error) and whether the claim
   held in this run: cheaper = AnchorFormer's s/step measured in training is more than
   COST_TOLERANCE below DeiT's (the calibration is only a few seconds; training is the long
   measurement), more accurate = higher mean top-1.
"""
from __future__ import annotations

import argparse
import copy
import logging
import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from anchorformer import config, dist
from benchmarks.report import machine_description, markdown_table
from anchorformer.engine.trainer import FitResult, Trainer

__all__ = ["add_arguments", "run", "model_configs"]

logger = logging.getLogger(__name__)

WARMUP_STEPS = 3
"""Optimizer steps run before the calibration window (first batches, allocator, loader start)."""
COST_TOLERANCE = 0.05
"""Relative s/step difference below which the two models count as equally expensive (noise of a
shared CPU between runs is a few percent)."""
_NEVER = 10**9
"""An epoch count or interval that a run does not reach (keeps evaluation out of calibration)."""


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError(f"--seeds must name at least one integer seed, got {text!r}")
    return seeds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the ``quality`` benchmark; the defaults take about 10 minutes on 2 CPU cores."""
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="device both models train on (train.device)")
    parser.add_argument("--budget-s", type=float, default=80.0,
                        help="training wall-clock of each run in seconds, the same for both models")
    parser.add_argument("--seeds", type=_seeds, default=[0, 1, 2],
                        help="train.seed of the runs, comma-separated; each model trains once per seed")
    parser.add_argument("--recipe", type=Path, default=Path("configs/demo.yaml"),
                        help="recipe of both models; its model must be an anchorformer_* model")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override for both models, e.g. data.cache_dir=/tmp/digits (repeatable)")
    parser.add_argument("--calibration-steps", type=int, default=30,
                        help="timed optimizer steps of one calibration round (30: a bit more than an epoch "
                             "of the demo, so a loader restart is in it)")
    parser.add_argument("--calibration-rounds", type=int, default=3,
                        help="calibration rounds per model (models alternate); s/step = the fastest round")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads during the runs (CPU only; the data worker is separate)")
    parser.add_argument("--section", default=None,
                        help="name of the docs/benchmarks.md section (default: quality-DEVICE)")


def model_configs(recipe: Path, overrides: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """The recipe as plain dicts for both models: ``{"AnchorFormer": ..., "DeiT": ...}``.

    Raises:
        ValueError: when the recipe is missing or its model is not an ``anchorformer_*`` model.
    """
    if not Path(recipe).is_file():
        raise ValueError(f"--recipe {str(recipe)!r} does not exist; e.g. configs/demo.yaml")
    anchor = config.to_dict(config.load(recipe, list(overrides)))
    name = anchor["model"]["name"]
    if not name.startswith("anchorformer_"):
        raise ValueError(f"--recipe {recipe} trains model.name={name!r}; the quality benchmark needs an "
                         f"anchorformer_* model (its DeiT twin is the deit_* model of the same size)")
    deit = copy.deepcopy(anchor)
    deit["model"]["name"] = "deit_" + name[len("anchorformer_"):]
    deit["model"]["kwargs"] = {k: v for k, v in anchor["model"]["kwargs"].items() if k != "num_anchors"}
    return {"AnchorFormer": anchor, "DeiT": deit}


def _merged(base: dict[str, Any], **sections: dict[str, Any]) -> dict[str, Any]:
    """``base`` with some keys of some sections replaced (``base`` is left as it is)."""
    return {**base, **{section: {**base[section], **values} for section, values in sections.items()}}


def _with(base: dict[str, Any], **sections: dict[str, Any]) -> config.RootConfig:
    """The validated config of ``base`` with some keys of some sections replaced."""
    return config.from_dict(_merged(base, **sections))


def _finished_now() -> float:
    """``time.perf_counter()`` once the device is done (a step's kernels are queued, not done,
    when it returns)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


@dataclass
class _Run:
    result: FitResult
    params: int
    steps_per_epoch: int
    start: float
    step_ends: list[float]

    @property
    def train_s(self) -> float:
        """From fit() until the last optimizer step finished."""
        return self.step_ends[-1] - self.start

    def seconds_per_step(self, skip: int) -> float:
        """Mean time between the ends of the steps after the first ``skip``."""
        ends = self.step_ends[skip - 1:] if skip else [self.start, *self.step_ends]
        assert len(ends) >= 2, f"need a timed step after {skip} warm-up steps, ran {len(self.step_ends)}"
        return (ends[-1] - ends[0]) / (len(ends) - 1)


def _fit(cfg: config.RootConfig) -> _Run:
    """Train ``cfg`` in this process as a single rank (whatever launcher started it)."""
    env = dist.detect(environ={}, argv=[], cuda_available=cfg.train.device == "cuda")
    dist.init(env)
    trainer: Optional[Trainer] = None
    try:
        trainer = Trainer(cfg, env)
        step_ends: list[float] = []
        trainer.add_step_callback(lambda _trainer, _info: step_ends.append(_finished_now()))
        start = time.perf_counter()
        result = trainer.fit()
        return _Run(result, trainer.signature["num_params"], trainer.steps_per_epoch, start, step_ends)
    finally:
        if trainer is not None:
            trainer.close()
        dist.shutdown()


@dataclass
class _Calibration:
    rounds: list[_Run]
    """One short run per round, in order."""

    @property
    def seconds_per_step(self) -> float:
        """The fastest round's mean s/step (interference only adds time)."""
        return min(r.seconds_per_step(WARMUP_STEPS) for r in self.rounds)

    @property
    def steps_per_epoch(self) -> int:
        return self.rounds[0].steps_per_epoch

    @property
    def params(self) -> int:
        return self.rounds[0].params

    @property
    def macs(self) -> float:
        """Forward multiply-adds per image (FlopCounterMode counts 2 FLOPs each)."""
        return self.rounds[0].result.metrics["run/flops_per_sample"] / 2

    def round_range(self) -> str:
        """The lowest and highest round, for the table."""
        times = [r.seconds_per_step(WARMUP_STEPS) for r in self.rounds]
        return f"{min(times):.4f}-{max(times):.4f}"

    def budget_epochs(self, budget_s: float) -> tuple[int, float]:
        """(epochs, planned steps) of a run that fits ``budget_s`` at this s/step."""
        planned = budget_s / self.seconds_per_step
        return max(1, round(planned / self.steps_per_epoch)), planned


def _calibrate(bases: dict[str, dict[str, Any]], steps: int, rounds: int) -> dict[str, _Calibration]:
    """Alternate short runs of WARMUP_STEPS + ``steps`` steps (no evaluation or checkpoint before
    their end) of every model for ``rounds`` rounds."""
    runs: dict[str, list[_Run]] = {name: [] for name in bases}
    for index in range(rounds):
        for name, base in bases.items():
            cfg = _with(base, schedule={"epochs": _NEVER},
                        train={"seed": 0, "max_steps": WARMUP_STEPS + steps, "eval_every_epochs": _NEVER},
                        logging={"run_name": f"{name}-calibration{index}"})
            runs[name].append(_fit(cfg))
            logger.info("quality: %s calibration round %d: %.4f s/step", name, index,
                        runs[name][-1].seconds_per_step(WARMUP_STEPS))
    return {name: _Calibration(model_runs) for name, model_runs in runs.items()}


def _train_within_budget(name: str, base: dict[str, Any], seed: int, epochs: int) -> _Run:
    """One run of ``epochs`` epochs with the recipe's schedule shape and one final evaluation."""
    recipe = base["schedule"]
    warmup = recipe["warmup_epochs"] * epochs / recipe["epochs"]  # the recipe's warm-up fraction
    cfg = _with(base, schedule={"epochs": epochs, "warmup_epochs": warmup},
                train={"seed": seed, "eval_every_epochs": epochs},
                logging={"run_name": f"{name}-seed{seed}"})
    result = _fit(cfg)
    logger.info("quality: %s seed %d: top-1 %.2f after %d steps in %.1f s", name, seed,
                result.result.metrics["eval/top1"], result.result.step, result.train_s)
    return result


def _check(args: argparse.Namespace) -> None:
    if not (args.budget_s > 0 and math.isfinite(args.budget_s)):
        raise ValueError(f"--budget-s must be a positive number of seconds, got {args.budget_s}")
    if not args.seeds or not all(isinstance(seed, int) for seed in args.seeds):
        raise ValueError(f"--seeds must be a non-empty list of integers, got {args.seeds!r}")
    if args.calibration_steps < 1 or args.calibration_rounds < 1:
        raise ValueError(f"--calibration-steps and --calibration-rounds must be >= 1, got "
                         f"{args.calibration_steps} and {args.calibration_rounds}")
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is visible; use --device cpu")


def run(args: argparse.Namespace) -> str:
    """Calibrate, train both models for every seed within the budget, return the markdown section."""
    _check(args)
    bases = model_configs(args.recipe, args.overrides)
    device = torch.device(args.device)
    threads_before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    try:
        machine = machine_description(device)  # names the threads the runs use
        with tempfile.TemporaryDirectory(prefix="quality-") as out:
            # The only evaluation and checkpoint of a run come after its last step.
            bases = {name: _merged(base, train={"device": args.device, "max_steps": 0, "resume": "none"},
                                   checkpoint={"every_steps": 0, "at_epoch_end": False, "keep_last": 1},
                                   logging={"output_dir": out, "progress_bar": False, "tensorboard": False})
                     for name, base in bases.items()}
            calibration = _calibrate(bases, args.calibration_steps, args.calibration_rounds)
            plans = {name: cal.budget_epochs(args.budget_s) for name, cal in calibration.items()}
            runs: dict[str, list[_Run]] = {name: [] for name in bases}
            for seed in args.seeds:  # models alternate: a slower phase of the machine hits both
                for name, base in bases.items():
                    logger.info("quality: %s seed %d, %d epochs (%.0f steps planned for %g s)",
                                name, seed, plans[name][0], plans[name][1], args.budget_s)
                    runs[name].append(_train_within_budget(name, base, seed, plans[name][0]))
    finally:
        torch.set_num_threads(threads_before)
    return _section(args, machine, bases, calibration, plans, runs, time.perf_counter() - started)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _section(args: argparse.Namespace, machine: str, bases: dict[str, dict[str, Any]],
             calibration: dict[str, _Calibration], plans: dict[str, tuple[int, float]], runs: dict[str, list[_Run]],
             total_s: float) -> str:
    stats, rows = {}, []
    for name, model_runs in runs.items():
        cal, (epochs, planned) = calibration[name], plans[name]
        top1 = [r.result.metrics["eval/top1"] for r in model_runs]
        train_s = [r.train_s for r in model_runs]
        mean, std = _mean_std(top1)
        trained_s_step = sum(train_s) / sum(r.result.step for r in model_runs)
        stats[name] = {"mean": mean, "std": std, "n": len(top1), "s_step": trained_s_step, "macs": cal.macs}
        rows.append([
            f"{name} (`{bases[name]['model']['name']}`)", f"{cal.params / 1e6:.2f}",
            f"{cal.macs / 1e9:.4f}", f"{cal.seconds_per_step:.4f} ({cal.round_range()})",
            f"{trained_s_step:.4f}", epochs,
            f"{statistics.fmean(r.result.step for r in model_runs):.0f} ({planned:.0f})",
            f"{statistics.fmean(train_s):.1f} ({min(train_s):.1f}-{max(train_s):.1f})",
            f"{mean:.2f} ± {std:.2f}", f"{max(top1):.2f}", ", ".join(f"{t:.2f}" for t in top1),
        ])
    header = ["model", "params (M)", "GMACs/img", "s/step calibrated (rounds)", "s/step in training", "epochs",
              "steps trained (planned)", "train s, mean (range)", "top-1 % mean ± std", "best top-1 %", "top-1 % per seed"]
    af, deit = stats["AnchorFormer"], stats["DeiT"]
    diff = af["mean"] - deit["mean"]
    stderr = math.sqrt(af["std"] ** 2 / af["n"] + deit["std"] ** 2 / deit["n"])
    cost = af["s_step"] / deit["s_step"]
    cheaper, better = cost < 1 - COST_TOLERANCE, diff > 0
    cheaper_text = "yes" if cheaper else (f"no (within {COST_TOLERANCE:.0%}: the same cost)"
                                          if cost <= 1 + COST_TOLERANCE else "no")
    noise = f"{abs(diff) / stderr:.1f} standard errors" if stderr > 0 else "one seed: no spread to compare with"
    verdict = (
        f"**AF − DeiT top-1: {diff:+.2f} points** ({noise}); AnchorFormer's training step took "
        f"{cost:.2f}x DeiT's (measured over all runs) for {af['macs'] / deit['macs']:.2f}x its MACs. "
        f"The paper's claim (cheaper and more accurate) **{'held' if cheaper and better else 'did not hold'}** "
        f"in this run: cheaper {cheaper_text}, more accurate {'yes' if better else 'no'}.")
    base = bases["AnchorFormer"]
    m = base["model"]
    tokens = (m["img_size"] // m["kwargs"].get("patch_size", 16)) ** 2 + 1
    overrides = f" with {' '.join(f'`{o}`' for o in args.overrides)}" if args.overrides else ""
    return "\n".join([
        f"## Quality at equal cost: AnchorFormer vs DeiT, {args.budget_s:g} s of training each ({args.device})",
        "",
        f"Device: {machine}. Recipe `{args.recipe}`{overrides}: {m['img_size']} px, {tokens} tokens, "
        f"kwargs {m['kwargs']} (DeiT: the same without num_anchors), batch "
        f"{base['train']['global_batch_size']}, {base['train']['precision']}, {base['optim']['name']} "
        f"lr {base['optim']['lr']:g}, warm-up + cosine; seeds {', '.join(map(str, args.seeds))}.",
        "",
        f"Protocol: s/step = fastest of {args.calibration_rounds} rounds (models alternating) of the mean "
        f"of {args.calibration_steps} training steps after {WARMUP_STEPS} warm-up steps (seed 0; data "
        f"loading and epoch boundaries included, no evaluation). Each run gets "
        f"epochs = max(1, round(budget / s/step / steps per epoch)), so the recipe's whole warm-up + "
        f"cosine schedule fits the budget (warm-up keeps the recipe's fraction), then one evaluation of "
        f"the final weights on the validation split. 'train s' = wall-clock from the start of fit() to "
        f"the last optimizer step (includes the first loader start, which calibration leaves out); "
        f"'s/step in training' = all its runs' train s / steps (the cost the verdict compares); "
        f"GMACs = forward per image (FlopCounterMode). Whole benchmark: {total_s / 60:.1f} min.",
        "",
        markdown_table(header, rows),
        "",
        verdict,
    ])
