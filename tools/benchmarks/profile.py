"""profile: where one training step's time goes, AnchorFormer vs DeiT, by kind of work.

The ``model`` benchmark's step (bf16 autocast, fused AdamW) runs under ``torch.profiler`` for
``--steps`` steps after warm-up. On CUDA every GPU kernel's time is summed into a category by its
name (matrix multiplies, SDPA/flash attention, the anchor-mix Triton kernels, softmax, layer norm,
optimizer, the rest: element-wise ops, reductions, copies); "GPU busy" is the kernels' total over
the wall-clock time, so a step that waits on the CPU to launch its kernels shows below 100 %. On
CPU the same categories sum the operators' self time. This is the profile that explains a missed
throughput or MFU target.
"""
import argparse
import collections
import logging
import re
import time
from typing import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from benchmarks.model import measure_training_step
from benchmarks.report import SIZES, machine_description, markdown_table
from benchmarks.results import record
from anchorformer.kernels import BACKENDS

__all__ = ["add_arguments", "run", "categorize"]

logger = logging.getLogger(__name__)

_FAMILIES = ("deit", "anchorformer")
# The GPU must be busy at least this share of an AnchorFormer-B training step.
TARGET_GPU_BUSY_BASE = 0.95
# First match wins; kernel names (CUDA) and operator names (CPU) alike.
_CATEGORIES = (
    ("anchor mix (Triton)", re.compile(r"_(gather|scatter|finish_forward|finish_backward|one_program_forward|"
                                       r"one_program_backward|token_split_backward)_kernel")),
    ("attention (SDPA)", re.compile(r"flash|fmha|sdpa|scaled_dot_product|efficient_attention|attention", re.I)),
    ("optimizer", re.compile(r"multi_tensor|adam|foreach", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|xmma|nvjet|wgmma|cublas|aten::(mm|addmm|bmm|baddbmm|linear|matmul)$", re.I)),
    ("softmax", re.compile(r"softmax", re.I)),
    ("layer norm", re.compile(r"layer_norm|layernorm", re.I)),
)
OTHER = "other (element-wise, reductions, copies)"


def categorize(name: str) -> str:
    """The category of a kernel or operator name (``OTHER`` when none matches)."""
    return next((category for category, pattern in _CATEGORIES if pattern.search(name)), OTHER)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the ``profile`` benchmark."""
    on_gpu = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if on_gpu else "cpu", help="device (default: cuda when available)")
    parser.add_argument("--size", choices=SIZES, default=None, help="model size (default: base on CUDA, tiny on CPU)")
    parser.add_argument("--resolution", type=int, default=224, help="image size in pixels (multiple of 16)")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default: 128 on CUDA, 2 on CPU)")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (after 3 warm-up steps)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="anchor-mix backend of AnchorFormer")
    parser.add_argument("--section", default=None, help="name of the docs/benchmarks.md section (default: profile-DEVICE)")


def _in_optimizer_step(event) -> bool:
    """Whether a CPU operator ran inside ``Optimizer.step`` (the profiler records that region)."""
    while event is not None:
        if event.name.startswith("Optimizer.step"):
            return True
        event = event.cpu_parent
    return False


def _profile_steps(step: Callable[[], None], device: torch.device, steps: int) -> tuple[dict[str, float], float]:
    """Seconds per step by category, and wall-clock seconds per step."""
    for _ in range(3):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - start
    seconds: collections.Counter = collections.Counter()
    for event in prof.events():
        if device.type == "cuda":
            if event.device_type == DeviceType.CUDA:
                seconds[categorize(event.name)] += (event.time_range.end - event.time_range.start) / 1e6
        elif event.device_type == DeviceType.CPU and event.name.startswith("aten::"):
            category = "optimizer" if _in_optimizer_step(event) else categorize(event.name)
            seconds[category] += event.self_cpu_time_total / 1e6
    return {category: total / steps for category, total in seconds.items()}, wall / steps


def run(args: argparse.Namespace) -> str:
    """Profile both families; return the markdown section."""
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    size = args.size or ("base" if on_gpu else "tiny")
    batch = args.batch if args.batch is not None else (128 if on_gpu else 2)
    if args.resolution <= 0 or args.resolution % 16 or batch < 1 or args.steps < 1:
        raise ValueError(f"need a positive --resolution that is a multiple of 16 (got {args.resolution}), "
                         f"--batch >= 1 (got {batch}) and --steps >= 1 (got {args.steps})")
    results = {}
    for family in _FAMILIES:
        logger.info("profile benchmark: %s %s at %d px, batch %d", family, size, args.resolution, batch)
        captured = {}

        def profiled(step: Callable[[], None]) -> float:
            captured["by_category"], captured["wall"] = _profile_steps(step, device, args.steps)
            return captured["wall"]

        measure_training_step(family, size, args.resolution, batch, False, args.backend, repeats=args.steps,
                              device=device, timer=profiled)
        results[family] = captured
    categories = [c for c, _ in _CATEGORIES] + [OTHER]
    rows = []
    for category in categories:
        cells = []
        for family in _FAMILIES:
            spent = results[family]["by_category"].get(category, 0.0)
            cells += [f"{1e3 * spent:.2f}", f"{100 * spent / results[family]['wall']:.0f} %"]
        if any(results[family]["by_category"].get(category) for family in _FAMILIES):
            rows.append([category, *cells])
    busy = [sum(results[family]["by_category"].values()) for family in _FAMILIES]
    walls = [results[family]["wall"] for family in _FAMILIES]
    rows.append(["**sum of kernels**" if on_gpu else "**sum of operators**",
                 f"{1e3 * busy[0]:.2f}", f"{100 * busy[0] / walls[0]:.0f} %",
                 f"{1e3 * busy[1]:.2f}", f"{100 * busy[1] / walls[1]:.0f} %"])
    rows.append(["**wall-clock step**", f"{1e3 * walls[0]:.2f}", "100 %", f"{1e3 * walls[1]:.2f}", "100 %"])
    for family, spent, wall in zip(_FAMILIES, busy, walls):
        case = f"{family} {size} {args.resolution} px batch {batch}"
        record(case, "step ms", 1e3 * wall)
        target = TARGET_GPU_BUSY_BASE if on_gpu and family == "anchorformer" and size == "base" else None
        record(case, "GPU busy / step" if on_gpu else "operators / step", spent / wall, target,
               "at_least" if target else None)
        for category, seconds in results[family]["by_category"].items():
            record(case, f"{category} ms", 1e3 * seconds)
    unit = "GPU kernel time" if on_gpu else "operator self time"
    gap = ("the sum below 100 % is time the GPU waited for the host" if on_gpu
           else "the sum below 100 % is Python and framework time outside the operators")
    return "\n".join([
        f"## Where a training step's time goes: {size}, {args.resolution} px, batch {batch} ({device.type})",
        "",
        f"Device: {machine_description(device)}. The `model` benchmark's step (bf16 autocast, AdamW, fused on GPUs) "
        f"under torch.profiler, {args.steps} steps after 3 warm-up steps; ms per step of {unit} by category "
        f"and its share of the wall-clock step ({gap}). "
        f"Anchor mix backend: {args.backend}.",
        "",
        markdown_table(["category", "DeiT ms", "DeiT share", "AnchorFormer ms", "AnchorFormer share"], rows),
    ])
