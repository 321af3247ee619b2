"""Anchor-mix backends: forward + backward time of every backend, and auto against the best one.

Times ``anchor_mix_fast`` under each backend of ``anchorformer.kernels`` on the (B, h, n, dh)
tensors of one anchor attention layer: eager PyTorch, torch.compile of it, the two
scaled-dot-product attention calls (``sdpa``) and the Triton kernels under each of their launch
plans (``one-program``, ``token-split``). Then ``auto``: its first call times the backends that can
run there (``anchorformer/kernels/autotune.py``; the table shows what it measured and chose), and
it is timed against every backend forced by hand, all taking turns call by call so that a loaded
machine slows each alike (least times, as auto's own measurement). Target (issue 21): auto within 5 % of the best forced backend at
every shape, on every device. These numbers are the evidence behind the dispatcher's defaults
(``anchorformer/kernels/dispatch.py``) and the kernels' plan rule (``_splits_tokens`` in
``anchorformer/kernels/anchor_mix_triton.py``: run at several ``--batch`` values to see where the
plans cross).

On CUDA it also sums the GPU time of the auto path's kernels over one fwd+bwd (torch.profiler) and
compares it with the HBM floor: the op must read qk and v and write the output forward, and read
grad_out, qk, v and write dqk, dv backward, eight (B, h, n, dh) tensors in all, at the device's
memory bandwidth. Target: GPU time within 3x of that floor.
"""
import argparse
import contextlib
import logging
from typing import Callable, Iterator, Optional

import torch

from benchmarks.report import alternating_least, machine_description, markdown_table, seconds, time_call
from benchmarks.results import record, verdict
from anchorformer.kernels import anchor_mix_fast, autotune, set_backend

__all__ = ["add_arguments", "run"]

logger = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# (backend, the kernels' launch plan) pairs, each timed at every n
_TIMED = (("torch", None), ("compile", None), ("sdpa", None), ("triton", "one-program"), ("triton", "token-split"))
# HBM bandwidth (TB/s) by device-name fragment, most specific first.
HBM_TBPS = (("H100 PCIe", 2.0), ("H100", 3.35), ("H200", 4.8), ("A100", 2.0))
# (B, h, n, dh) tensors the op must move at least once: qk, v, out forward; grad_out, qk, v, dqk, dv backward.
_TENSORS_MOVED = 8
# The auto path's GPU time over one fwd+bwd: at most this multiple of the HBM floor.
TARGET_FLOOR_RATIO = 3.0
# auto's time over the best backend forced by hand (least of calls taking turns): at most this.
TARGET_AUTO_RATIO = 1.05
_TURNS = 20  # timed calls of each step in the auto-vs-forced comparison


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
    parser.add_argument("--hbm-tbps", type=float, default=None,
                        help="memory bandwidth for the HBM floor, TB/s (default: known from the GPU's name)")
    parser.add_argument("--section", default=None,
                        help="name of the docs/benchmarks.md section (default: anchor-mix-DEVICE)")


@contextlib.contextmanager
def _kernel_plan(plan: Optional[str]) -> Iterator[None]:
    """The Triton kernels' launch plan forced to ``plan`` inside (None: left as it is)."""
    if plan is None:
        yield
        return
    from anchorformer.kernels import anchor_mix_triton  # imports triton

    previous = anchor_mix_triton.requested_plan()
    anchor_mix_triton.set_plan(plan)
    try:
        yield
    finally:
        anchor_mix_triton.set_plan(previous)


def _auto_plan(qk: torch.Tensor, anchors: torch.Tensor, backend: str) -> str:
    """The launch plan the kernels take for these inputs when ``backend`` is theirs, else '-'."""
    if backend != "triton":
        return "-"
    from anchorformer.kernels import anchor_mix_triton

    return anchor_mix_triton.plan_name(qk, anchors)


def _fwd_bwd(qk: torch.Tensor, anchors: torch.Tensor, v: torch.Tensor) -> Callable[[], None]:
    """One forward + backward of ``anchor_mix_fast`` on leaves cloned from these tensors."""
    leaves = [t.detach().clone().requires_grad_() for t in (qk, anchors, v)]
    grad = torch.randn_like(qk)
    scale = qk.shape[-1] ** -0.5

    def step() -> None:
        anchor_mix_fast(*leaves, scale).backward(grad)

    return step


def _forced(backend: str, plan: Optional[str], step: Callable[[], None]) -> Callable[[], None]:
    """``step`` with the backend (``auto`` too) and the kernels' launch plan (None: left alone) forced."""
    def call() -> None:
        set_backend(backend)
        try:
            with _kernel_plan(plan):
                step()
        finally:
            set_backend(None)

    return call


