"""Fused Triton kernels for anchor attention's mixing step, forward and backward.

For one (batch, head) with tokens ``X = qk`` (n, d), anchors ``U`` (m, d), values ``V`` (n, d) and
``s = scale`` the forward is (see ``anchorformer.kernels.reference.anchor_mix``)::

    L = s X U^T (n, m);  A = softmax_rows(L);  Lambda = 1^T A (m,);  inv = 1/Lambda (0 where 0)
    P = A^T V (m, d);    C = diag(inv) P;      O = A C (n, d)

Backward, with ``G = dL/dO`` (n, d). Through ``O = A C``: ``dC = A^T G`` and ``dA = G C^T``.
Through ``C = diag(inv) P``: ``dP = diag(inv) dC =: D`` and ``dinv_j = <dC_j, P_j>``. Through
``inv = 1/Lambda``: ``dLambda_j = -inv_j^2 dinv_j = -inv_j <dC_j, C_j> = -<D_j, C_j> =: -w_j``
(0 for an anchor of zero degree, as the forward's guard makes ``inv`` constant there). Through
``P = A^T V``: ``dA += V D^T`` and ``dV = A D``. Through ``Lambda = 1^T A``: ``dA -= 1 w^T``. So::

    dA = G C^T + V D^T - 1 w^T                     (n, m)
    dL = A * (dA - rowsum(A * dA))                  softmax backward, row-wise
    dX = s dL U;   dU = s sum_{batch, head} dL^T X;   dV = A D

Each direction is two passes over a head's tokens, the second recomputing ``A`` (n x m, cheap)
instead of storing it: pass 1 accumulates the (m, d) sums ``Lambda`` and ``P = A^T V`` (forward)
or ``dC = A^T G`` (backward); from them come the (m, d) tiles ``C`` and ``inv`` (kept for the
backward), or ``D`` and ``w``; pass 2 writes ``O``, or ``dX``, ``dV`` and a partial ``dU``.
``dU``'s sum over the partials is one torch reduction (plus a cast where the anchors are 16-bit).
Two launch plans run these passes (:func:`plan_name` says which one a call takes):

* ``one-program``: one program per (b, h) keeps the running (m, d) sums in fp32 registers and
  runs both passes itself, so the forward is ONE launch (``_one_program_forward_kernel``) and the
  backward two (``_one_program_backward_kernel`` and the dU sum).
* ``token-split``: each pass spreads a head's tokens over several programs, for when B*h programs
  cannot fill the GPU (:func:`_splits_tokens`). Forward: ``_gather_kernel`` (partial sums per
  split) -> ``_finish_forward_kernel`` (adds them, deterministic, no atomics; forms inv and C) ->
  ``_scatter_kernel``; backward: ``_gather_kernel`` on G -> ``_finish_backward_kernel`` (D, w) ->
  ``_token_split_backward_kernel`` -> the dU sum. Three launches and four.

``auto`` picks per call shape (plans are cached per shape, dtype and device);
``$ANCHORFORMER_ANCHOR_MIX_PLAN`` (read once, at import) or :func:`set_plan` force one, which is
how ``tools/benchmark.py anchor-mix`` times both.

Precision: inputs in bf16/fp16/fp32; logits, softmax, ``Lambda``, ``C``, ``D`` and all
accumulators in fp32. As in the reference, ``U`` is rounded to the tokens' dtype (on load, so fp32
anchors under autocast need no cast kernel), and ``A``, ``C`` and ``D`` are rounded to it before
the token-long products (tensor cores); fp32 inputs use exact fp32 products ("ieee"). Anchors are
padded to a power of two (at least 16, ``tl.dot``'s minimum) and masked: a padded anchor has logit
-inf, so ``A`` is 0 there and so are its ``C``, ``D`` and gradients. The padded (m, dh) tile is
bounded per dtype (``_LIMITS``) so that every kernel fits in 100 KB of shared memory;
:func:`unsupported_reason` names the inputs outside those bounds (the dispatcher then uses the
PyTorch path).
"""
import functools
import math
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

__all__ = ["PLANS", "PLAN_ENV_VAR", "set_plan", "requested_plan", "plan_name", "unsupported_reason", "forward",
           "backward", "forward_outputs_like", "token_major_like", "ForwardState"]

_NUM_WARPS = 4


class _TileLimits(NamedTuple):
    """Per input dtype: tokens per block, and the largest padded anchor tile (BLOCK_M * BLOCK_D
    elements, BLOCK_D) that keeps every kernel under 100 KB of shared memory. Compiled for sm_90
    at the largest tiles (``test_kernels_compile_for_hopper_within_shared_memory_budget``), bytes:

        16-bit, (32, 128), 64 tokens (16-bit or fp32 anchors alike): one-program forward 40960,
            one-program backward 90112; gather 40960, scatter 32768, token-split backward 90112,
            the finish kernels 128
        fp32, (32, 64), 32 tokens: one-program forward 45568, one-program backward 81920;
            gather 45568, scatter 24576, token-split backward 81920, the finish kernels 256

    So a one-program kernel needs no more than the largest split kernel it fuses. At the models'
    tile (dh=64, m=30) no kernel spills registers; at dh=128 both backward kernels do (a few
    hundred bytes, as the token-split backward did before the one-program plan)."""

    block_n: int
    max_tile: int
    max_block_d: int


