"""attention: forward+backward time and peak memory of AnchorAttention vs full softmax attention.

The baseline is timm's ``Attention`` (one qkv projection, torch's scaled_dot_product_attention:
FlashAttention on GPU) with the same width and heads, measured in the same run on the same
inputs; the table reports our time and memory as ratios of the baseline's. Targets (issue 2):
time <= 0.7x at n=197, <= 0.3x at n=785, <= 0.05x at n=4097; memory linear in n.
"""
import argparse
import logging
from typing import Callable, Dict, List

import torch
from timm.models.vision_transformer import Attention

from anchorformer.benchmarks.report import machine_description, markdown_table, peak_memory_bytes, time_call
from anchorformer.models.anchor_attention import AnchorAttention

_logger = logging.getLogger(__name__)

WIDTHS = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}
TARGETS = {197: 0.7, 785: 0.3, 4097: 0.05}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the attention benchmark."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, nargs="+", default=[197, 577, 785, 3137, 4097],
                        help="sequence lengths n (cls token + patches)")
    parser.add_argument("--widths", nargs="+", default=["tiny", "base"], choices=sorted(WIDTHS))
    parser.add_argument("--batch", type=int, default=None,
                        help="images per step (default: 32 on GPU, 1 on CPU)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="autocast dtype (default: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default: 20 GPU, 3 CPU)")
    parser.add_argument("--section", default="attention", help="section of docs/benchmarks.md to write")


def _fwd_bwd(layer: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype) -> Callable[[], None]:
    def step() -> None:
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = layer(x)
        out.float().sum().backward()
        x.grad = None
        for p in layer.parameters():
            p.grad = None
    return step


def measure_pair(width: str, tokens: int, batch: int, device: torch.device, dtype: torch.dtype,
                 repeats: int) -> Dict[str, float]:
    """Time (s) and peak memory (bytes) of one fwd+bwd of both layers on the same input."""
    dim, heads = WIDTHS[width]
    torch.manual_seed(0)
    layers = {"anchor": AnchorAttention(dim, heads, num_anchors=30).to(device),
              "sdpa": Attention(dim, heads, qkv_bias=True).to(device)}
    x = torch.randn(batch, tokens, dim, device=device, requires_grad=True)
    result = {}
    for name, layer in layers.items():
        step = _fwd_bwd(layer, x, dtype)
        result[f"{name}_s"] = time_call(step, device, warmup=3, repeats=repeats, min_seconds=0.5)
        result[f"{name}_mem"] = peak_memory_bytes(step, device)
    return result


def run(args: argparse.Namespace) -> str:
    """Measure every (width, n) pair and return the markdown section."""
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    batch = args.batch or (32 if on_gpu else 1)
    dtype = getattr(torch, args.dtype or ("bfloat16" if on_gpu else "float32"))
    repeats = args.repeats or (20 if on_gpu else 3)
    rows: List[List[object]] = []
    for width in args.widths:
        smallest = None
        for tokens in sorted(args.tokens):
            r = measure_pair(width, tokens, batch, device, dtype, repeats)
            smallest = smallest or (tokens, r["anchor_mem"])
            time_ratio = r["anchor_s"] / r["sdpa_s"]
            target = TARGETS.get(tokens)
            verdict = "" if target is None else ("met" if time_ratio <= target else f"missed (target {target}x)")
            mem_growth = (r["anchor_mem"] / smallest[1]) / (tokens / smallest[0])
            rows.append([width, tokens, f"{r['anchor_s'] * 1e3:.2f}", f"{r['sdpa_s'] * 1e3:.2f}",
                         f"{time_ratio:.3f}", verdict, f"{r['anchor_mem'] / 2**20:.1f}",
                         f"{r['sdpa_mem'] / 2**20:.1f}", f"{r['anchor_mem'] / max(r['sdpa_mem'], 1):.3f}",
                         f"{mem_growth:.2f}"])
            _logger.info("attention %s n=%d: %s", width, tokens, rows[-1])
    header = ["width", "n", "anchor ms", "SDPA ms", "time ratio", "target", "anchor MiB", "SDPA MiB",
              "memory ratio", "anchor memory / linear"]
    return (
        f"## Anchor attention vs SDPA attention ({device.type})\n\n"
        f"`python tools/benchmark.py attention --device {device.type}`: one layer, forward + backward, "
        f"batch {batch}, {str(dtype).replace('torch.', '')}, 30 anchors, median of {repeats} repeats. "
        f"Machine: {machine_description(device)}.\n"
        "Ratios are anchor / SDPA measured in the same run. The last column is the anchor layer's "
        "peak memory relative to linear growth from the smallest n (1.00 = exactly linear).\n\n"
        + markdown_table(header, rows)
    )
