"""diagnostics: what the anchor diagnostics cost a training run, img/s with them / without (issue 23's
target: >= 0.98 at the default intervals, CPU, demo recipe).

The recipe (``configs/demo.yaml``, shortened to ``--epochs``) trains in this process through the
Trainer twice per round: with the diagnostics as the recipe sets them (the defaults:
``logging.anchor_every_steps=100``, ``anchor_probe_images=16``, ``images_every_evals=1``,
``input_images=32``: a probe every 100 steps and at each evaluation, the maps at each evaluation,
the input grid once) and with them off (``anchor_every_steps=0``, ``images_every_evals=0``,
``input_images=0``). Both arms: the same seed and data, the anchor mix pinned to the PyTorch path
(``train.anchor_mix=torch``, as ``ANCHORFORMER_ANCHOR_MIX=torch`` would: ``auto`` could time two
close backends apart between the arms, and measures the probe's shape in one arm only), no
checkpoints inside the timed window. The arms alternate, their order swapped every round, and
each measure keeps its least time over the rounds: other jobs on a shared machine only ever add
time (20 % run to run on a loaded 2-core machine), and the least time tells a 2 % difference.

Two measures over the same training images (steps x global batch), each as img/s:

- **steps**: from ``fit()`` until the last step's outcome, less the evaluations: the training
  steps, the probes every ``anchor_every_steps`` among them and the input grid;
- **steps + evaluations**: from ``fit()`` until the end of the last evaluation: also every
  evaluation with its probe and maps, what a user waits for. The target applies to both.
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from anchorformer import config
from anchorformer.kernels import set_backend
from anchorformer.run_folder import RunFolder
from benchmarks.quality import fit_timed
from benchmarks.report import machine_description, markdown_table
from benchmarks.results import record, verdict

__all__ = ["add_arguments", "run", "TARGET", "DIAGNOSTICS_OFF"]

logger = logging.getLogger(__name__)

TARGET = 0.98
"""Issue 23: training img/s with the diagnostics at their defaults / without, at least this."""
DIAGNOSTICS_OFF = ("logging.anchor_every_steps=0", "logging.images_every_evals=0", "logging.input_images=0")
"""The overrides of the arm without diagnostics."""
_ARMS = {"off": DIAGNOSTICS_OFF, "on": ()}
_PROBE_TAG = "anchors/dead_total"  # one value per probe: how many probes a run really made


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the ``diagnostics`` benchmark; the defaults take about 7 minutes on 2 CPU cores (16 runs)."""
    parser.add_argument("--recipe", type=Path, default=Path("configs/demo.yaml"),
                        help="recipe both arms train (an AnchorFormer classifier)")
    parser.add_argument("--epochs", type=int, default=5,
                        help="schedule.epochs of each run (the recipe's warm-up scaled to them); 5 demo epochs = "
                             "115 steps: one probe at step 100 and 5 evaluations with theirs, the one-time costs "
                             "(input grid, taking the probe batch) 8 times the weight they have in the 40-epoch demo")
    parser.add_argument("--rounds", type=int, default=8,
                        help="rounds of one run per arm, alternating; each measure keeps its least time")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads during the runs (the data loader's workers are separate processes)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override for both arms, e.g. data.cache_dir=/tmp/digits (repeatable); the "
                             "benchmark's own settings (epochs, anchor mix, no checkpoints) and the arm without "
                             "diagnostics' three zero intervals come after it")
    parser.add_argument("--section", default=None,
                        help="name of the docs/benchmarks.md section (default: diagnostics-cpu)")


@dataclass(frozen=True)
class _Times:
    """One run's two measures (seconds), its training images and the probes it logged."""
    steps_s: float
    whole_s: float
    images: int
    probes: int


def _configs(args: argparse.Namespace, recipe: config.RootConfig, out: str) -> dict[str, list[str]]:
    """Each arm's overrides of the recipe: the user's ``--set``, then the benchmark's protocol, then
    the arm's."""
    warmup = recipe.schedule.warmup_epochs * args.epochs / recipe.schedule.epochs  # the recipe's warm-up share
    common = [*args.overrides, f"schedule.epochs={args.epochs}", f"schedule.warmup_epochs={warmup}",
              "train.max_steps=0", "train.anchor_mix=torch", "train.resume=none", "checkpoint.every_steps=0",
              "checkpoint.at_epoch_end=false", f"logging.output_dir={out}", "logging.progress_bar=false",
              "logging.tensorboard=true"]
    return {arm: [*common, *overrides] for arm, overrides in _ARMS.items()}


def _measure(cfg: config.RootConfig) -> _Times:
    """Train ``cfg`` once; its two measures (the module docstring) and the probes it logged."""
    run = fit_timed(cfg)
    last_step = run.step_ends[-1]
    final_start, final_end = run.evaluations[-1]
    assert final_start >= last_step, f"the last evaluation began {last_step - final_start:.3f} s before the last step"
    in_evaluations = sum(end - start for start, end in run.evaluations if end <= last_step)
    events = EventAccumulator(str(RunFolder.of(cfg).tensorboard))
    events.Reload()
    probes = len(events.Scalars(_PROBE_TAG)) if _PROBE_TAG in events.Tags()["scalars"] else 0
    return _Times(last_step - run.start - in_evaluations, final_end - run.start,
                  run.result.step * cfg.train.global_batch_size, probes)