_LIMITS = {
    torch.bfloat16: _TileLimits(block_n=64, max_tile=4096, max_block_d=128),
    torch.float16: _TileLimits(block_n=64, max_tile=4096, max_block_d=128),
    torch.float32: _TileLimits(block_n=32, max_tile=2048, max_block_d=64),
}
# Programs per streaming multiprocessor that the token split aims for: enough to hide latency.
_PROGRAMS_PER_SM = 4
# The one-program plan runs where B*h programs are at least this many per SM (and wherever a
# head has a single token block). A first estimate, not a measurement: re-measure it on each GPU
# with `tools/benchmark.py anchor-mix`, which times both plans (see _splits_tokens).
_ONE_PROGRAM_MIN_PROGRAMS_PER_SM = 1.0
# The CPU interpreter plans as if for a GPU of this many SMs: the token split then gets several
# splits at the tests' small shapes, which keeps its partial-sum reduction exercised.
_INTERPRETER_MULTIPROCESSORS = 2

PLANS = ("auto", "one-program", "token-split")
PLAN_ENV_VAR = "ANCHORFORMER_ANCHOR_MIX_PLAN"


def _check_plan(name: str, source: str) -> str:
    if name not in PLANS:
        raise ValueError(f"unknown anchor-mix kernel plan {name!r} from {source}; choose from {list(PLANS)}")
    return name


def _plan_from_environment() -> str:
    return _check_plan(os.environ.get(PLAN_ENV_VAR, "auto"), f"${PLAN_ENV_VAR}")


_requested_plan = _plan_from_environment()  # read once, at import: no per-call lookup


def set_plan(name: str) -> None:
    """Force the kernels' launch plan for this process (benchmarks time each), or ``auto``.

    Args:
        name: one of ``PLANS``.
    """
    global _requested_plan
    _requested_plan = _check_plan(name, "set_plan()")


def requested_plan() -> str:
    """The launch plan asked for: :func:`set_plan`'s, else that of ``$ANCHORFORMER_ANCHOR_MIX_PLAN``
    at import, else ``auto``."""
    return _requested_plan


@triton.jit
def _assignment(x, u_t, scale, anchor_valid, token_valid, DOT_PRECISION: tl.constexpr):
    """A for one token block: softmax over anchors of ``x @ U^T * scale`` in fp32, 0 on padding."""
    logits = tl.dot(x, u_t, input_precision=DOT_PRECISION) * scale
    logits = tl.where(anchor_valid[None, :], logits, float("-inf"))
    shifted = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    assign = shifted / tl.sum(shifted, axis=1)[:, None]
    return tl.where(token_valid[:, None], assign, 0.0)


