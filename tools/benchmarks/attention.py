"""attention: forward+backward time and peak memory of anchor attention vs softmax attention.

Two levels, each against torch's scaled_dot_product_attention (FlashAttention on GPU) with the
same width and heads, in the same run on the same inputs:
- mixing: the token-mixing op alone, ``anchor_mix(qk, U, v)`` vs ``sdpa(q, k, v)`` on
  (B, h, n, dh) tensors. The targets apply here: at base width time <= 0.5x at n=197, <= 0.25x at
  n=785, <= 0.05x at n=4097; at tiny width <= 0.7x at n=197; memory linear in n.
- layer: the whole attention layer (projections included) vs timm's ``Attention``. The
  projections cost the same order for both, so this ratio is bounded below by about
  (3D + 3m) / (4D + 2n) whatever the mixing costs.
"""
import argparse
import logging
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention

from benchmarks.report import machine_description, markdown_table, peak_memory_bytes, time_call
from benchmarks.results import record, verdict
from anchorformer.kernels import anchor_mix_fast, backend_calls, set_backend
from anchorformer.models.anchor_attention import AnchorAttention

_logger = logging.getLogger(__name__)

WIDTHS = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}
# Mixing-op time anchor / SDPA, fwd+bwd, by (width, n): at most these.
TARGETS = {("base", 197): 0.5, ("base", 785): 0.25, ("base", 4097): 0.05, ("tiny", 197): 0.7}


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
    parser.add_argument("--backend", default="auto", choices=["auto", "triton", "compile", "torch"],
                        help="anchor-mix backend (auto: Triton on CUDA, PyTorch elsewhere)")
    parser.add_argument("--section", default=None, help="section of docs/benchmarks.md to write "
                        "(default: attention-DEVICE)")


def _backward_step(forward: Callable[[], torch.Tensor], leaves: List[torch.Tensor]) -> Callable[[], None]:
    def step() -> None:
        forward().float().sum().backward()
        for leaf in leaves:
            leaf.grad = None
    return step


def _mixing_steps(dim: int, heads: int, tokens: int, batch: int, device: torch.device, dtype: torch.dtype,
                  anchors: int = 30) -> Dict[str, Callable[[], None]]:
    head_dim = dim // heads
    shape = (batch, heads, tokens, head_dim)
    qk, v, q, k = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(4))
    u = torch.randn(anchors, head_dim, device=device, dtype=dtype, requires_grad=True)
    scale = head_dim ** -0.5
    return {"anchor": _backward_step(lambda: anchor_mix_fast(qk, u, v, scale), [qk, u, v]),
            "sdpa": _backward_step(lambda: F.scaled_dot_product_attention(q, k, v), [q, k, v])}


def _layer_steps(dim: int, heads: int, tokens: int, batch: int, device: torch.device, dtype: torch.dtype
                 ) -> Dict[str, Callable[[], None]]:
    x = torch.randn(batch, tokens, dim, device=device, requires_grad=True)
    steps = {}
    for name, layer in (("anchor", AnchorAttention(dim, heads, num_anchors=30)),
                        ("sdpa", Attention(dim, heads, qkv_bias=True))):
        layer = layer.to(device)

        def forward(layer: torch.nn.Module = layer) -> torch.Tensor:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                return layer(x)
        steps[name] = _backward_step(forward, [x, *layer.parameters()])
    return steps


def measure_pair(width: str, tokens: int, batch: int, device: torch.device, dtype: torch.dtype,
                 repeats: int) -> Dict[str, float]:
    """Seconds and peak bytes of one fwd+bwd, for the mixing op and the layer, anchor and SDPA."""
    dim, heads = WIDTHS[width]
    torch.manual_seed(0)
    result = {}
    for level, steps in (("mix", _mixing_steps(dim, heads, tokens, batch, device, dtype)),
                         ("layer", _layer_steps(dim, heads, tokens, batch, device, dtype))):
        for name, step in steps.items():
            result[f"{level}_{name}_s"] = time_call(step, device, warmup=3, repeats=repeats, min_seconds=0.5)
            result[f"{level}_{name}_mem"] = peak_memory_bytes(step, device)
    return result


def run(args: argparse.Namespace) -> str:
    """Measure every (width, n) pair and return the markdown section."""
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    batch = args.batch or (32 if on_gpu else 1)
    dtype = getattr(torch, args.dtype or ("bfloat16" if on_gpu else "float32"))
    repeats = args.repeats or (20 if on_gpu else 3)
    set_backend(args.backend)
    rows: List[List[object]] = []
    for width in args.widths:
        smallest = None
        for tokens in sorted(args.tokens):
            r = measure_pair(width, tokens, batch, device, dtype, repeats)
            smallest = smallest or (tokens, r["mix_anchor_mem"])
            mix_ratio = r["mix_anchor_s"] / r["mix_sdpa_s"]
            target = TARGETS.get((width, tokens))
            case = f"{width} n={tokens} B={batch}"
            met = record(case, "mixing anchor / SDPA time", mix_ratio, target, "at_most" if target else None)
            record(case, "mixing anchor ms", r["mix_anchor_s"] * 1e3)
            record(case, "mixing SDPA ms", r["mix_sdpa_s"] * 1e3)
            record(case, "layer anchor / timm Attention time", r["layer_anchor_s"] / r["layer_sdpa_s"])
            mem_growth = (r["mix_anchor_mem"] / smallest[1]) / (tokens / smallest[0])
            record(case, "mixing memory / linear growth", mem_growth)
            rows.append([width, tokens, f"{r['mix_anchor_s'] * 1e3:.3f}", f"{r['mix_sdpa_s'] * 1e3:.3f}",
                         f"{mix_ratio:.3f}", verdict(met, target), f"{r['layer_anchor_s'] / r['layer_sdpa_s']:.3f}",
                         f"{r['mix_anchor_mem'] / 2**20:.1f}", f"{r['mix_sdpa_mem'] / 2**20:.1f}",
                         f"{mem_growth:.2f}", f"{r['layer_anchor_mem'] / max(r['layer_sdpa_mem'], 1):.2f}"])
            _logger.info("attention %s n=%d: %s", width, tokens, rows[-1])
    set_backend(None)
    header = ["width", "n", "mixing: anchor ms", "mixing: SDPA ms", "mixing ratio", "target", "layer ratio",
              "mixing: anchor MiB", "mixing: SDPA MiB", "anchor MiB / linear", "layer memory ratio"]
    backends = ", ".join(f"{k} x{v}" for k, v in sorted(backend_calls().items()))
    return (
        f"## Anchor attention vs SDPA attention ({device.type})\n\n"
        f"`python tools/benchmark.py attention --device {device.type}`: forward + backward, batch {batch}, "
        f"{str(dtype).replace('torch.', '')}, 30 anchors, median of at least {repeats} repeats; anchor-mix "
        f"backend calls: {backends}. Machine: {machine_description(device)}.\n\n"
        "Ratios are anchor / SDPA measured in the same run. *Mixing* is the token-mixing op alone "
        "(the targets apply to it); *layer* adds the input and output projections. "
        "'anchor MiB / linear' is the mixing op's peak memory relative to linear growth from the "
        "smallest n (1.00 = exactly linear).\n\n"
        + markdown_table(header, rows)
    )
