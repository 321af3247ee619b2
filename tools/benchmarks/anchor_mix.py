"""Anchor-mix backends: forward + backward time of eager PyTorch vs torch.compile vs the Triton kernels.

Times ``anchor_mix_fast`` under each backend of ``anchorformer.kernels`` on the (B, h, n, dh)
tensors of one anchor attention layer, and names the backend ``auto`` picks. These numbers are
the evidence behind the dispatcher's defaults (``anchorformer/kernels/dispatch.py``).
"""
import argparse
import logging
import time

import torch

from benchmarks.report import machine_description, markdown_table, time_call
from anchorformer.kernels import anchor_mix_fast, select_backend, set_backend

__all__ = ["add_arguments", "run"]

logger = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_TIMED_BACKENDS = ("torch", "compile", "triton")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the ``anchor-mix`` benchmark; defaults are sized for the device that runs it."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device (default: cuda when available)")
    parser.add_argument("--tokens", type=int, nargs="+", default=None,
                        help="token counts n (default: 197 785 3137 on CUDA, 197 785 on CPU)")
    parser.add_argument("--batch", type=int, default=None, help="batch B (default: 64 on CUDA, 8 on CPU)")
    parser.add_argument("--heads", type=int, default=3, help="heads h")
    parser.add_argument("--head-dim", type=int, default=64, help="head dim dh")
    parser.add_argument("--anchors", type=int, default=30, help="anchors m")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                        help="input dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--section", default=None,
                        help="name of the docs/benchmarks.md section (default: anchor-mix-DEVICE)")


def _time_backend(backend: str, qk: torch.Tensor, anchors: torch.Tensor, v: torch.Tensor, device: torch.device):
    """(seconds of the first call, median seconds per fwd+bwd) or the error that stopped it."""
    leaves = [t.detach().clone().requires_grad_() for t in (qk, anchors, v)]
    grad = torch.randn_like(qk)
    scale = qk.shape[-1] ** -0.5

    def step() -> None:
        anchor_mix_fast(*leaves, scale).backward(grad)

    set_backend(backend)
    try:
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        first = time.perf_counter() - start
        return first, time_call(step, device, warmup=2, repeats=10)
    except (ValueError, RuntimeError) as error:  # a backend this machine cannot run: say why in the table
        logger.warning("anchor-mix backend %s failed: %s", backend, error)
        return str(error).split(";")[0].replace("|", "/")[:120], None
    finally:
        set_backend(None)


def run(args: argparse.Namespace) -> str:
    """Time every backend at every token count; return the markdown section."""
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    tokens_list = args.tokens or ([197, 785, 3137] if on_gpu else [197, 785])
    batch = args.batch if args.batch is not None else (64 if on_gpu else 8)
    dtype = _DTYPES[args.dtype or ("bfloat16" if on_gpu else "float32")]
    if min(tokens_list + [batch, args.heads, args.head_dim, args.anchors]) < 1:
        raise ValueError("--tokens, --batch, --heads, --head-dim and --anchors must all be >= 1")
    rows = []
    for tokens in tokens_list:
        shape = (batch, args.heads, tokens, args.head_dim)
        qk = torch.randn(shape, device=device, dtype=dtype)
        v = torch.randn(shape, device=device, dtype=dtype)
        anchors = torch.randn(args.anchors, args.head_dim, device=device, dtype=dtype)
        timings = {backend: _time_backend(backend, qk, anchors, v, device) for backend in _TIMED_BACKENDS}
        eager = timings["torch"][1]
        row = [tokens]
        for backend in _TIMED_BACKENDS:
            first, median = timings[backend]
            if median is None:
                row += [f"n/a: {first}", "-", "-"]
            else:
                row += [f"{median * 1e3:.3f}", f"{eager / median:.2f}x", f"{first:.1f}"]
        rows.append(row + [select_backend(qk, anchors, v)])
    header = ["n"]
    for backend in _TIMED_BACKENDS:
        header += [f"{backend} ms", f"{backend} speedup", f"{backend} first call s"]
    return "\n".join([
        f"## Anchor-mix backends: eager vs torch.compile vs Triton, fwd+bwd ({device.type})",
        "",
        f"Device: {machine_description(device)}. B={batch}, h={args.heads}, dh={args.head_dim}, "
        f"m={args.anchors}, {str(dtype).removeprefix('torch.')}; median of 10 calls after 2 warm-up calls; "
        "speedup vs eager; 'first call' includes compilation; 'auto' = the dispatcher's choice.",
        "",
        markdown_table(header + ["auto"], rows),
    ])
