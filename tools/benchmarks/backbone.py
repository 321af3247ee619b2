"""Dense-prediction backbone cost: AnchorFormer vs DeiT of the same size (global attention in both),
each as the detection/segmentation stages use it (encoder's last map -> simple feature pyramid),
forward + backward at 512, 800 and 1024 px.

Reports images/s of one forward+backward (sum of squares of all pyramid levels as the loss; no
optimizer step) and the peak memory of that step. bf16 autocast on CUDA, fp32 on CPU. A size that
runs out of memory is reported as OOM instead of failing the run.
"""
import argparse
import logging
from typing import Dict, Optional

import torch

from benchmarks.report import SIZES, machine_description, markdown_table, peak_memory_bytes, time_call
from benchmarks.results import record
from anchorformer.models.backbone import AnchorFormerBackbone

__all__ = ["add_arguments", "run"]

logger = logging.getLogger(__name__)

FAMILIES = ("anchorformer", "deit")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the ``backbone`` benchmark; defaults are sized for the device that runs it."""
    on_gpu = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if on_gpu else "cpu", help="device (default: cuda when available)")
    parser.add_argument("--size", choices=SIZES, default="base" if on_gpu else "tiny",
                        help="model size of both families (default: base on CUDA, tiny on CPU)")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[512, 800, 1024],
                        help="square image sizes in pixels (multiples of 32)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per step (default: 8 on CUDA, 1 on CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps, median reported "
                        "(default: 10 on CUDA, 5 on CPU)")
    parser.add_argument("--section", default=None, help="docs/benchmarks.md section (default: backbone-DEVICE)")


def _measure(family: str, size: str, resolution: int, batch: int, repeats: int, device: torch.device
             ) -> Optional[Dict[str, float]]:
    """img/s and peak bytes of forward+backward, or None when the device runs out of memory."""
    backbone = AnchorFormerBackbone(f"{family}_{size}_patch16_224", img_size=resolution).to(device).train()
    images = torch.randn(batch, 3, resolution, resolution, device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = sum(level.float().square().mean() for level in backbone(images).values())
        loss.backward()
        backbone.zero_grad(set_to_none=True)

    try:
        seconds = time_call(step, device, warmup=2, repeats=repeats)
        peak = peak_memory_bytes(step, device)
    except torch.cuda.OutOfMemoryError:
        logger.warning("%s-%s at %d px, batch %d: out of memory", family, size, resolution, batch)
        return None
    finally:
        del backbone
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"img_s": batch / seconds, "peak": peak}


def run(args: argparse.Namespace) -> str:
    """Measure both families at every resolution; return the markdown section."""
    device = torch.device(args.device)
    batch = args.batch_size or (8 if device.type == "cuda" else 1)
    repeats = args.repeats or (10 if device.type == "cuda" else 5)
    bad = [r for r in args.resolutions if r < 32 or r % 32]
    if bad or batch < 1 or repeats < 1:
        raise ValueError(f"resolutions must be multiples of 32 (got {bad}), --batch-size and --repeats >= 1")
    rows = []
    for resolution in args.resolutions:
        results = {family: _measure(family, args.size, resolution, batch, repeats, device) for family in FAMILIES}
        ours, deit = results["anchorformer"], results["deit"]
        cells = [f"{r['img_s']:.2f}" if r else "OOM" for r in (ours, deit)]
        cells += [f"{r['peak'] / 2**30:.2f}" if r else "OOM" for r in (ours, deit)]
        speedup = f"{ours['img_s'] / deit['img_s']:.2f}x" if ours and deit else "n/a"
        memory = f"{ours['peak'] / deit['peak']:.2f}x" if ours and deit else "n/a"
        case = f"{args.size} backbone {resolution} px batch {batch}"
        for family, result in results.items():
            if result:
                record(case, f"{family} img/s", result["img_s"])
                record(case, f"{family} peak GiB", result["peak"] / 2**30)
        if ours and deit:
            record(case, "AF / DeiT img/s", ours["img_s"] / deit["img_s"])
            record(case, "AF / DeiT peak memory", ours["peak"] / deit["peak"])
        rows.append([resolution, (resolution // 16) ** 2, *cells, speedup, memory])
        logger.info("backbone %s at %d px: %s", args.size, resolution, rows[-1])
    header = ["px", "tokens", "AnchorFormer img/s", "DeiT img/s", "AnchorFormer peak GiB", "DeiT peak GiB",
              "speed ratio", "memory ratio"]
    return "\n".join([
        f"## Dense backbone ({args.size}): AnchorFormer vs DeiT, forward + backward",
        "",
        f"{machine_description(device)}; batch {batch}; {'bf16 autocast' if device.type == 'cuda' else 'fp32'}; "
        "encoder + simple feature pyramid (strides 4-32) as in the detection/segmentation stages, global "
        "attention in both (DeiT: SDPA). Peak memory of one forward+backward above the weights.",
        "",
        markdown_table(header, rows),
    ])