def _time_backend(backend: str, plan: Optional[str], qk: torch.Tensor, anchors: torch.Tensor, v: torch.Tensor,
                  device: torch.device):
    """(seconds of the first call, median seconds per fwd+bwd) or the error that stopped it;
    ``plan`` forces the kernels' launch plan (None for the other backends)."""
    step = _forced(backend, plan, _fwd_bwd(qk, anchors, v))
    try:
        first = seconds(step, device)
        return first, time_call(step, device, warmup=2, repeats=10)
    except (ImportError, ValueError, RuntimeError) as error:  # a backend this machine cannot run: say why
        logger.warning("anchor-mix backend %s (plan %s) failed: %s", backend, plan, error)
        return str(error).split(";")[0].replace("|", "/")[:120], None


def _train_decision(qk: torch.Tensor, anchors: torch.Tensor) -> dict:
    """auto's decision for a forward + backward of these shapes, as ``autotune.decisions`` lists it."""
    batch, heads, tokens, head_dim = qk.shape
    key = {"batch": batch, "heads": heads, "tokens": tokens, "head_dim": head_dim, "anchors": anchors.shape[0],
           "dtype": str(qk.dtype).removeprefix("torch."), "device": qk.device.type, "train": True}
    return next(d for d in autotune.decisions() if all(d[name] == value for name, value in key.items()))


def _hbm_bytes_per_s(device: torch.device, override_tbps: Optional[float]) -> Optional[float]:
    if override_tbps:
        return override_tbps * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tbps * 1e12 for fragment, tbps in HBM_TBPS if fragment in name), None)


