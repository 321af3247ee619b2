"""Quality map at equal wall-clock: AnchorFormer with m anchors vs DeiT, over token counts.

One point of this (the embedded digits at 17 tokens, 16 anchors) had AnchorFormer-tiny 2.7 points
below DeiT-tiny at equal cost; a user cannot tell from it where anchor attention pays off. The map
measures AF - DeiT at several token counts (the recipe's image size cut into patches of
``image_size / sqrt(tokens - 1)`` px: 17, 65, 257 tokens at 16 px) and anchor counts m.

Protocol (identical for every model of a token count; everything else comes from the recipe,
``configs/quality_map.yaml`` by default):

1. Models. For each token count, AF(m) is the recipe's ``model`` (an ``anchorformer_*`` name) with
   ``num_anchors = m`` and the token count's patch size; DeiT is the timm model of the same name with
   ``deit_`` instead of ``anchorformer_`` and the same architecture less ``num_anchors`` (same patch
   size, depth, width, heads, image size, classes, drop path).
2. Calibration, seed 0: ``--calibration-rounds`` rounds, all models alternating within each; one
   round of a model is a short run of ``--calibration-steps`` optimizer steps after 3 warm-up steps,
   timed as the mean time between the ends of the timed steps (data waits and epoch boundaries
   with their loader restart included, as in real training; no evaluation or checkpoint inside the
   window). A model's s/step is its fastest round: other processes on a shared machine only ever
   slow a round down.
3. Budget. A token count's wall-clock budget is what DeiT needs for ``--deit-epochs`` epochs at its
   calibrated s/step; every model of that token count gets the same budget: planned steps =
   budget / (its s/step), ``schedule.epochs = max(1, round(planned steps / steps per epoch))`` so
   the recipe's whole learning-rate schedule (linear warm-up + cosine) fits, and
   ``schedule.warmup_epochs`` keeps the recipe's warm-up fraction. (Equal epochs of DeiT at every
   token count keep top-1 comparable across token counts; within one, the wall-clock is equal.)
4. Training and evaluation. One run per model and seed (``train.seed``; all models alternate
   within a seed, so a slower or faster machine phase hits every one), evaluated once, at the end,
   on the validation split (top-1 of the final weights). Training wall-clock = from ``fit()`` until
   the last optimizer step finished (the final evaluation and checkpoint are not in it).
5. Report, one table row per token count and model: parameters, forward GMACs per image
   (FlopCounterMode on the PyTorch paths, a multiply-add = 1 MAC), calibrated s/step, s/step
   measured over all its training runs, budget, epochs, top-1 mean +- sample std over seeds; for
   AF, AF - DeiT in top-1 with its standard error and the verdict: a win when AF is more than
   ``SIGNIFICANT`` standard errors above DeiT, a loss when that far below, a tie otherwise. And one
   PNG: top-1 against tokens, a line per m and one for DeiT (error bars: std over seeds).
"""
from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from anchorformer import config, dist
from anchorformer.atomic import atomic_output
from anchorformer.engine.trainer import FitResult, Trainer
from benchmarks.report import comma_separated, machine_description, markdown_table
from benchmarks.results import record

__all__ = ["Cell", "TimedRun", "add_arguments", "fit_timed", "run", "model_configs", "patch_size"]

logger = logging.getLogger(__name__)

WARMUP_STEPS = 3
"""Optimizer steps run before the calibration window (first batches, allocator, loader start)."""
SIGNIFICANT = 2.0
"""Standard errors of AF - DeiT beyond which a cell is a win or a loss (about 95 % two-sided)."""
_NEVER = 10**9
"""An epoch count or interval that a run does not reach (keeps evaluation out of calibration)."""


