"""Shared pieces of the benchmarks: timing, peak memory, the machine's name, real photo crops as
test images, the image sizes of the DeiT-vs-AnchorFormer comparisons, and writing one named section
of docs/benchmarks.md atomically (other sections are kept as they are)."""
import argparse
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from anchorformer.atomic import atomic_write_bytes

__all__ = ["comma_separated", "machine_description", "time_call", "seconds", "alternating_least", "peak_memory_bytes",
           "photo_crops", "markdown_table", "write_section", "SIZES", "PATCH", "tokens_per_image",
           "add_resolution_arguments", "check_resolutions", "backbone_sizes"]

SIZES = ("tiny", "small", "base")
"""The sizes the model and inference benchmarks compare (DeiT and AnchorFormer, patch 16)."""
PATCH = 16
"""Their patch size."""


def comma_separated(kind: Callable[[str], object], choices: Optional[Sequence[object]] = None) -> Callable[[str], list]:
    """An argparse type: a comma-separated list of ``kind`` values, each from ``choices`` if given."""
    def parse(text: str) -> list:
        try:
            values = [kind(item) for item in text.split(",") if item]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from None
        bad = [value for value in values if choices is not None and value not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"{bad} not in {list(choices)}")
        return values
    return parse


def machine_description(device: torch.device) -> str:
    """One line naming the device, the CPU threads and the software versions."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{_cpu_model()}, {torch.get_num_threads()} threads"
    return f"{name}; torch {torch.__version__}; Python {platform.python_version()}"


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, warmup: int = 3, repeats: int = 10,
              min_seconds: float = 0.0) -> float:
    """Median seconds per call of ``fn`` after ``warmup`` calls (at least ``repeats`` timed calls,
    more until ``min_seconds`` have passed)."""
    for _ in range(warmup):
        fn()
    times = []
    start_all = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start_all < min_seconds:
        times.append(seconds(fn, device))
    return statistics.median(times)


def seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of one call of ``fn``, the device's queue drained before and after."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def alternating_least(calls: Mapping[str, Callable[[], object]], device: torch.device, turns: int,
                      warmup: int = 2) -> dict[str, float]:
    """Least seconds per call of each of ``calls``, taking turns call by call (``turns`` timed turns
    after ``warmup`` turns): load that comes and goes slows each alike, and only ever adds time (on
    a shared machine the least time, not the median, tells a 5 % difference)."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(turns):
        for name, call in calls.items():
            times[name].append(seconds(call, device))
    return {name: min(values) for name, values in times.items()}


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated during one call of ``fn`` above what was allocated before it.

    On CUDA this is the caching allocator's peak; on CPU, torch's profiler memory events."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.cpu_memory_usage if not event.cpu_children else 0
        peak = max(peak, current)
    return peak


def photo_crops(count: int, seed: int = 0) -> Iterator[Image.Image]:
    """``count`` RGB crops of scikit-learn's two sample photos at random positions and sizes
    (shorter side 300-427 px, aspect 1-1.5, like ImageNet's images): real image statistics for
    decode and augmentation costs without any download."""
    from sklearn.datasets import load_sample_images  # imported here: only benchmarks that write images need it

    photos = [Image.fromarray(photo) for photo in load_sample_images().images]
    rng = np.random.default_rng(seed)
    for i in range(count):
        photo = photos[i % len(photos)]
        height = int(rng.integers(300, photo.height + 1))
        width = int(min(photo.width, round(height * rng.uniform(1.0, 1.5))))
        left, top = int(rng.integers(0, photo.width - width + 1)), int(rng.integers(0, photo.height - height + 1))
        yield photo.crop((left, top, left + width, top + height))


def tokens_per_image(resolution: int) -> int:
    """Tokens of a patch-16 ViT at ``resolution`` px: the patches and the class token."""
    return (resolution // PATCH) ** 2 + 1


def add_resolution_arguments(parser: argparse.ArgumentParser) -> None:
    """``--resolutions``, ``--backbone-resolution`` and ``--backbone-sizes``, as the model and
    inference benchmarks take them."""
    parser.add_argument("--resolutions", type=comma_separated(int), default=[224, 384],
                        help="classification image sizes, comma-separated (\"\" for none)")
    parser.add_argument("--backbone-resolution", type=int, default=1024,
                        help="image size of the backbone rows (forward_features, no head; 0 disables them)")
    parser.add_argument("--backbone-sizes", type=comma_separated(str, SIZES), default=None,
                        help="sizes of the backbone rows (default: base on CUDA, tiny on CPU)")


def check_resolutions(args: argparse.Namespace) -> None:
    """Refuse image sizes that are not positive multiples of the patch size.

    Raises:
        ValueError: naming the sizes given.
    """
    if (any(res < PATCH or res % PATCH for res in args.resolutions) or args.backbone_resolution < 0
            or args.backbone_resolution % PATCH):
        raise ValueError(f"resolutions must be multiples of the patch size {PATCH} (--backbone-resolution 0 "
                         f"disables the backbone rows), got {args.resolutions} and --backbone-resolution "
                         f"{args.backbone_resolution}")


def backbone_sizes(args: argparse.Namespace, on_gpu: bool) -> list[str]:
    """The sizes of the backbone rows: ``--backbone-sizes``, or base on a GPU and tiny on a CPU."""
    return args.backbone_sizes or (["base"] if on_gpu else ["tiny"])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(doc: Path, name: str, markdown: str) -> None:
    """Replace (or append) the section ``name`` of ``doc`` between its begin/end markers; the
    file is replaced atomically."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    text = doc.read_text(encoding="utf-8") if doc.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(doc, text.encode("utf-8"))
