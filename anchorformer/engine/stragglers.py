"""Stragglers: which rank holds the others up, from each rank's busy time per optimizer step.

In synchronous data parallel every rank's wall time per step is the same: each one waits for the
slowest inside the step's gradient reduction. What differs is the time a rank needs on its own
before it joins that reduction. This module measures it as the rank's **busy time**: its data wait
(``perf/data_wait_s``, timed by the trainer) plus its forward passes of the step's micro-batches
(timed here by hooks on the DeepSpeed engine: host time on the CPU, CUDA events on a GPU). The
backward is left out because the reduction runs inside it (overlapped with it under ZeRO), so its
time includes the wait for the slowest rank; under ZeRO-3 the forward also gathers weights, which
can wait for peers too. A slow device, a throttled or shared CPU and a starved data loader all
show.

At every log step the ranks gather their busy times (one collective, :meth:`StragglerMonitor.summary`);
TensorBoard gets the median and the maximum over ranks and the slowest rank (with its host as a
text entry whenever it changes), and the log warns about a rank slower than
``health.straggler_ratio`` x the median for ``health.straggler_patience`` log intervals in a row.
"""
from __future__ import annotations

import logging
import socket
import statistics
import time
from typing import Any, Sequence

import torch
from torch import nn

from anchorformer import dist
from anchorformer.config.schema import HealthConfig
from anchorformer.engine.metrics import TensorBoardLogger

__all__ = ["StragglerMonitor"]

logger = logging.getLogger(__name__)


class StragglerMonitor:
    """Per-rank busy time per step, gathered at log steps (see the module docstring).

    Args:
        health: the ``health`` config section (ratio and patience of the warning).
        model: the module whose training forwards are timed (the DeepSpeed engine: outside
            torch.compile, which compiles the module inside it).
        accumulation: forwards per optimizer step on this rank.
        device: where the forwards run (CUDA events time them there).
        tensorboard: where the slowest rank's host goes as text (rank 0's writer).
        is_main: whether this rank logs the warnings (each rank judges the same gathered times).
    """

    def __init__(self, health: HealthConfig, model: nn.Module, accumulation: int, device: torch.device,
                 tensorboard: TensorBoardLogger, is_main: bool):
        self.health, self.accumulation, self.tensorboard, self.is_main = health, accumulation, tensorboard, is_main
        self._host = socket.gethostname()
        self._cuda = device.type == "cuda"
        self._started: Any = None
        self._forward_s = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._forwards = 0
        self._streaks: dict[int, int] = {}
        self._slowest: tuple[int, str] | None = None
        model.register_forward_pre_hook(self._before_forward)
        model.register_forward_hook(self._after_forward)

    def summary(self, data_wait_s: float, step: int) -> dict[str, float]:
        """Gather every rank's busy time per step since the last summary (a collective: every rank
        calls it at the same step), warn about stragglers, and return the scalars to log.

        Args:
            data_wait_s: this rank's mean data wait per step over the same steps.
            step: the optimizer step (TensorBoard's x axis).
        """
        busy = data_wait_s + self._forward_per_step()
        return self.judge(dist.all_gather_objects((busy, self._host)), step)

    def judge(self, per_rank: Sequence[tuple[float, str]], step: int) -> dict[str, float]:
        """The scalars and warnings of one log interval from ``(busy seconds per step, host)`` of
        every rank, in rank order. Slow means above ratio x the low median (with an even number of
        ranks, the faster of the middle two: of 2 ranks, the faster one)."""
        busy = [b for b, _ in per_rank]
        median = statistics.median_low(busy)
        slowest = max(range(len(busy)), key=busy.__getitem__)
        if (slowest, per_rank[slowest][1]) != self._slowest:
            self._slowest = (slowest, per_rank[slowest][1])
            self.tensorboard.text("perf/slowest_rank", f"rank {slowest} ({per_rank[slowest][1]}): "
                                  f"{busy[slowest]:.4g} s busy per step, median {median:.4g} s", step)
        if self.health.straggler_ratio > 0:
            for rank, (seconds, host) in enumerate(per_rank):
                self._track(rank, host, seconds, median, step)
        return {"perf/step_time_median_s": median, "perf/step_time_max_s": busy[slowest],
                "perf/step_time_slowest_rank": float(slowest)}

    def _track(self, rank: int, host: str, seconds: float, median: float, step: int) -> None:
        slow = seconds > self.health.straggler_ratio * median
        streak = self._streaks.get(rank, 0) + 1 if slow else 0
        patience = self.health.straggler_patience
        if streak == patience and self.is_main:
            logger.warning("straggler: rank %d (%s) is busy %.4g s per step, %.1fx the ranks' median %.4g s, "
                           "for %d log intervals in a row (step %d); every rank waits for it in each step",
                           rank, host, seconds, seconds / max(median, 1e-12), median, patience, step)
        elif not slow and self._streaks.get(rank, 0) >= patience and self.is_main:
            logger.info("rank %d (%s) no longer straggles at step %d (%.4g s busy per step, median %.4g s)",
                        rank, host, step, seconds, median)
        self._streaks[rank] = streak

    def _forward_per_step(self) -> float:
        """Forward seconds per step since the last call (then restart)."""
        if self._cuda:
            if self._events:
                self._events[-1][1].synchronize()
            self._forward_s += sum(start.elapsed_time(end) for start, end in self._events) / 1000
            self._events = []
        steps = self._forwards / self.accumulation
        per_step = self._forward_s / steps if steps else 0.0
        self._forward_s, self._forwards = 0.0, 0
        return per_step

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        if not module.training:  # evaluation and probes are no training step
            return
        if self._cuda:
            self._started = torch.cuda.Event(enable_timing=True)
            self._started.record()
        else:
            self._started = time.perf_counter()

    def _after_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        if not module.training or self._started is None:
            return
        if self._cuda:
            finished = torch.cuda.Event(enable_timing=True)
            finished.record()
            self._events.append((self._started, finished))
        else:
            self._forward_s += time.perf_counter() - self._started
        self._started = None
        self._forwards += 1