@triton.jit
def _load_anchors(u_ptr, stride_rows, stride_cols, rows, cols, dtype: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """U (m, dh), or U^T with rows and columns swapped, as a zero-padded (BLOCK_R, BLOCK_C) tile
    rounded to ``dtype`` (the tokens'). Loading U^T as such, not ``tl.trans(U)``, saves registers."""
    offs_r = tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    mask = (offs_r < rows)[:, None] & (offs_c < cols)[None, :]
    tile = tl.load(u_ptr + offs_r[:, None] * stride_rows + offs_c[None, :] * stride_cols, mask=mask, other=0.0)
    return tile.to(dtype)


@triton.jit
def _head(ptr, bh, heads, stride_b, stride_h):
    """Start of the (n, dh) slice of (b, h) = divmod(bh, heads) in a (B, h, n, dh) tensor."""
    return ptr + (bh // heads).to(tl.int64) * stride_b + (bh % heads).to(tl.int64) * stride_h


@triton.jit
def _tokens(first_token, block, n_tokens, head_dim, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Token indices of block ``block`` after ``first_token``, and the mask of its (BLOCK_N, BLOCK_D) tile."""
    tokens = first_token + block * BLOCK_N + tl.arange(0, BLOCK_N)
    return tokens, (tokens < n_tokens)[:, None] & (tl.arange(0, BLOCK_D) < head_dim)[None, :]


@triton.jit
def _tile(head, tokens, stride_n, stride_d, BLOCK_D: tl.constexpr):
    """Pointers to a (tokens, BLOCK_D) tile of a strided (n, dh) slice. Row pointers first, then
    columns: adding one (BLOCK_N, BLOCK_D) offset tensor instead costs ~50 more registers on sm_90."""
    return head + tokens[:, None] * stride_n + tl.arange(0, BLOCK_D)[None, :] * stride_d


@triton.jit
def _state(bh, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Offsets of row ``bh``'s padded (BLOCK_M, BLOCK_D) tile in a (rows, BLOCK_M, BLOCK_D) fp32 buffer."""
    start = bh.to(tl.int64) * BLOCK_M * BLOCK_D
    return start + tl.arange(0, BLOCK_M)[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]


@triton.jit
def _gather_blocks(x_head, y_head, u_t, scale, first_token, n_blocks, n_tokens, n_anchors, head_dim,
                   stride_xn, stride_xd, stride_yn, stride_yd,
                   BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``A^T Y`` (BLOCK_M, BLOCK_D) and ``1^T A`` (BLOCK_M,), fp32, over ``n_blocks`` token blocks."""
    anchor_valid = tl.arange(0, BLOCK_M) < n_anchors
    gathered = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    degree = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for block in range(n_blocks):
        tokens, mask = _tokens(first_token, block, n_tokens, head_dim, BLOCK_N, BLOCK_D)
        x = tl.load(_tile(x_head, tokens, stride_xn, stride_xd, BLOCK_D), mask=mask, other=0.0)
        y = tl.load(_tile(y_head, tokens, stride_yn, stride_yd, BLOCK_D), mask=mask, other=0.0)
        assign = _assignment(x, u_t, scale, anchor_valid, tokens < n_tokens, DOT_PRECISION)
        degree += tl.sum(assign, axis=0)
        gathered += tl.dot(tl.trans(assign.to(y.dtype)), y, input_precision=DOT_PRECISION)
    return gathered, degree


@triton.jit
def _context(gathered, degree):
    """``C = diag(inv) A^T V`` and ``inv = 1/Lambda`` (0 where Lambda = 0)."""
    positive = degree > 0
    inv_degree = tl.where(positive, 1.0 / tl.where(positive, degree, 1.0), 0.0)
    return gathered * inv_degree[:, None], inv_degree


@triton.jit
def _context_gradient(d_context, inv_degree, context):
    """``D = diag(inv) A^T G`` and ``w_j = <D_j, C_j>`` from ``dC = A^T G``."""
    d_gathered = d_context * inv_degree[:, None]
    return d_gathered, tl.sum(d_gathered * context, axis=1)


@triton.jit
def _scatter_blocks(x_head, out_head, u_t, context, scale, first_token, n_blocks, n_tokens, n_anchors, head_dim,
                    stride_xn, stride_xd, stride_on, stride_od,
                    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Writes ``A C`` over ``n_blocks`` token blocks; ``context`` is C in the tokens' dtype."""
    anchor_valid = tl.arange(0, BLOCK_M) < n_anchors
    for block in range(n_blocks):
        tokens, mask = _tokens(first_token, block, n_tokens, head_dim, BLOCK_N, BLOCK_D)
        x = tl.load(_tile(x_head, tokens, stride_xn, stride_xd, BLOCK_D), mask=mask, other=0.0)
        assign = _assignment(x, u_t, scale, anchor_valid, tokens < n_tokens, DOT_PRECISION)
        out = tl.dot(assign.to(x.dtype), context, input_precision=DOT_PRECISION)
        tl.store(_tile(out_head, tokens, stride_on, stride_od, BLOCK_D), out.to(out_head.dtype.element_ty), mask=mask)


@triton.jit
def _backward_blocks(x_head, v_head, g_head, dx_head, dv_head, u, context, d_gathered, weight, scale,
                     first_token, n_blocks, n_tokens, n_anchors, head_dim,
                     stride_xn, stride_xd, stride_vn, stride_vd, stride_gn, stride_gd,
                     stride_dxn, stride_dxd, stride_dvn, stride_dvd,
                     BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Writes dX and dV over ``n_blocks`` token blocks and returns their ``s dL^T X`` (fp32).
    ``context`` (C) and ``d_gathered`` (D) are in the tokens' dtype, ``weight`` (w) in fp32."""
    anchor_valid = tl.arange(0, BLOCK_M) < n_anchors
    u_t = tl.trans(u)
    du = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for block in range(n_blocks):
        tokens, mask = _tokens(first_token, block, n_tokens, head_dim, BLOCK_N, BLOCK_D)
        x = tl.load(_tile(x_head, tokens, stride_xn, stride_xd, BLOCK_D), mask=mask, other=0.0)
        v = tl.load(_tile(v_head, tokens, stride_vn, stride_vd, BLOCK_D), mask=mask, other=0.0)
        g = tl.load(_tile(g_head, tokens, stride_gn, stride_gd, BLOCK_D), mask=mask, other=0.0)
        assign = _assignment(x, u_t, scale, anchor_valid, tokens < n_tokens, DOT_PRECISION)
        d_assign = tl.dot(g, tl.trans(context), input_precision=DOT_PRECISION)
        d_assign += tl.dot(v, tl.trans(d_gathered), input_precision=DOT_PRECISION)
        d_assign -= weight[None, :]
        d_logits = assign * (d_assign - tl.sum(assign * d_assign, axis=1)[:, None])
        d_logits_lp = d_logits.to(u.dtype)
        dx = tl.dot(d_logits_lp, u, input_precision=DOT_PRECISION) * scale
        dv = tl.dot(assign.to(u.dtype), d_gathered, input_precision=DOT_PRECISION)
        du += tl.dot(tl.trans(d_logits_lp), x, input_precision=DOT_PRECISION)
        tl.store(_tile(dx_head, tokens, stride_dxn, stride_dxd, BLOCK_D), dx.to(dx_head.dtype.element_ty), mask=mask)
        tl.store(_tile(dv_head, tokens, stride_dvn, stride_dvd, BLOCK_D), dv.to(dv_head.dtype.element_ty), mask=mask)
    return du * scale


@triton.jit
def _store_anchor_gradient(du_ptr, row, du, n_anchors, head_dim, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Row ``row`` of the (rows, m, dh) fp32 partial dU, without the padding."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < n_anchors)[:, None] & (offs_d < head_dim)[None, :]
    tl.store(du_ptr + row.to(tl.int64) * n_anchors * head_dim + offs_m[:, None] * head_dim + offs_d[None, :], du,
             mask=mask)


@triton.jit
def _one_program_forward_kernel(
    x_ptr, v_ptr, u_ptr, out_ptr, context_ptr, inv_degree_ptr,
    heads, n_tokens, n_anchors, head_dim, n_blocks, scale,
    stride_xb, stride_xh, stride_xn, stride_xd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_um, stride_ud,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """The whole forward of one (b, h): Lambda and A^T V, then C and inv (stored), then A C."""
    bh = tl.program_id(0)
    dtype = x_ptr.dtype.element_ty
    u_t = _load_anchors(u_ptr, stride_ud, stride_um, head_dim, n_anchors, dtype, BLOCK_D, BLOCK_M)
    x_head = _head(x_ptr, bh, heads, stride_xb, stride_xh)
    gathered, degree = _gather_blocks(x_head, _head(v_ptr, bh, heads, stride_vb, stride_vh), u_t, scale,
                                      0, n_blocks, n_tokens, n_anchors, head_dim,
                                      stride_xn, stride_xd, stride_vn, stride_vd,
                                      BLOCK_N, BLOCK_M, BLOCK_D, DOT_PRECISION)
    context, inv_degree = _context(gathered, degree)
    tl.store(context_ptr + _state(bh, BLOCK_M, BLOCK_D), context)
    tl.store(inv_degree_ptr + bh.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M), inv_degree)
    _scatter_blocks(x_head, _head(out_ptr, bh, heads, stride_ob, stride_oh), u_t, context.to(dtype), scale,
                    0, n_blocks, n_tokens, n_anchors, head_dim, stride_xn, stride_xd, stride_on, stride_od,
                    BLOCK_N, BLOCK_M, BLOCK_D, DOT_PRECISION)


@triton.jit
def _one_program_backward_kernel(
    x_ptr, v_ptr, g_ptr, u_ptr, context_ptr, inv_degree_ptr,
    dx_ptr, dv_ptr, du_partial_ptr,
    heads, n_tokens, n_anchors, head_dim, n_blocks, scale,
    stride_xb, stride_xh, stride_xn, stride_xd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_dxb, stride_dxh, stride_dxn, stride_dxd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_um, stride_ud,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """The whole backward of one (b, h) but the sum of dU over (b, h): A^T G, then D and w, then
    dX, dV and this head's partial dU."""
    bh = tl.program_id(0)
    dtype = x_ptr.dtype.element_ty
    u = _load_anchors(u_ptr, stride_um, stride_ud, n_anchors, head_dim, dtype, BLOCK_M, BLOCK_D)
    x_head = _head(x_ptr, bh, heads, stride_xb, stride_xh)
    g_head = _head(g_ptr, bh, heads, stride_gb, stride_gh)
    u_t = _load_anchors(u_ptr, stride_ud, stride_um, head_dim, n_anchors, dtype, BLOCK_D, BLOCK_M)
    d_context, _ = _gather_blocks(x_head, g_head, u_t, scale, 0, n_blocks, n_tokens, n_anchors, head_dim,
                                  stride_xn, stride_xd, stride_gn, stride_gd, BLOCK_N, BLOCK_M, BLOCK_D, DOT_PRECISION)
    context = tl.load(context_ptr + _state(bh, BLOCK_M, BLOCK_D))
    inv_degree = tl.load(inv_degree_ptr + bh.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M))
    d_gathered, weight = _context_gradient(d_context, inv_degree, context)
    du = _backward_blocks(x_head, _head(v_ptr, bh, heads, stride_vb, stride_vh), g_head,
                          _head(dx_ptr, bh, heads, stride_dxb, stride_dxh),
                          _head(dv_ptr, bh, heads, stride_dvb, stride_dvh),
                          u, context.to(dtype), d_gathered.to(dtype), weight, scale,
                          0, n_blocks, n_tokens, n_anchors, head_dim,
                          stride_xn, stride_xd, stride_vn, stride_vd, stride_gn, stride_gd,
                          stride_dxn, stride_dxd, stride_dvn, stride_dvd,
                          BLOCK_N, BLOCK_M, BLOCK_D, DOT_PRECISION)
    _store_anchor_gradient(du_partial_ptr, bh, du, n_anchors, head_dim, BLOCK_M, BLOCK_D)


@triton.jit
def _gather_kernel(
    x_ptr, y_ptr, u_ptr, partial_ptr, degree_ptr,
    heads, n_tokens, n_anchors, head_dim, blocks_per_program, scale,
    stride_xb, stride_xh, stride_xn, stride_xd,
    stride_yb, stride_yh, stride_yn, stride_yd,
    stride_um, stride_ud,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Token split, pass 1: partial ``A^T Y`` and ``1^T A`` over this program's tokens."""
    bh = tl.program_id(0)
    u_t = _load_anchors(u_ptr, stride_ud, stride_um, head_dim, n_anchors, x_ptr.dtype.element_ty, BLOCK_D, BLOCK_M)
    gathered, degree = _gather_blocks(_head(x_ptr, bh, heads, stride_xb, stride_xh),
                                      _head(y_ptr, bh, heads, stride_yb, stride_yh), u_t, scale,
                                      tl.program_id(1) * blocks_per_program * BLOCK_N, blocks_per_program,
                                      n_tokens, n_anchors, head_dim, stride_xn, stride_xd, stride_yn, stride_yd,
                                      BLOCK_N, BLOCK_M, BLOCK_D, DOT_PRECISION)
    out = bh * tl.num_programs(1) + tl.program_id(1)
    tl.store(partial_ptr + _state(out, BLOCK_M, BLOCK_D), gathered)
    tl.store(degree_ptr + out.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M), degree)


@triton.jit
def _sum_splits(partial_ptr, bh, splits, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Sum of the ``splits`` partial (BLOCK_M, BLOCK_D) tiles that ``_gather_kernel`` wrote for ``bh``."""
    total = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for split in range(splits):
        total += tl.load(partial_ptr + _state(bh * splits + split, BLOCK_M, BLOCK_D))
    return total


@triton.jit
def _finish_forward_kernel(partial_ptr, degree_ptr, context_ptr, inv_degree_ptr, splits,
                           BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Token split, per (b, h): Lambda from the partial degrees, then inv and C."""
    bh = tl.program_id(0).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    degree = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for split in range(splits):
        degree += tl.load(degree_ptr + (bh * splits + split) * BLOCK_M + offs_m)
    context, inv_degree = _context(_sum_splits(partial_ptr, bh, splits, BLOCK_M, BLOCK_D), degree)
    tl.store(context_ptr + _state(bh, BLOCK_M, BLOCK_D), context)
    tl.store(inv_degree_ptr + bh * BLOCK_M + offs_m, inv_degree)


@triton.jit
def _finish_backward_kernel(partial_ptr, inv_degree_ptr, context_ptr, d_gathered_ptr, weight_ptr, splits,
                            BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Token split, per (b, h): D and w from the partial ``A^T G`` sums."""
    bh = tl.program_id(0).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    tile = _state(bh, BLOCK_M, BLOCK_D)
    d_gathered, weight = _context_gradient(_sum_splits(partial_ptr, bh, splits, BLOCK_M, BLOCK_D),
                                           tl.load(inv_degree_ptr + bh * BLOCK_M + offs_m), tl.load(context_ptr + tile))
    tl.store(d_gathered_ptr + tile, d_gathered)
    tl.store(weight_ptr + bh * BLOCK_M + offs_m, weight)


@triton.jit
def _scatter_kernel(
    x_ptr, u_ptr, context_ptr, out_ptr,
    heads, n_tokens, n_anchors, head_dim, scale,
    stride_xb, stride_xh, stride_xn, stride_xd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_um, stride_ud,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Token split, pass 2: ``A @ C`` for one token block."""
    bh = tl.program_id(0)
    dtype = x_ptr.dtype.element_ty
    u_t = _load_anchors(u_ptr, stride_ud, stride_um, head_dim, n_anchors, dtype, BLOCK_D, BLOCK_M)
    context = tl.load(context_ptr + _state(bh, BLOCK_M, BLOCK_D)).to(dtype)
    _scatter_blocks(_head(x_ptr, bh, heads, stride_xb, stride_xh), _head(out_ptr, bh, heads, stride_ob, stride_oh),
                    u_t, context, scale, tl.program_id(1) * BLOCK_N, 1, n_tokens, n_anchors, head_dim,
                    stride_xn, stride_xd, stride_on, stride_od, BLOCK_N, BLOCK_M, BLOCK_D, DOT_PRECISION)


@triton.jit
def _token_split_backward_kernel(
    x_ptr, v_ptr, g_ptr, u_ptr, context_ptr, d_gathered_ptr, weight_ptr,
    dx_ptr, dv_ptr, du_partial_ptr,
    heads, n_tokens, n_anchors, head_dim, blocks_per_program, scale,
    stride_xb, stride_xh, stride_xn, stride_xd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_dxb, stride_dxh, stride_dxn, stride_dxd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_um, stride_ud,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Token split, pass 2 of the backward: dX and dV for this program's tokens and its partial dU.
    C, D (``d_gathered_ptr``) and w (``weight_ptr``) are fp32, padded to (BLOCK_M, BLOCK_D) per (b, h)."""
    bh = tl.program_id(0)
    dtype = x_ptr.dtype.element_ty
    u = _load_anchors(u_ptr, stride_um, stride_ud, n_anchors, head_dim, dtype, BLOCK_M, BLOCK_D)
    tile = _state(bh, BLOCK_M, BLOCK_D)
    weight = tl.load(weight_ptr + bh.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M))
    du = _backward_blocks(_head(x_ptr, bh, heads, stride_xb, stride_xh), _head(v_ptr, bh, heads, stride_vb, stride_vh),
                          _head(g_ptr, bh, heads, stride_gb, stride_gh),
                          _head(dx_ptr, bh, heads, stride_dxb, stride_dxh),
                          _head(dv_ptr, bh, heads, stride_dvb, stride_dvh),
                          u, tl.load(context_ptr + tile).to(dtype), tl.load(d_gathered_ptr + tile).to(dtype), weight,
                          scale, tl.program_id(1) * blocks_per_program * BLOCK_N, blocks_per_program,
                          n_tokens, n_anchors, head_dim,
                          stride_xn, stride_xd, stride_vn, stride_vd, stride_gn, stride_gd,
                          stride_dxn, stride_dxd, stride_dvn, stride_dvd,
                          BLOCK_N, BLOCK_M, BLOCK_D, DOT_PRECISION)
    _store_anchor_gradient(du_partial_ptr, bh * tl.num_programs(1) + tl.program_id(1), du, n_anchors, head_dim,
                           BLOCK_M, BLOCK_D)


class ForwardState(NamedTuple):
    """What the backward needs from the forward, besides the inputs: fp32, padded per (b, h)."""

    context: torch.Tensor  # C = diag(inv) A^T V, (B*h, BLOCK_M, BLOCK_D)
    inv_degree: torch.Tensor  # 1 / Lambda (0 where Lambda = 0), (B*h, BLOCK_M)


class _Launch(NamedTuple):
    """The plan and block sizes of one call shape; ``splits`` programs share a head's tokens."""

    plan: str
    block_n: int
    block_m: int
    block_d: int
    n_blocks: int
    blocks_per_program: int
    splits: int
    dot_precision: str


def unsupported_reason(qk: torch.Tensor, anchors: torch.Tensor, v: torch.Tensor) -> Optional[str]:
    """Why these inputs cannot run through the kernels, or None when they can.

    Args:
        qk: (B, h, n, dh) tokens; anchors: (m, dh), any kernel dtype (rounded to that of ``qk``);
        v: (B, h, n, dh).

    Returns:
        A sentence naming the unsupported property, or None.
    """
    if qk.dim() != 4 or v.shape != qk.shape:
        return f"qk and v must both be (B, h, n, dh), got {tuple(qk.shape)} and {tuple(v.shape)}"
    if anchors.dim() != 2 or anchors.shape[1] != qk.shape[-1]:
        return f"anchors must be (m, dh={qk.shape[-1]}), got {tuple(anchors.shape)}"
    if qk.dtype not in _LIMITS or v.dtype != qk.dtype or anchors.dtype not in _LIMITS:
        return (f"dtypes qk={qk.dtype}, v={v.dtype}, anchors={anchors.dtype}: qk and v must be the same, "
                f"each one of {list(_LIMITS)}")
    limits = _LIMITS[qk.dtype]
    block_m, block_d = _padded(anchors.shape[0]), _padded(qk.shape[-1])
    if block_d > limits.max_block_d or block_m * block_d > limits.max_tile:
        return (f"m={anchors.shape[0]}, dh={qk.shape[-1]} pad to a {block_m} x {block_d} tile; in {qk.dtype} the "
                f"kernels take dh <= {limits.max_block_d} and padded m x dh <= {limits.max_tile}")
    if qk.numel() == 0:
        return "empty input"
    return None


def _padded(size: int) -> int:
    """A tile side for ``size``: a power of two, at least 16 (``tl.dot``'s minimum)."""
    return max(16, triton.next_power_of_2(size))


def _splits_tokens(programs: int, n_blocks: int, multiprocessors: int) -> bool:
    """Whether ``auto`` takes the token-split plan: when the one-program plan's ``programs`` (B*h)
    would leave streaming multiprocessors idle and a head has several token blocks to share out.

    The threshold ``_ONE_PROGRAM_MIN_PROGRAMS_PER_SM`` is an estimate that must be re-measured on
    a GPU: ``tools/benchmark.py anchor-mix`` times both plans (at small ``--batch`` for few
    programs); move the threshold to where they cross, and make the rule depend on n if the
    crossing does.
    """
    return n_blocks > 1 and programs < _ONE_PROGRAM_MIN_PROGRAMS_PER_SM * multiprocessors


@functools.lru_cache(maxsize=1024)
def _launch(shape: torch.Size, n_anchors: int, dtype: torch.dtype, device: torch.device, requested: str) -> _Launch:
    """The plan of one call shape (cached: the SM count query alone costs about 14 us)."""
    batch, heads, tokens, head_dim = shape
    block_n = _LIMITS[dtype].block_n
    n_blocks = triton.cdiv(tokens, block_n)
    if device.type == "cuda":
        multiprocessors = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        multiprocessors = _INTERPRETER_MULTIPROCESSORS
    token_split = requested == "token-split" or (
        requested == "auto" and _splits_tokens(batch * heads, n_blocks, multiprocessors))
    if token_split:
        target = _PROGRAMS_PER_SM * multiprocessors
        wanted_splits = min(n_blocks, max(1, math.ceil(target / (batch * heads))))
        blocks_per_program = math.ceil(n_blocks / wanted_splits)
    else:
        blocks_per_program = n_blocks
    return _Launch(
        plan="token-split" if token_split else "one-program",
        block_n=block_n,
        block_m=_padded(n_anchors),
        block_d=_padded(head_dim),
        n_blocks=n_blocks,
        blocks_per_program=blocks_per_program,
        splits=math.ceil(n_blocks / blocks_per_program),
        dot_precision="ieee" if dtype == torch.float32 else "tf32",
    )


def _launch_for(qk: torch.Tensor, anchors: torch.Tensor) -> _Launch:
    return _launch(qk.shape, anchors.shape[0], qk.dtype, qk.device, _requested_plan)


def plan_name(qk: torch.Tensor, anchors: torch.Tensor) -> str:
    """The launch plan :func:`forward` takes for these inputs: ``one-program`` or ``token-split``."""
    return _launch_for(qk, anchors).plan


def _gather(x: torch.Tensor, y: torch.Tensor, anchors: torch.Tensor, scale: float, launch: _Launch):
    """Token split: partial sums over each split's tokens of ``A^T Y`` and of ``A``, fp32:
    (B*h, splits, BLOCK_M, BLOCK_D) and (B*h, splits, BLOCK_M)."""
    batch, heads, tokens, head_dim = x.shape
    partial = x.new_empty(batch * heads, launch.splits, launch.block_m, launch.block_d, dtype=torch.float32)
    degree = x.new_empty(batch * heads, launch.splits, launch.block_m, dtype=torch.float32)
    _gather_kernel[(batch * heads, launch.splits)](
        x, y, anchors, partial, degree,
        heads, tokens, anchors.shape[0], head_dim, launch.blocks_per_program, scale,
        *x.stride(), *y.stride(), *anchors.stride(),
        BLOCK_N=launch.block_n, BLOCK_M=launch.block_m, BLOCK_D=launch.block_d, DOT_PRECISION=launch.dot_precision,
        num_warps=_NUM_WARPS,
    )
    return partial, degree


def token_major_like(x: torch.Tensor) -> torch.Tensor:
    """An empty (B, h, n, dh) tensor stored as (B, n, h, dh), so that the caller's
    ``transpose(1, 2).reshape(B, n, h * dh)`` is free."""
    batch, heads, tokens, head_dim = x.shape
    return x.new_empty(batch, tokens, heads, head_dim).transpose(1, 2)


def _forward_outputs(qk: torch.Tensor, block_m: int, block_d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, heads, _, _ = qk.shape
    return (token_major_like(qk), qk.new_empty(batch * heads, block_m, block_d, dtype=torch.float32),
            qk.new_empty(batch * heads, block_m, dtype=torch.float32))


def forward_outputs_like(qk: torch.Tensor, anchors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty tensors shaped, typed and strided as :func:`forward`'s output, ``context`` and
    ``inv_degree`` (for tracing, e.g. torch.compile's fake tensors)."""
    return _forward_outputs(qk, _padded(anchors.shape[0]), _padded(qk.shape[-1]))


def forward(qk: torch.Tensor, anchors: torch.Tensor, v: torch.Tensor,
            scale: float) -> tuple[torch.Tensor, ForwardState]:
    """``A @ ((A^T @ v) / Lambda)`` for every batch and head, and the state the backward needs.

    Args:
        qk: (B, h, n, dh) tokens serving as queries and keys, any strides.
        anchors: (m, dh) anchors, any strides and kernel dtype (rounded to that of ``qk``).
        v: (B, h, n, dh) values, dtype of ``qk``, any strides.
        scale: logit scale.

    Returns:
        The (B, h, n, dh) output in the input dtype and a :class:`ForwardState`.
    """
    assert qk.dtype == v.dtype, f"dtypes differ: qk {qk.dtype}, v {v.dtype}"
    launch = _launch_for(qk, anchors)
    batch, heads, tokens, head_dim = qk.shape
    out, context, inv_degree = _forward_outputs(qk, launch.block_m, launch.block_d)
    blocks = dict(BLOCK_N=launch.block_n, BLOCK_M=launch.block_m, BLOCK_D=launch.block_d,
                  DOT_PRECISION=launch.dot_precision, num_warps=_NUM_WARPS)
    if launch.plan == "one-program":
        _one_program_forward_kernel[(batch * heads,)](
            qk, v, anchors, out, context, inv_degree,
            heads, tokens, anchors.shape[0], head_dim, launch.n_blocks, scale,
            *qk.stride(), *v.stride(), *out.stride(), *anchors.stride(), **blocks)
        return out, ForwardState(context, inv_degree)
    partial, degree = _gather(qk, v, anchors, scale, launch)
    _finish_forward_kernel[(batch * heads,)](partial, degree, context, inv_degree, launch.splits,
                                             BLOCK_M=launch.block_m, BLOCK_D=launch.block_d)
    _scatter_kernel[(batch * heads, launch.n_blocks)](
        qk, anchors, context, out,
        heads, tokens, anchors.shape[0], head_dim, scale,
        *qk.stride(), *out.stride(), *anchors.stride(), **blocks)
    return out, ForwardState(context, inv_degree)


def backward(grad_out: torch.Tensor, qk: torch.Tensor, anchors: torch.Tensor, v: torch.Tensor, scale: float,
             state: ForwardState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`forward` with respect to ``qk``, ``anchors`` and ``v``.

    Args:
        grad_out: (B, h, n, dh) gradient of the output, any strides.
        qk, anchors, v, scale: the forward's inputs.
        state: the forward's :class:`ForwardState`.

    Returns:
        ``(d_qk, d_anchors, d_v)`` in the dtypes of the inputs.
    """
    launch = _launch_for(qk, anchors)
    grad_out = grad_out.to(qk.dtype)  # a no-op but for a caller that upcast the output
    batch, heads, tokens, head_dim = qk.shape
    d_qk = token_major_like(qk)
    d_v = token_major_like(v)
    d_anchors_partial = qk.new_empty(batch * heads * launch.splits, *anchors.shape, dtype=torch.float32)
    blocks = dict(BLOCK_N=launch.block_n, BLOCK_M=launch.block_m, BLOCK_D=launch.block_d,
                  DOT_PRECISION=launch.dot_precision, num_warps=_NUM_WARPS)
    strides = (*qk.stride(), *v.stride(), *grad_out.stride(), *d_qk.stride(), *d_v.stride(), *anchors.stride())
    if launch.plan == "one-program":
        _one_program_backward_kernel[(batch * heads,)](
            qk, v, grad_out, anchors, state.context, state.inv_degree, d_qk, d_v, d_anchors_partial,
            heads, tokens, anchors.shape[0], head_dim, launch.n_blocks, scale, *strides, **blocks)
    else:
        partial, _ = _gather(qk, grad_out, anchors, scale, launch)
        d_gathered = torch.empty_like(state.context)  # D = diag(inv) A^T G
        weight = torch.empty_like(state.inv_degree)  # w_j = <D_j, C_j>
        _finish_backward_kernel[(batch * heads,)](partial, state.inv_degree, state.context, d_gathered, weight,
                                                  launch.splits, BLOCK_M=launch.block_m, BLOCK_D=launch.block_d)
        _token_split_backward_kernel[(batch * heads, launch.splits)](
            qk, v, grad_out, anchors, state.context, d_gathered, weight, d_qk, d_v, d_anchors_partial,
            heads, tokens, anchors.shape[0], head_dim, launch.blocks_per_program, scale, *strides, **blocks)
    # one reduction over the (b, h[, split]) partials; the cast is a no-op for fp32 anchors
    d_anchors = d_anchors_partial.sum(dim=0).to(anchors.dtype)
    return d_qk, d_anchors, d_v
