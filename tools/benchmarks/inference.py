"""Inference speed: AnchorFormer vs DeiT (timm ViT, SDPA attention), batch-1 latency and img/s.

Every row times both families on the same random images, forward only under
``torch.inference_mode``: batch-1 latency (ms) of the ``--latency-sizes``, throughput (img/s) of
the ``--throughput-sizes`` at a batch of about ``--tokens-per-batch`` tokens, at each resolution,
and the backbone alone (``forward_features``, no head) at ``--backbone-resolution``; each in fp32
and under bf16 autocast, eager and ``torch.compile``-d. The two models' calls alternate, so that a
change of the machine's load hits both alike; the median of ``--repeats`` calls per model is
reported after warm-up calls (the first compiled call compiles).
"""
import argparse
import logging
import os
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import timm
import torch

import anchorformer.models  # noqa: F401  (registers the anchorformer_* models with timm)
from anchorformer.kernels import backend_calls
from benchmarks.report import (
    SIZES, add_resolution_arguments, backbone_sizes, check_resolutions, comma_separated, machine_description,
    markdown_table, tokens_per_image,
)
from benchmarks.results import record, verdict

__all__ = ["add_arguments", "run", "Case", "measure"]

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")
MODES = ("eager", "compiled")
Kind = Literal["latency", "throughput", "backbone"]
# The inference issue's targets: AF / DeiT batch-1 latency (at most) and img/s (at least).
TARGETS = {("latency", "tiny", 224): 0.9, ("latency", "tiny", 384): 0.7,
           ("throughput", "base", 224): 1.1, ("throughput", "base", 384): 1.4}


@dataclass(frozen=True)
class Case:
    """One row: what is timed, at which size, batch, precision and mode."""

    kind: Kind
    size: str
    resolution: int
    batch: int
    precision: str
    mode: str

    @property
    def tokens(self) -> int:
        return self.batch * tokens_per_image(self.resolution)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the ``inference`` benchmark; defaults are sized for the device that runs it."""
    on_gpu = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if on_gpu else "cpu", help="device (default: cuda when available)")
    parser.add_argument("--latency-sizes", type=comma_separated(str, SIZES), default=None,
                        help="sizes timed at batch 1 (default: tiny,small,base on CUDA, tiny on CPU)")
    parser.add_argument("--throughput-sizes", type=comma_separated(str, SIZES), default=["base"],
                        help="sizes timed at a full batch (\"\" for none)")
    add_resolution_arguments(parser)
    parser.add_argument("--tokens-per-batch", type=int, default=None,
                        help="throughput batch = this // tokens per image, at least 1 (default: 256 images at "
                             "224 px on CUDA, 2 on CPU)")
    parser.add_argument("--precisions", type=comma_separated(str, PRECISIONS), default=list(PRECISIONS),
                        help="fp32 and/or bf16 (autocast)")
    parser.add_argument("--modes", type=comma_separated(str, MODES), default=list(MODES),
                        help="eager and/or compiled (torch.compile)")
    parser.add_argument("--compile-max-tokens", type=int, default=None,
                        help="compiled rows only for forwards of at most this many tokens, 0: all (default: all "
                             "on CUDA, 197 on CPU, where each compile costs 20-50 s)")
    parser.add_argument("--compile-precisions", type=comma_separated(str, PRECISIONS), default=None,
                        help="precisions of the compiled rows (default: every one on CUDA, fp32 on CPU, where a "
                             "bf16 compile takes 35-50 s per model)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per model and row, median reported (default: 20 on CUDA, 3 on CPU)")
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's)")
    parser.add_argument("--section", default=None, help="docs/benchmarks.md section (default: inference-DEVICE)")


def _cases(args: argparse.Namespace, on_gpu: bool) -> list[Case]:
    tokens_per_batch = args.tokens_per_batch or (256 if on_gpu else 2) * 197
    compile_max = args.compile_max_tokens if args.compile_max_tokens is not None else (0 if on_gpu else 197)
    compiled_precisions = args.compile_precisions or (PRECISIONS if on_gpu else ["fp32"])
    shapes: list[tuple[Kind, str, int, int]] = []
    for resolution in args.resolutions:
        shapes += [("latency", size, resolution, 1) for size in args.latency_sizes or (SIZES if on_gpu else ["tiny"])]
        shapes += [("throughput", size, resolution, max(1, tokens_per_batch // tokens_per_image(resolution)))
                   for size in args.throughput_sizes]
    if args.backbone_resolution:
        batch = max(1, tokens_per_batch // tokens_per_image(args.backbone_resolution))
        shapes += [("backbone", size, args.backbone_resolution, batch) for size in backbone_sizes(args, on_gpu)]
    cases = [Case(*shape, precision, mode) for shape in shapes for mode in args.modes for precision in args.precisions]
    return [case for case in cases if case.mode == "eager"
            or ((not compile_max or case.tokens <= compile_max) and case.precision in compiled_precisions)]


def _check(args: argparse.Namespace) -> None:
    check_resolutions(args)
    if (args.repeats is not None and args.repeats < 1) or (args.tokens_per_batch is not None
                                                           and args.tokens_per_batch < 1):
        raise ValueError("--repeats and --tokens-per-batch must be >= 1")
    if not args.precisions or not args.modes:
        raise ValueError("nothing to measure: give at least one of --precisions and one of --modes")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _alternating_medians(calls: list[Callable[[], object]], device: torch.device, warmup: int,
                         repeats: int) -> list[float]:
    """Median seconds per call of each of ``calls``, timed in alternation (a, b, a, b, ...)."""
    for _ in range(warmup):
        for call in calls:
            call()
    _sync(device)
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for call, spent in zip(calls, times):
            start = time.perf_counter()
            call()
            _sync(device)
            spent.append(time.perf_counter() - start)
    return [statistics.median(spent) for spent in times]


class _Models:
    """The two families' models of one (size, resolution, kind), eager and compiled, built once."""

    def __init__(self, size: str, resolution: int, backbone: bool, device: torch.device):
        self.eager = {family: timm.create_model(f"{family}_{size}_patch16_224", img_size=resolution,
                                                num_classes=0 if backbone else 1000).to(device).eval()
                      for family in ("deit", "anchorformer")}
        self.backbone = backbone
        self._compiled: dict[str, Callable] = {}

    def forward(self, family: str, mode: str) -> Callable[[torch.Tensor], torch.Tensor]:
        model = self.eager[family]
        call = model.forward_features if self.backbone else model
        if mode == "eager":
            return call
        if family not in self._compiled:
            self._compiled[family] = torch.compile(call)
        return self._compiled[family]