@dataclass(frozen=True, order=True)
class Cell:
    """One model of the map: a token count and AnchorFormer's anchors (``None``: the DeiT)."""
    tokens: int
    anchors: Optional[int]

    @property
    def label(self) -> str:
        return "DeiT" if self.anchors is None else f"AF m={self.anchors}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the ``quality`` benchmark; the defaults take about 40 minutes on 2 CPU cores."""
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="device every model trains on (train.device)")
    parser.add_argument("--tokens", type=comma_separated(int), default=[17, 65, 257],
                        help="token counts, comma-separated; each is a square grid of patches + the class "
                             "token, the grid dividing the recipe's image size (16 px: 17, 65, 257)")
    parser.add_argument("--anchors", type=comma_separated(int), default=[4, 8, 16, 32],
                        help="AnchorFormer's anchors per layer m, comma-separated; each at every token count")
    parser.add_argument("--deit-epochs", type=float, default=5.0,
                        help="a token count's wall-clock budget: the time DeiT takes for this many epochs")
    parser.add_argument("--seeds", type=comma_separated(int), default=[0, 1, 2],
                        help="train.seed of the runs, comma-separated; each model trains once per seed")
    parser.add_argument("--recipe", type=Path, default=Path("configs/quality_map.yaml"),
                        help="recipe of every model; its model must be an anchorformer_* model")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override for every model, e.g. data.cache_dir=/tmp/digits (repeatable)")
    parser.add_argument("--calibration-steps", type=int, default=20,
                        help="timed optimizer steps of one calibration round")
    parser.add_argument("--calibration-rounds", type=int, default=2,
                        help="calibration rounds per model (models alternate); s/step = the fastest round")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads during the runs (CPU only; the data worker is separate)")
    parser.add_argument("--plot", type=Path, default=None,
                        help="PNG of top-1 against tokens (default: with --write-docs, quality-DEVICE.png beside "
                             "--doc, the image the docs section shows; without it, none)")
    parser.add_argument("--section", default=None,
                        help="name of the docs/benchmarks.md section (default: quality-DEVICE)")


def patch_size(image_size: int, tokens: int) -> int:
    """The patch size that cuts ``image_size`` px into ``tokens - 1`` patches (a square grid).

    Raises:
        ValueError: when ``tokens - 1`` is no square grid that divides the image.
    """
    grid = math.isqrt(max(tokens - 1, 0))
    if tokens < 2 or grid * grid != tokens - 1 or image_size % grid:
        raise ValueError(f"--tokens {tokens}: tokens - 1 must be a square grid of patches dividing the "
                         f"{image_size} px image (e.g. {', '.join(str(g * g + 1) for g in (2, 4, 8, 16))})")
    return image_size // grid


def model_configs(recipe: Path, overrides: Sequence[str] = (), tokens: Sequence[int] = (17,),
                  anchors: Sequence[int] = (16,)) -> dict[Cell, dict[str, Any]]:
    """The recipe as plain dicts for every model of the map, DeiT first at each token count.

    Raises:
        ValueError: when the recipe is missing, its model is not an ``anchorformer_*`` model, or a
            token or anchor count does not fit.
    """
    if not Path(recipe).is_file():
        raise ValueError(f"--recipe {str(recipe)!r} does not exist; e.g. configs/quality_map.yaml")
    anchor = config.to_dict(config.load(recipe, list(overrides)))
    name = anchor["model"]["name"]
    if not name.startswith("anchorformer_"):
        raise ValueError(f"--recipe {recipe} trains model.name={name!r}; the quality benchmark needs an "
                         f"anchorformer_* model (its DeiT twin is the deit_* model of the same size)")
    bad = [m for m in anchors if m < 1]
    if bad or not anchors or not tokens:
        raise ValueError(f"--tokens and --anchors need at least one value each, anchors >= 1; got "
                         f"--tokens {list(tokens)} --anchors {list(anchors)}")
    configs: dict[Cell, dict[str, Any]] = {}
    for count in tokens:
        patch = patch_size(anchor["model"]["img_size"], count)
        deit = copy.deepcopy(anchor)
        deit["model"].update(name="deit_" + name[len("anchorformer_"):], patch_size=patch, num_anchors=None,
                             block_init=None)
        configs[Cell(count, None)] = deit
        for m in anchors:
            model = copy.deepcopy(anchor)
            model["model"].update(patch_size=patch, num_anchors=m)
            configs[Cell(count, m)] = model
    return configs


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
class TimedRun:
    """One Trainer run as :func:`fit_timed` saw it (``time.perf_counter()`` seconds)."""
    result: FitResult
    params: int
    steps_per_epoch: int
    start: float
    """When fit() was called."""
    step_ends: list[float]
    """When each optimizer step's outcome reached the host (its step callback)."""
    evaluations: list[tuple[float, float]]
    """(start, end) of each evaluation, its logging (the anchor diagnostics among it) included."""

    @property
    def train_s(self) -> float:
        """From fit() until the last optimizer step finished."""
        return self.step_ends[-1] - self.start

    def seconds_per_step(self, skip: int) -> float:
        """Mean time between the ends of the steps after the first ``skip``."""
        ends = self.step_ends[skip - 1:] if skip else [self.start, *self.step_ends]
        assert len(ends) >= 2, f"need a timed step after {skip} warm-up steps, ran {len(self.step_ends)}"
        return (ends[-1] - ends[0]) / (len(ends) - 1)