def _gpu_seconds(qk: torch.Tensor, anchors: torch.Tensor, v: torch.Tensor) -> float:
    """GPU kernel time of one fwd+bwd of the auto path (CUDA only): the sum over its kernels."""
    from torch.profiler import ProfilerActivity, profile

    leaves = [t.detach().clone().requires_grad_() for t in (qk, anchors, v)]
    grad = torch.randn_like(qk)
    for _ in range(2):  # warm-up: compiled kernels, cached plans
        anchor_mix_fast(*leaves, qk.shape[-1] ** -0.5).backward(grad)
    torch.cuda.synchronize(qk.device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        anchor_mix_fast(*leaves, qk.shape[-1] ** -0.5).backward(grad)
        torch.cuda.synchronize(qk.device)
    return sum(event.self_device_time_total for event in prof.key_averages()) / 1e6


def _label(backend: str, plan: Optional[str]) -> str:
    return backend if plan is None else f"{backend} {plan}"


def _auto_against_forced(case: str, qk: torch.Tensor, anchors: torch.Tensor, v: torch.Tensor, timings: list,
                         device: torch.device) -> tuple[list[str], str]:
    """auto's first call (its measurement), then auto and every forced backend that ran taking
    turns; the cells of its row after n, and auto's choice."""
    step = _fwd_bwd(qk, anchors, v)
    auto = _forced("auto", None, step)
    measured_in = seconds(auto, device)
    decision = _train_decision(qk, anchors)
    ran = {_label(*pair): _forced(*pair, step) for pair, (_, median) in zip(_TIMED, timings) if median is not None}
    least = alternating_least({"auto": auto, **ran}, device, _TURNS)
    auto_s = least.pop("auto")
    best = min(least, key=least.get)
    met = record(case, "auto / best forced fwd+bwd", auto_s / least[best], TARGET_AUTO_RATIO, "at_most")
    record(case, "auto fwd+bwd ms", auto_s * 1e3)
    record(case, "auto first call s", measured_in)
    timed = ", ".join(f"{name} {'failed' if ms is None else f'{ms:.3f}'}" for name, ms in decision["ms"].items())
    return [timed, decision["choice"], f"{measured_in:.2f}", best, f"{auto_s * 1e3:.3f}", f"{least[best] * 1e3:.3f}",
            f"{auto_s / least[best]:.3f}", verdict(met, TARGET_AUTO_RATIO)], decision["choice"]


def run(args: argparse.Namespace) -> str:
    """Time every backend and auto at every token count; return the markdown section."""
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    tokens_list = args.tokens or ([197, 785, 3137] if on_gpu else [197, 785])
    batch = args.batch if args.batch is not None else (64 if on_gpu else 8)
    dtype = _DTYPES[args.dtype or ("bfloat16" if on_gpu else "float32")]
    if min(tokens_list + [batch, args.heads, args.head_dim, args.anchors]) < 1:
        raise ValueError("--tokens, --batch, --heads, --head-dim and --anchors must all be >= 1")
    rows, auto_rows, all_timings = [], [], []
    for tokens in tokens_list:
        shape = (batch, args.heads, tokens, args.head_dim)
        qk = torch.randn(shape, device=device, dtype=dtype)
        v = torch.randn(shape, device=device, dtype=dtype)
        anchors = torch.randn(args.anchors, args.head_dim, device=device, dtype=dtype)
        timings = [_time_backend(backend, plan, qk, anchors, v, device) for backend, plan in _TIMED]
        all_timings.append(timings)
        case = f"n={tokens} B={batch} h={args.heads} dh={args.head_dim}"
        for (backend, forced), (_, median) in zip(_TIMED, timings):
            if median is not None:
                record(case, f"{_label(backend, forced)} fwd+bwd ms", median * 1e3)

        auto_row, auto = _auto_against_forced(case, qk, anchors, v, timings, device)
        auto_rows.append([tokens] + auto_row)
        plan = _auto_plan(qk, anchors, auto)
        floor_cells = ["-", "-", "-"]
        bandwidth = _hbm_bytes_per_s(device, args.hbm_tbps)
        if on_gpu and bandwidth:
            floor = _TENSORS_MOVED * qk.numel() * qk.element_size() / bandwidth
            gpu = _gpu_seconds(qk, anchors, v)
            met = record(case, "auto GPU time / HBM floor", gpu / floor, TARGET_FLOOR_RATIO, "at_most")
            floor_cells = [f"{gpu * 1e3:.3f}", f"{floor * 1e3:.3f}",
                           f"{gpu / floor:.1f}x, {verdict(met, TARGET_FLOOR_RATIO)}"]
        rows.append([auto, plan, *floor_cells])
    # a backend that ran nowhere (the kernels on a CPU) gets a sentence instead of a column of reasons
    shown = [j for j in range(len(_TIMED)) if any(timings[j][1] is not None for timings in all_timings)]
    not_run = [f"{_label(*_TIMED[j])} ({all_timings[0][j][0]})" for j in range(len(_TIMED)) if j not in shown]
    for i, (tokens, timings) in enumerate(zip(tokens_list, all_timings)):
        eager = timings[0][1]
        cells = []
        for j in shown:
            first, median = timings[j]
            cells += ["n/a", "-", "-"] if median is None else [f"{median * 1e3:.3f}", f"{eager / median:.2f}x",
                                                               f"{first:.1f}"]
        rows[i] = [tokens, *cells, *rows[i]]
    header = ["n"]
    for backend, plan in (_TIMED[j] for j in shown):
        label = _label(backend, plan)
        header += [f"{label} ms", f"{label} speedup", f"{label} first call s"]
    return "\n".join([
        f"## Anchor-mix backends: eager, torch.compile, SDPA, Triton and auto, fwd+bwd ({device.type})",
        "",
        f"Device: {machine_description(device)}. B={batch}, h={args.heads}, dh={args.head_dim}, "
        f"m={args.anchors}, {str(dtype).removeprefix('torch.')}; median of 10 calls after 2 warm-up calls; "
        "speedup vs eager; 'first call' includes compilation; sdpa = two scaled-dot-product attention calls; "
        "'auto' = the backend auto chose; 'plan' = the kernels' launch plan under auto (one-program: one launch "
        "forward, two backward; token-split: three and four). 'GPU ms' sums the auto path's kernels over one "
        f"fwd+bwd (CUDA); 'HBM floor' moves its {_TENSORS_MOVED} (B, h, n, dh) tensors once at the device's "
        "bandwidth." + (f" Not run on this device: {'; '.join(not_run)}." if not_run else ""),
        "",
        markdown_table(header + ["auto", "plan", "auto GPU ms", "HBM floor ms", "GPU / floor"], rows),
        "",
        "auto against the fastest backend forced by hand: 'auto timed' = the least ms per fwd+bwd of each "
        "candidate as auto's first call measured them (kernels/autotune.py, at most "
        f"{autotune.BUDGET_S:g} s of rounds), 'first call s' = that call; then auto and every backend that ran "
        f"take turns, {_TURNS} timed calls each after 2 warm-up turns: the least time of each, the best forced "
        "one shown.",
        "",
        markdown_table(["n", "auto timed, ms", "auto", "first call s", "best forced", "auto ms", "best forced ms",
                        "auto / best", "target"], auto_rows),
    ])