def measure(case: Case, models: _Models, device: torch.device, repeats: int) -> dict:
    """Seconds per call of DeiT and AnchorFormer on ``case`` and the anchor-mix backends AF ran."""
    images = torch.randn(case.batch, 3, case.resolution, case.resolution, device=device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if case.precision == "bf16" else nullcontext())

    def runner(family: str) -> Callable[[], object]:
        forward = models.forward(family, case.mode)

        def call() -> object:
            with torch.inference_mode(), autocast:
                return forward(images)
        return call

    deit, anchor = runner("deit"), runner("anchorformer")
    before = backend_calls()
    anchor()
    ran = sorted(name for name, count in backend_calls().items() if count > before.get(name, 0))
    warmup = 3 if device.type == "cuda" else 1
    deit_s, anchor_s = _alternating_medians([deit, anchor], device, warmup=warmup, repeats=repeats)
    return {"deit_s": deit_s, "anchor_s": anchor_s, "backends": "+".join(ran) or "-"}


def _row(case: Case, result: dict) -> list:
    name = f"{case.size} {case.resolution} px {case.kind}, {case.precision} {case.mode}"
    if case.kind == "latency":
        deit, anchor, unit = result["deit_s"] * 1e3, result["anchor_s"] * 1e3, "ms"
        ratio, goal = anchor / deit, "at_most"
    else:
        deit, anchor, unit = case.batch / result["deit_s"], case.batch / result["anchor_s"], "img/s"
        ratio, goal = anchor / deit, "at_least"
    target = TARGETS.get((case.kind, case.size, case.resolution))
    met = record(name, f"AF / DeiT {unit}", ratio, target, goal if target else None)
    record(name, f"DeiT {unit}", deit)
    record(name, f"AnchorFormer {unit}", anchor)
    return [case.kind, case.size, case.resolution, case.batch, case.precision, case.mode, unit,
            f"{deit:.3g}" if deit < 100 else f"{deit:.0f}", f"{anchor:.3g}" if anchor < 100 else f"{anchor:.0f}",
            f"{ratio:.2f}x", verdict(met, target, goal), result["backends"]]


def run(args: argparse.Namespace) -> str:
    """Time every case for both families; return the markdown section."""
    _check(args)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (20 if on_gpu else 3)
    cases = _cases(args, on_gpu)
    load_before = os.getloadavg()[0]
    rows = []
    models: Optional[_Models] = None
    built_for = None
    for case in cases:  # grouped by model shape: each pair of models is built once
        shape = (case.size, case.resolution, case.kind == "backbone")
        if shape != built_for:
            models, built_for = _Models(*shape, device), shape
        logger.info("inference benchmark: %s", case)
        rows.append(_row(case, measure(case, models, device, repeats)))
    load = (load_before, os.getloadavg()[0])
    cpus = len(os.sched_getaffinity(0))
    shared = (f" Above {cpus}, other jobs shared the machine: the times are inflated and noisy, and the ratios "
              f"less reliable than on an idle machine." if max(load) > cpus else "")
    header = ["kind", "size", "px", "batch", "precision", "mode", "unit", "DeiT", "AnchorFormer", "AF / DeiT",
              "target", "AF anchor mix"]
    return "\n".join([
        f"## Inference: AnchorFormer vs DeiT ({device.type})",
        "",
        f"`python tools/benchmark.py inference` on {machine_description(device)}. Forward only "
        f"(torch.inference_mode), random images; latency = batch 1 (ms, lower is better), throughput and "
        f"backbone = img/s at the batch shown (higher is better; backbone = forward_features, no head); bf16 = "
        f"autocast; compiled = torch.compile, timed after its compiling call. Median of {repeats} calls per model, "
        f"the two models' calls alternating. 'AF anchor mix': the backend the anchor layers ran through "
        f"anchorformer.kernels ('-': inside a compiled graph, where the compiler fuses the PyTorch path, or on "
        f"CUDA runs the kernels as custom ops). Targets: AF-tiny latency <= 0.9x DeiT-tiny at 224 px and <= 0.7x "
        f"at 384 px; AF-base throughput >= 1.1x DeiT-base at 224 px and >= 1.4x at 384 px.",
        "",
        f"Load average (1 min) {load[0]:.1f} at the start and {load[1]:.1f} at the end, on {cpus} CPUs.{shared}",
        "",
        markdown_table(header, rows),
    ])