def fit_timed(cfg: config.RootConfig) -> TimedRun:
    """Train ``cfg`` in this process as a single rank (whatever launcher started it), timing its
    steps and evaluations."""
    env = dist.detect(environ={}, argv=[], cuda_available=cfg.train.device == "cuda")
    dist.init(env)
    trainer: Optional[Trainer] = None
    try:
        trainer = Trainer(cfg, env)
        step_ends: list[float] = []
        trainer.add_step_callback(lambda _trainer, _info: step_ends.append(_finished_now()))
        evaluations: list[tuple[float, float]] = []
        evaluate = trainer.evaluate

        def timed_evaluate() -> dict[str, float]:
            began = _finished_now()
            metrics = evaluate()
            evaluations.append((began, _finished_now()))
            return metrics

        # The Trainer has no evaluation callback; fit() calls self.evaluate, so this instance's
        # attribute times every evaluation without touching the loop.
        trainer.evaluate = timed_evaluate
        start = time.perf_counter()
        result = trainer.fit()
        return TimedRun(result, trainer.run_meta.num_params, trainer.steps_per_epoch, start, step_ends, evaluations)
    finally:
        if trainer is not None:
            trainer.close()
        dist.shutdown()


@dataclass
class _Calibration:
    rounds: list[TimedRun]
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


def _calibrate(bases: dict[Cell, dict[str, Any]], steps: int, rounds: int) -> dict[Cell, _Calibration]:
    """Alternate short runs of WARMUP_STEPS + ``steps`` steps (no evaluation or checkpoint before
    their end) of every model for ``rounds`` rounds."""
    runs: dict[Cell, list[TimedRun]] = {cell: [] for cell in bases}
    for index in range(rounds):
        for cell, base in bases.items():
            cfg = _with(base, schedule={"epochs": _NEVER},
                        train={"seed": 0, "max_steps": WARMUP_STEPS + steps, "eval_every_epochs": _NEVER},
                        logging={"run_name": f"{cell.tokens}-{cell.label}-calibration{index}".replace(" ", "")})
            runs[cell].append(fit_timed(cfg))
            logger.info("quality: %d tokens %s calibration round %d: %.4f s/step", cell.tokens, cell.label, index,
                        runs[cell][-1].seconds_per_step(WARMUP_STEPS))
    return {cell: _Calibration(cell_runs) for cell, cell_runs in runs.items()}


def _train_within_budget(cell: Cell, base: dict[str, Any], seed: int, epochs: int) -> TimedRun:
    """One run of ``epochs`` epochs with the recipe's schedule shape and one final evaluation."""
    recipe = base["schedule"]
    warmup = recipe["warmup_epochs"] * epochs / recipe["epochs"]  # the recipe's warm-up fraction
    cfg = _with(base, schedule={"epochs": epochs, "warmup_epochs": warmup},
                train={"seed": seed, "eval_every_epochs": epochs},
                logging={"run_name": f"{cell.tokens}-{cell.label}-seed{seed}".replace(" ", "")})
    result = fit_timed(cfg)
    logger.info("quality: %d tokens %s seed %d: top-1 %.2f after %d steps in %.1f s", cell.tokens, cell.label,
                seed, result.result.metrics["eval/top1"], result.result.step, result.train_s)
    return result


def _check(args: argparse.Namespace) -> None:
    if not (args.deit_epochs > 0 and math.isfinite(args.deit_epochs)):
        raise ValueError(f"--deit-epochs must be a positive number of epochs, got {args.deit_epochs}")
    if not args.seeds:
        raise ValueError(f"--seeds must name at least one integer seed, got {args.seeds!r}")
    if args.calibration_steps < 1 or args.calibration_rounds < 1:
        raise ValueError(f"--calibration-steps and --calibration-rounds must be >= 1, got "
                         f"{args.calibration_steps} and {args.calibration_rounds}")
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is visible; use --device cpu")