def _check(args: argparse.Namespace) -> None:
    for name in ("epochs", "rounds", "threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not Path(args.recipe).is_file():
        raise ValueError(f"--recipe {str(args.recipe)!r} does not exist; e.g. configs/demo.yaml")


def run(args: argparse.Namespace) -> str:
    """Alternate the two arms for ``--rounds`` rounds; return the markdown section."""
    _check(args)
    recipe = config.load(args.recipe, args.overrides)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    times: dict[str, list[_Times]] = {arm: [] for arm in _ARMS}
    try:
        machine = machine_description(torch.device("cpu"))  # names the threads the runs use
        with tempfile.TemporaryDirectory(prefix="diagnostics-") as out:
            overrides, arms = _configs(args, recipe, out), list(_ARMS)
            for index in range(args.rounds):
                # swapped every round: a first run's one-time costs, or a trend in the load, hit both arms
                for arm in arms[::-1] if index % 2 else arms:
                    cfg = config.load(args.recipe, [*overrides[arm], f"logging.run_name={arm}-round{index}"])
                    times[arm].append(_measure(cfg))
                    logger.info("diagnostics %s, round %d: steps %.2f s, steps + evaluations %.2f s, %d probes",
                                arm, index, times[arm][-1].steps_s, times[arm][-1].whole_s, times[arm][-1].probes)
    finally:
        torch.set_num_threads(threads_before)
        set_backend(None)  # train.anchor_mix=torch forced it for the whole process
    return _section(args, machine, times, recipe, (load_before, os.getloadavg()[0]), time.perf_counter() - started)


def _section(args: argparse.Namespace, machine: str, times: dict[str, list[_Times]], recipe: config.RootConfig,
             load: tuple[float, float], total_s: float) -> str:
    images = {t.images for arm_times in times.values() for t in arm_times}
    assert len(images) == 1, f"the arms trained different numbers of images: {sorted(images)}"
    (count,) = images
    probes = {arm: sorted({t.probes for t in arm_times}) for arm, arm_times in times.items()}
    if probes["off"] != [0]:
        raise RuntimeError(f"the arm without diagnostics logged {probes['off']} probes: the overrides "
                           f"{list(DIAGNOSTICS_OFF)} did not turn them off")
    case = f"{args.recipe.stem} {args.epochs} epochs"
    rows = []
    for measure, field in (("steps", "steps_s"), ("steps + evaluations", "whole_s")):
        rates = {arm: sorted(count / getattr(t, field) for t in arm_times) for arm, arm_times in times.items()}
        for arm, arm_rates in rates.items():
            record(case, f"img/s, {measure}, diagnostics {arm}", arm_rates[-1])
        ratio = rates["on"][-1] / rates["off"][-1]  # the least times' ratio
        met = record(case, f"img/s with / without diagnostics, {measure}", ratio, TARGET, "at_least")
        rows.append([measure, *(f"{r[-1]:.1f} ({r[0]:.1f}-{r[-1]:.1f})" for r in (rates["off"], rates["on"])),
                     f"{ratio:.3f}", verdict(met, TARGET, "at_least")])
    batch, logging_cfg = recipe.train.global_batch_size, recipe.logging
    cpus = len(os.sched_getaffinity(0))
    shared = (f" Above {cpus}, other jobs shared the machine: the times are inflated and noisy."
              if max(load) > cpus else "")
    overrides = f" with {' '.join(f'`{o}`' for o in args.overrides)}" if args.overrides else ""
    return "\n".join([
        "## Anchor diagnostics' cost: training img/s with / without (cpu)",
        "",
        f"`python tools/benchmark.py diagnostics` on {machine}. Recipe `{args.recipe}`{overrides}, {args.epochs} "
        f"epochs ({count // batch} steps of {batch} images, an evaluation after each epoch), anchor "
        f"mix `torch` in both arms, no checkpoint in the timed window. With diagnostics: the recipe's "
        f"`logging.anchor_every_steps={logging_cfg.anchor_every_steps}`, "
        f"`anchor_probe_images={logging_cfg.anchor_probe_images}`, "
        f"`images_every_evals={logging_cfg.images_every_evals}`, `input_images={logging_cfg.input_images}` "
        f"(probes logged per run: {', '.join(map(str, probes['on']))}); without: all three intervals 0 (no probe "
        f"logged). {args.rounds} rounds, the arms alternating (order swapped every round); img/s from each "
        f"configuration's least time over the rounds, the range of the rounds in brackets. The one-time costs "
        f"(the input grid, taking the probe batch) weigh {recipe.schedule.epochs / args.epochs:g} times what they "
        f"weigh in the recipe's {recipe.schedule.epochs} epochs. *steps*: from fit() "
        f"until the last step, less the evaluations (the probes every {logging_cfg.anchor_every_steps} steps and "
        f"the input grid are in it); *steps + evaluations*: from fit() until the end of the last evaluation (each "
        f"evaluation's probe and maps too). Whole benchmark: {total_s / 60:.1f} min.",
        "",
        f"Load average (1 min) {load[0]:.1f} at the start and {load[1]:.1f} at the end, on {cpus} CPUs.{shared}",
        "",
        markdown_table(["measure", "img/s without diagnostics", "img/s with diagnostics", "with / without",
                        "target"], rows),
    ])
