"""Training throughput and MFU: AnchorFormer vs DeiT (timm ViT, SDPA attention), same size and batch.

One training step is forward + backward + AdamW step under bf16 autocast (fp32 weights), on
random images: classification (cross-entropy on 1000 classes) at each ``--resolutions``, and the
backbone alone (mean square of all token features, no head) at ``--backbone-resolution``, as a
detection model uses it. MFU = FLOPs of one forward+backward per image, counted by
``torch.utils.flop_counter`` on the PyTorch paths (fused kernels are invisible to the counter;
the maths is the same) x images/s / the device's peak.
"""
import argparse
import logging
from typing import Callable, Optional

import timm
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import anchorformer.models  # noqa: F401  (registers the anchorformer_* models with timm)
from benchmarks.report import (
    SIZES, add_resolution_arguments, backbone_sizes, check_resolutions, comma_separated, machine_description,
    markdown_table, time_call, tokens_per_image,
)
from benchmarks.results import record, verdict
from anchorformer.kernels import BACKENDS, backend_calls, set_backend

__all__ = ["add_arguments", "run", "measure_training_step", "peak_flops", "target_speedup"]

logger = logging.getLogger(__name__)

# Dense bf16 tensor-core peaks (TFLOP/s) by device-name fragment, most specific first.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))
# Targets for AnchorFormer / DeiT training img/s of the bare step, by (size, resolution); 1024 px
# is the detection backbone.
TARGET_SPEEDUP = {("tiny", 224): 1.1, ("small", 224): 1.1, ("base", 224): 1.2, ("base", 384): 1.5,
                  ("base", 1024): 2.5}
# MFU of AnchorFormer-B training, in its best mode: at least this.
TARGET_MFU_BASE = 0.40


def target_speedup(size: str, resolution: int) -> Optional[float]:
    """The AnchorFormer / DeiT img/s target of ``size`` at ``resolution`` px, or None."""
    return TARGET_SPEEDUP.get((size, resolution))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the ``model`` benchmark; defaults are sized for the device that runs it."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device to train on (default: cuda when available)")
    parser.add_argument("--sizes", type=comma_separated(str, SIZES), default=None,
                        help="model sizes, comma-separated (default: tiny,small,base on CUDA, tiny on CPU)")
    add_resolution_arguments(parser)
    parser.add_argument("--tokens-per-step", type=int, default=None,
                        help="batch = this // tokens per image, at least 1; both models get the same "
                             "batch (default: 128 images at 224 on CUDA, 2 on CPU)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="anchor-mix backend of the AnchorFormer layers (see anchorformer.kernels)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile both models (the anchor mix then runs as the compiler fuses it, "
                             "or as the Triton custom ops with --backend triton)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="device peak for MFU in TFLOP/s (default: known bf16 dense peak of the GPU, "
                             "e.g. 989 for an H100 SXM; MFU is left out when unknown)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed steps per model, median reported (default: 10 on CUDA, 3 on CPU)")
    parser.add_argument("--section", default=None,
                        help="name of the docs/benchmarks.md section (default: model-DEVICE)")


def peak_flops(device: torch.device, peak_tflops: Optional[float]) -> Optional[float]:
    if peak_tflops is not None:
        if peak_tflops <= 0:
            raise ValueError(f"--peak-tflops must be > 0, got {peak_tflops}")
        return peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for fragment, tflops in PEAK_BF16_TFLOPS if fragment in name), None)


def _build(family: str, size: str, resolution: int, backbone: bool, device: torch.device) -> torch.nn.Module:
    name = f"{family}_{size}_patch16_224"
    model = timm.create_model(name, img_size=resolution, num_classes=0 if backbone else 1000)
    return model.to(device).train()