def run(args: argparse.Namespace) -> str:
    """Calibrate, train every model of the map for every seed within its token count's budget,
    write the plot; return the markdown section."""
    _check(args)
    bases = model_configs(args.recipe, args.overrides, args.tokens, args.anchors)
    device = torch.device(args.device)
    plot = args.plot or (args.doc.parent / f"quality-{device.type}.png" if args.write_docs else None)
    threads_before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    try:
        machine = machine_description(device)  # names the threads the runs use
        with tempfile.TemporaryDirectory(prefix="quality-") as out:
            # The only evaluation and checkpoint of a run come after its last step.
            bases = {cell: _merged(base, train={"device": args.device, "max_steps": 0, "resume": "none"},
                                   checkpoint={"every_steps": 0, "at_epoch_end": False, "keep_last": 1},
                                   logging={"output_dir": out, "progress_bar": False, "tensorboard": False})
                     for cell, base in bases.items()}
            calibration = _calibrate(bases, args.calibration_steps, args.calibration_rounds)
            budgets = {cell.tokens: args.deit_epochs * cal.steps_per_epoch * cal.seconds_per_step
                       for cell, cal in calibration.items() if cell.anchors is None}
            plans = {cell: cal.budget_epochs(budgets[cell.tokens]) for cell, cal in calibration.items()}
            logger.info("quality: %d runs, %.0f s of training planned", len(bases) * len(args.seeds),
                        len(args.seeds) * sum(budgets[cell.tokens] for cell in bases))
            runs: dict[Cell, list[TimedRun]] = {cell: [] for cell in bases}
            for seed in args.seeds:  # models alternate: a slower phase of the machine hits all
                for cell, base in bases.items():
                    logger.info("quality: %d tokens %s seed %d, %d epochs (%.0f steps planned for %.0f s)",
                                cell.tokens, cell.label, seed, plans[cell][0], plans[cell][1], budgets[cell.tokens])
                    runs[cell].append(_train_within_budget(cell, base, seed, plans[cell][0]))
    finally:
        torch.set_num_threads(threads_before)
    stats = {cell: _Stats.of(runs[cell]) for cell in runs}
    if plot is not None:
        _plot(plot, stats, args.device)
    return _section(args, machine, bases, calibration, budgets, plans, stats, plot, time.perf_counter() - started)


@dataclass(frozen=True)
class _Stats:
    """One model's runs over the seeds."""
    top1: list[float]
    train_s: list[float]
    steps: list[int]

    @classmethod
    def of(cls, runs: list[TimedRun]) -> "_Stats":
        return cls([r.result.metrics["eval/top1"] for r in runs], [r.train_s for r in runs],
                   [r.result.step for r in runs])

    @property
    def mean(self) -> float:
        return statistics.fmean(self.top1)

    @property
    def std(self) -> float:
        """Sample standard deviation over the seeds (0 for one seed)."""
        return statistics.stdev(self.top1) if len(self.top1) > 1 else 0.0

    @property
    def seconds_per_step(self) -> float:
        """All runs' training wall-clock over all their steps."""
        return sum(self.train_s) / sum(self.steps)


def _versus(af: _Stats, deit: _Stats) -> tuple[float, float, str]:
    """(AF - DeiT top-1, its standard error, 'wins' / 'ties' / 'loses' / 'one seed')."""
    diff = af.mean - deit.mean
    stderr = math.sqrt(af.std ** 2 / len(af.top1) + deit.std ** 2 / len(deit.top1))
    if len(af.top1) < 2 or len(deit.top1) < 2:
        return diff, stderr, "one seed"
    if abs(diff) <= SIGNIFICANT * stderr:
        return diff, stderr, "ties"
    return diff, stderr, "wins" if diff > 0 else "loses"


def _plot(path: Path, stats: dict[Cell, _Stats], device: str) -> None:
    """Top-1 (mean, std over seeds) against tokens, one line per model, written atomically."""
    import matplotlib  # imported here: only this benchmark draws

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    tokens = sorted({cell.tokens for cell in stats})
    figure, axes = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for label in sorted({cell.label for cell in stats}, key=lambda text: (text != "DeiT", len(text), text)):
        cells = sorted(cell for cell in stats if cell.label == label)
        axes.errorbar([c.tokens for c in cells], [stats[c].mean for c in cells], yerr=[stats[c].std for c in cells],
                      marker="o", capsize=3, label=label, linestyle="--" if label == "DeiT" else "-",
                      color="black" if label == "DeiT" else None)
    axes.set_xscale("log", base=2)
    axes.set_xticks(tokens, [str(t) for t in tokens])
    axes.set_xlabel("tokens (patches + class token)")
    axes.set_ylabel("validation top-1 (%), mean ± std over seeds")
    axes.set_title(f"AnchorFormer vs DeiT at equal wall-clock, digits ({device})")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)


