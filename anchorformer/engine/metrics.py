"""Observability: TensorBoard on rank 0 (scalars, histograms, images, text, and the run's
custom-scalars layout: the charts a user checks first), throughput / TFLOP/s / MFU from the model's
measured FLOPs, data-wait share, device memory."""
from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Union

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

if TYPE_CHECKING:
    from anchorformer.models.anchor_diagnostics import AnchorDiagnostics

__all__ = ["measure_forward_flops", "peak_memory_gb", "Throughput", "TensorBoardLogger", "run_layout",
           "skip_scalars"]


@torch.no_grad()
def measure_forward_flops(model: nn.Module, example: torch.Tensor) -> float:
    """FLOPs of one forward pass for one sample, counted by torch's FlopCounterMode.

    Args:
        model: the network (whole, before DeepSpeed partitions it).
        example: one input sample with its batch dimension (batch size 1).

    Returns:
        Forward FLOPs per sample (a multiply-add counts 2).
    """
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(example)
    model.train(was_training)
    return float(counter.get_total_flops()) / example.shape[0]


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process: allocated CUDA memory on GPU, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


@dataclass
class Throughput:
    """Accumulates step and data-wait time between two log points.

    Args:
        samples_per_step: global samples per optimizer step (all ranks).
        flops_per_sample: forward FLOPs of one sample (training counts 3x: forward + backward).
        world_size: devices sharing the work.
        peak_tflops: one device's peak TFLOP/s; 0 omits MFU.
    """

    samples_per_step: int
    flops_per_sample: float
    world_size: int
    peak_tflops: float = 0.0
    _steps: int = field(default=0, init=False)
    _data_wait: float = field(default=0.0, init=False)
    _start: float = field(default_factory=time.perf_counter, init=False)

    def add_step(self, data_wait_s: float) -> None:
        """Record one optimizer step and the time it waited for data."""
        self._steps += 1
        self._data_wait += data_wait_s

    def summary(self) -> dict[str, float]:
        """Rates since the last summary (then restart the interval)."""
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        steps = max(self._steps, 1)
        samples_per_s = self._steps * self.samples_per_step / elapsed
        tflops = 3.0 * self.flops_per_sample * samples_per_s / self.world_size / 1e12
        result = {"perf/samples_per_s": samples_per_s, "perf/step_time_s": elapsed / steps,
                  "perf/data_wait_s": self._data_wait / steps, "perf/data_wait_share": self._data_wait / elapsed,
                  "perf/tflops_per_device": tflops}
        if self.peak_tflops > 0:
            result["perf/mfu"] = tflops / self.peak_tflops
        self._steps, self._data_wait, self._start = 0, 0.0, time.perf_counter()
        return result


def skip_scalars(split: str, counts: Mapping[str, float]) -> dict[str, float]:
    """The data streams' skip counters as tags ``skipped/<split>/<reason>`` (split ``train`` or
    ``val``): one custom-scalars chart per split, one line per reason."""
    return {f"skipped/{split}/{reason}": float(n) for reason, n in counts.items()}


def run_layout(main_metric: str = "top1") -> dict[str, dict[str, list]]:
    """TensorBoard's custom-scalars layout of a run (``add_custom_scalars``): categories in order,
    charts of tag regexes (``re.match``) in order. "At a glance" holds what a user checks first.

    Args:
        main_metric: the task's main evaluation metric (``top1``, ``bbox_AP``, ``mIoU``).
    """
    def chart(*patterns: str) -> list:
        return ["Multiline", list(patterns)]

    main = main_metric.replace(".", r"\.")
    return {
        "At a glance": {
            "loss (train, eval, eval EMA)": chart(r"^train/loss$", r"^eval(_ema)?/loss$"),
            f"{main_metric} (eval, eval EMA, best)": chart(rf"^eval(_ema)?/(best_)?{main}$"),
            "learning rate": chart(r"^train/lr$"),
            "images/s (all ranks)": chart(r"^perf/samples_per_s$"),
            "MFU": chart(r"^perf/mfu$"),
            "data-wait share of wall time": chart(r"^perf/data_wait_share$"),
            "peak memory (GB)": chart(r"^memory/"),
            "step time (s): mean wall; per-rank busy time (data wait + forward), median and max":
                chart(r"^perf/step_time(_median|_max)?_s$"),
        },
        "Training": {
            "gradient norm": chart(r"^train/grad_norm$"),
            "skipped steps (non-finite, loss spikes)": chart(r"^train/(nonfinite|spike)_steps$"),
            "TFLOP/s per device": chart(r"^perf/tflops_per_device$"),
            "data wait per step (s)": chart(r"^perf/data_wait_s$"),
            "slowest rank (index)": chart(r"^perf/step_time_slowest_rank$"),
            "epoch": chart(r"^train/epoch$"),
            "other evaluation metrics": chart(rf"^eval(_ema)?/(?!loss$|samples$|(best_)?{main}$)"),
        },
        "Data: skipped samples": {
            "train (one line per reason)": chart(r"^skipped/train/"),
            "validation (one line per reason)": chart(r"^skipped/val/"),
        },
        "Anchors": {
            "dead anchors per layer": chart(r"^anchors/dead/"),
            "dead anchors, all layers": chart(r"^anchors/dead_total$"),
            "smallest relative degree per layer (1 = fair share)": chart(r"^anchors/degree_min/"),
            "assignment entropy / log m per layer": chart(r"^anchors/entropy/"),
            "max anchor cosine similarity per layer": chart(r"^anchors/cosine_max/"),
            "mean anchor cosine similarity per layer": chart(r"^anchors/cosine_mean/"),
            "mean anchor norm per layer": chart(r"^anchors/norm_mean/"),
        },
    }


class TensorBoardLogger:
    """TensorBoard event writer of the main rank; a no-op elsewhere or when disabled. Writes the
    run's custom-scalars layout (:func:`run_layout`) when it opens.

    Args:
        log_dir: folder for the event files.
        enabled: write (true on rank 0 with logging.tensorboard).
        main_metric: the task's main evaluation metric, charted "at a glance".
    """

    def __init__(self, log_dir: Path, enabled: bool, main_metric: str = "top1"):
        self._writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only on rank 0

            self._writer = SummaryWriter(log_dir=str(log_dir))
            self._writer.add_custom_scalars(run_layout(main_metric))

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Write each ``tag: value`` at ``step``."""
        if self._writer is not None:
            for tag, value in values.items():
                self._writer.add_scalar(tag, value, step)

    def histograms(self, values: Mapping[str, Union[torch.Tensor, np.ndarray]], step: int) -> None:
        """Write each ``tag: values`` as a histogram at ``step``."""
        if self._writer is not None:
            for tag, value in values.items():
                self._writer.add_histogram(tag, value, step)

    def images(self, values: Mapping[str, np.ndarray], step: int) -> None:
        """Write each ``tag: picture`` ((H, W, 3) uint8, e.g. from ``models.anchor_pictures``) at ``step``."""
        if self._writer is not None:
            for tag, picture in values.items():
                self._writer.add_image(tag, picture, step, dataformats="HWC")

    def anchor_diagnostics(self, result: AnchorDiagnostics, step: int) -> None:
        """The scalars and histograms of ``models.anchor_diagnostics`` at ``step``."""
        self.scalars(result.scalars(), step)
        self.histograms(result.histograms(), step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        """Write a markdown text entry (e.g. the resolved config)."""
        if self._writer is not None:
            self._writer.add_text(tag, text, step)

    def flush(self) -> None:
        """Push buffered events to disk."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