def _forward(model: torch.nn.Module, backbone: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """What a step runs: the classifier, or the backbone's token features (no head)."""
    return model.forward_features if backbone else model


def _loss(forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, labels: torch.Tensor,
          backbone: bool) -> torch.Tensor:
    if backbone:
        return forward(images).float().square().mean()
    return F.cross_entropy(forward(images).float(), labels)


def _flops_per_image(model: torch.nn.Module, resolution: int, backbone: bool, device: torch.device) -> float:
    """Forward + backward FLOPs for one image, on the PyTorch paths (math SDPA, torch anchor mix)."""
    images = torch.randn(1, 3, resolution, resolution, device=device)
    labels = torch.zeros(1, dtype=torch.long, device=device)
    counter = FlopCounterMode(display=False)
    set_backend("torch")
    try:
        with counter, sdpa_kernel(SDPBackend.MATH), torch.autocast(device.type, dtype=torch.bfloat16):
            _loss(_forward(model, backbone), images, labels, backbone).backward()
    finally:
        set_backend(None)
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def measure_training_step(family: str, size: str, resolution: int, batch: int, backbone: bool, backend: str,
                          repeats: int, device: torch.device,
                          timer: Optional[Callable[[Callable[[], None]], float]] = None, compile: bool = False) -> dict:
    """img/s of full training steps, FLOPs per image and the anchor-mix backend the layers ran.

    ``timer(step)`` returns seconds per step (default: median of ``repeats`` after 2 warm-up
    steps); the ``profile`` benchmark passes one that runs the steps under the profiler. With
    ``compile`` the model is torch.compile'd after its FLOPs are counted (the first step compiles)."""
    model = _build(family, size, resolution, backbone, device)
    flops = _flops_per_image(model, resolution, backbone, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    forward = torch.compile(_forward(model, backbone)) if compile else _forward(model, backbone)
    images = torch.randn(batch, 3, resolution, resolution, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = _loss(forward, images, labels, backbone)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    set_backend(backend)
    try:
        calls_before = backend_calls()
        step()
        used = {name: count - calls_before.get(name, 0) for name, count in backend_calls().items()}
        seconds = timer(step) if timer is not None else time_call(step, device, warmup=2, repeats=repeats)
    finally:
        set_backend(None)
    ran = sorted(name for name, count in used.items() if count > 0)
    del model, forward, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"img_s": batch / seconds, "flops": flops, "backends": "+".join(ran) or "-"}


def _rate(images_per_second: float) -> str:
    return f"{images_per_second:.1f}" if images_per_second >= 10 else f"{images_per_second:.3g}"


def _mfu(result: dict, peak: Optional[float]) -> str:
    return f"{100 * result['flops'] * result['img_s'] / peak:.1f} %" if peak else "n/a"


def run(args: argparse.Namespace) -> str:
    """Measure every (size, resolution) pair for both families; return the markdown section."""
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    sizes = args.sizes or (list(SIZES) if on_gpu else ["tiny"])
    tokens_per_step = args.tokens_per_step if args.tokens_per_step is not None else (128 if on_gpu else 2) * 197
    repeats = args.repeats if args.repeats is not None else (10 if on_gpu else 3)
    if tokens_per_step < 1 or repeats < 1:
        raise ValueError("--tokens-per-step and --repeats must be >= 1")
    check_resolutions(args)
    peak = peak_flops(device, args.peak_tflops)
    cases = [(size, res, False) for res in args.resolutions for size in sizes]
    if args.backbone_resolution:
        cases += [(size, args.backbone_resolution, True) for size in backbone_sizes(args, on_gpu)]
    if not cases:
        raise ValueError("nothing to measure: give --resolutions or a --backbone-resolution > 0")
    rows = []
    for size, resolution, backbone in cases:
        batch = max(1, tokens_per_step // tokens_per_image(resolution))
        logger.info("model benchmark: %s at %d px, batch %d%s", size, resolution, batch, " (backbone)" if backbone else "")
        deit, anchor = (measure_training_step(family, size, resolution, batch, backbone, args.backend, repeats, device,
                                              compile=args.compile) for family in ("deit", "anchorformer"))
        ratio = anchor["img_s"] / deit["img_s"]
        target = target_speedup(size, resolution)
        case = f"{size}{' backbone' if backbone else ''} {resolution} px{' compiled' if args.compile else ''}"
        met = record(case, "bare step AF / DeiT img/s", ratio, target, "at_least" if target else None)
        record(case, "DeiT img/s", deit["img_s"])
        record(case, "AnchorFormer img/s", anchor["img_s"])
        if peak:
            mfu_target = TARGET_MFU_BASE if size == "base" and not backbone else None
            record(case, "AnchorFormer MFU", anchor["flops"] * anchor["img_s"] / peak, mfu_target,
                   "at_least" if mfu_target else None)
            record(case, "DeiT MFU", deit["flops"] * deit["img_s"] / peak)
        rows.append([
            size + (" backbone" if backbone else ""), resolution, batch,
            _rate(deit["img_s"]), _rate(anchor["img_s"]), f"{ratio:.2f}x", verdict(met, target, "at_least"),
            f"{deit['flops'] / 1e9:.1f}", f"{anchor['flops'] / 1e9:.1f}", _mfu(deit, peak), _mfu(anchor, peak),
            anchor["backends"],
        ])
    header = ["model", "px", "batch", "DeiT img/s", "AnchorFormer img/s", "ratio", "target",
              "DeiT GFLOP/img", "AF GFLOP/img", "DeiT MFU", "AF MFU", "AF anchor mix"]
    peak_note = f"peak {peak / 1e12:.0f} TFLOP/s bf16" if peak else "no peak known (MFU n/a; pass --peak-tflops)"
    return "\n".join([
        f"## Training throughput: AnchorFormer vs DeiT ({', '.join(f'{res} px' for res in sorted({c[1] for c in cases}))}, "
        f"{device.type})",
        "",
        f"Device: {machine_description(device)}; {peak_note}. One step = forward + backward + AdamW "
        f"under bf16 autocast{' (both models compiled with torch.compile)' if args.compile else ''}, median of {repeats} "
        f"steps; GFLOP/img = forward + backward; "
        f"'AF anchor mix' = the backend(s) the anchor layers ran through anchorformer.kernels "
        f"(requested: {args.backend}; '-': they called the PyTorch anchor_mix directly).",
        "",
        markdown_table(header, rows),
    ])