def _section(args: argparse.Namespace, machine: str, bases: dict[Cell, dict[str, Any]],
             calibration: dict[Cell, _Calibration], budgets: dict[int, float], plans: dict[Cell, tuple[int, float]],
             stats: dict[Cell, _Stats], plot: Optional[Path], total_s: float) -> str:
    rows, verdicts = [], {"wins": [], "ties": [], "loses": [], "one seed": []}
    for cell in bases:
        cal, stat, (epochs, planned) = calibration[cell], stats[cell], plans[cell]
        model = bases[cell]["model"]
        case = f"{cell.tokens} tokens {cell.label}"
        record(case, "top-1 % (mean over seeds)", stat.mean)
        record(case, "s/step in training", stat.seconds_per_step)
        if cell.anchors is None:
            versus = "—"
        else:
            diff, stderr, verdict = _versus(stat, stats[Cell(cell.tokens, None)])
            record(case, "AF - DeiT top-1 points", diff)
            record(case, "AF - DeiT standard error", stderr)
            versus = f"{diff:+.2f} ± {stderr:.2f} ({verdict})"
            verdicts[verdict].append(f"{cell.tokens} tokens m={cell.anchors} ({diff:+.2f} ± {stderr:.2f})")
        rows.append([
            f"{cell.tokens} (patch {model['patch_size']})", f"{cell.label} (`{model['name']}`)",
            f"{cal.params / 1e6:.3f}", f"{cal.macs / 1e9:.4f}", f"{cal.seconds_per_step:.4f} ({cal.round_range()})",
            f"{stat.seconds_per_step:.4f}", f"{budgets[cell.tokens]:.0f}", f"{epochs} ({planned:.0f} steps)",
            f"{statistics.fmean(stat.train_s):.1f}", f"{stat.mean:.2f} ± {stat.std:.2f}",
            ", ".join(f"{t:.2f}" for t in stat.top1), versus,
        ])
    header = ["tokens", "model", "params (M)", "GMACs/img", "s/step calibrated (rounds)", "s/step in training",
              "budget s", "epochs (planned)", "train s, mean", "top-1 % mean ± std", "top-1 % per seed",
              "AF − DeiT ± s.e. (verdict)"]
    base = next(iter(bases.values()))
    m = base["model"]
    summary = "; ".join(f"**{verdict}** at {', '.join(cells)}" for verdict, cells in verdicts.items() if cells)
    overrides = f" with {' '.join(f'`{o}`' for o in args.overrides)}" if args.overrides else ""
    return "\n".join([
        f"## Quality map at equal wall-clock: AnchorFormer (m anchors) vs DeiT over tokens ({args.device})",
        "",
        f"Device: {machine}. Recipe `{args.recipe}`{overrides}: {m['img_size']} px digits, depth "
        f"{m['depth']}, width {m['embed_dim']}, {m['num_heads']} heads, "
        f"batch {base['train']['global_batch_size']}, {base['train']['precision']}, {base['optim']['name']} lr "
        f"{base['optim']['lr']:g}, warm-up + cosine; tokens {', '.join(map(str, args.tokens))}; anchors m "
        f"{', '.join(map(str, args.anchors))}; seeds {', '.join(map(str, args.seeds))}.",
        "",
        f"Protocol: s/step = fastest of {args.calibration_rounds} rounds (all models alternating) of the mean "
        f"of {args.calibration_steps} training steps after {WARMUP_STEPS} warm-up steps (seed 0; data loading "
        f"and epoch boundaries included, no evaluation). Each token count's budget = the wall-clock DeiT's "
        f"calibrated s/step needs for {args.deit_epochs:g} epochs; every model of that token count gets it: "
        f"epochs = max(1, round(budget / s/step / steps per epoch)), the recipe's warm-up + cosine fitted "
        f"to them, then one evaluation of the final weights on the validation split. 's/step in training' = "
        f"all its runs' wall-clock from fit() to the last step / steps. AF − DeiT ± its standard error "
        f"(sqrt(s_AF²/n + s_DeiT²/n)): a win beyond +{SIGNIFICANT:g} s.e., a loss beyond −{SIGNIFICANT:g} s.e., "
        f"a tie between. Whole benchmark: {total_s / 60:.1f} min.",
        "",
        markdown_table(header, rows),
        "",
        f"AnchorFormer {summary}.",
        *(["", f"![top-1 against tokens, one line per m]({os.path.relpath(plot, args.doc.parent)})"] if plot else []),
    ])
