"""Fused Triton kernels for anchor attention's mixing step, forward and backward.

For one (batch, head) with tokens ``X = qk`` (n, d), anchors ``U`` (m, d), values ``V`` (n, d) and
``s = scale`` the forward is (see ``anchorformer.models.anchor_attention.anchor_mix``)::

    L = s X U^T (n, m);  A = softmax_rows(L);  Lambda = 1^T A (m,);  inv = 1/Lambda (0 where 0)
    P = A^T V (m, d);    C = diag(inv) P;      O = A C (n, d)

It runs in two passes over the tokens, recomputing ``A`` (n x m, cheap) instead of storing it:

1. ``_gather_kernel``: per token block, logits -> softmax over the anchors -> accumulate
   ``Lambda`` and ``A^T V``. Tokens are split across programs (enough to fill the GPU); each
   writes its partial sums, and ``_finish_forward_kernel`` (one program per (b, h)) adds them
   (deterministic, no atomics) and forms ``inv`` and ``C``.
2. ``_scatter_kernel``: per token block, recompute ``A`` and write ``A C``.

Backward, with ``G = dL/dO`` (n, d). Through ``O = A C``: ``dC = A^T G`` and ``dA = G C^T``.
Through ``C = diag(inv) P``: ``dP = diag(inv) dC =: D`` and ``dinv_j = <dC_j, P_j>``. Through
``inv = 1/Lambda``: ``dLambda_j = -inv_j^2 dinv_j = -inv_j <dC_j, C_j> = -<D_j, C_j> =: -w_j``
(0 for an anchor of zero degree, as the forward's guard makes ``inv`` constant there). Through
``P = A^T V``: ``dA += V D^T`` and ``dV = A D``. Through ``Lambda = 1^T A``: ``dA -= 1 w^T``. So::

    dA = G C^T + V D^T - 1 w^T                     (n, m)
    dL = A * (dA - rowsum(A * dA))                  softmax backward, row-wise
    dX = s dL U;   dU = s sum_{batch, head} dL^T X;   dV = A D

which is again two passes: ``_gather_kernel`` on ``G`` gives partial ``dC`` sums, from which
``_finish_backward_kernel`` forms ``D`` and ``w`` ((m, d)-sized), and ``_backward_kernel``
recomputes ``A`` per token block, writes ``dX`` and ``dV`` and a partial ``dU`` per program
(summed over programs, batch and heads by one torch reduction).

Precision: inputs in bf16/fp16/fp32; logits, softmax, ``Lambda``, ``C``, ``D`` and all
accumulators in fp32. As in the reference, ``A``, ``C`` and ``D`` are rounded to the input dtype
before the token-long products (tensor cores); fp32 inputs use exact fp32 products ("ieee").
Anchors are padded to a power of two (at least 16, ``tl.dot``'s minimum) and masked: a padded
anchor has logit -inf, so ``A`` is 0 there and so are its ``C``, ``D`` and gradients. The padded
(m, dh) tile is bounded per dtype (``_LIMITS``) so that every kernel fits in 100 KB of shared
memory; :func:`unsupported_reason` names the inputs outside those bounds (the dispatcher then
uses the PyTorch path).
"""
import functools
import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

__all__ = ["unsupported_reason", "forward", "backward", "forward_outputs_like", "token_major_like", "ForwardState"]

_NUM_WARPS = 4


class _TileLimits(NamedTuple):
    """Per input dtype: tokens per block, and the largest padded anchor tile (BLOCK_M * BLOCK_D
    elements, BLOCK_D) that keeps every kernel under 100 KB of shared memory (compiled for sm_90:
    the backward needs 90 KB at (32, 128) in 16 bits, 82 KB at (32, 64) in fp32 with 32 tokens)."""

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
# On the CPU interpreter programs run one after another; a few splits keep the partial-sum
# reduction exercised by the tests at no real cost.
_INTERPRETER_PROGRAMS = 8


@triton.jit
def _assignment(x, u_t, scale, anchor_valid, token_valid, DOT_PRECISION: tl.constexpr):
    """A for one token block: softmax over anchors of ``x @ U^T * scale`` in fp32, 0 on padding."""
    logits = tl.dot(x, u_t, input_precision=DOT_PRECISION) * scale
    logits = tl.where(anchor_valid[None, :], logits, float("-inf"))
    shifted = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    assign = shifted / tl.sum(shifted, axis=1)[:, None]
    return tl.where(token_valid[:, None], assign, 0.0)


@triton.jit
def _gather_kernel(
    x_ptr, y_ptr, u_ptr, partial_ptr, degree_ptr,
    heads, n_tokens, n_anchors, head_dim, blocks_per_program, scale,
    stride_xb, stride_xh, stride_xn, stride_xd,
    stride_yb, stride_yh, stride_yn, stride_yd,
    stride_um, stride_ud,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Partial ``A^T Y`` (BLOCK_M, BLOCK_D) and ``1^T A`` (BLOCK_M,) over this program's tokens."""
    pid_bh = tl.program_id(0)
    pid_split = tl.program_id(1)
    batch = (pid_bh // heads).to(tl.int64)
    head = (pid_bh % heads).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    anchor_valid = offs_m < n_anchors
    dim_valid = offs_d < head_dim
    u_t = tl.load(u_ptr + offs_m[None, :] * stride_um + offs_d[:, None] * stride_ud,
                  mask=anchor_valid[None, :] & dim_valid[:, None], other=0.0)
    x_base = x_ptr + batch * stride_xb + head * stride_xh
    y_base = y_ptr + batch * stride_yb + head * stride_yh
    gathered = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    degree = tl.zeros((BLOCK_M,), dtype=tl.float32)
    first_token = pid_split * blocks_per_program * BLOCK_N
    for block in range(blocks_per_program):
        tokens = first_token + block * BLOCK_N + offs_n
        token_valid = tokens < n_tokens
        tile_mask = token_valid[:, None] & dim_valid[None, :]
        x = tl.load(x_base + tokens[:, None] * stride_xn + offs_d[None, :] * stride_xd, mask=tile_mask, other=0.0)
        y = tl.load(y_base + tokens[:, None] * stride_yn + offs_d[None, :] * stride_yd, mask=tile_mask, other=0.0)
        assign = _assignment(x, u_t, scale, anchor_valid, token_valid, DOT_PRECISION)
        degree += tl.sum(assign, axis=0)
        gathered += tl.dot(tl.trans(assign.to(y.dtype)), y, input_precision=DOT_PRECISION)
    out = (pid_bh * tl.num_programs(1) + pid_split).to(tl.int64)
    tl.store(partial_ptr + out * BLOCK_M * BLOCK_D + offs_m[:, None] * BLOCK_D + offs_d[None, :], gathered)
    tl.store(degree_ptr + out * BLOCK_M + offs_m, degree)


@triton.jit
def _sum_splits(partial_ptr, bh, splits, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Sum of the ``splits`` partial (BLOCK_M, BLOCK_D) tiles that ``_gather_kernel`` wrote for ``bh``."""
    tile = tl.arange(0, BLOCK_M)[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
    total = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for split in range(splits):
        total += tl.load(partial_ptr + (bh * splits + split) * BLOCK_M * BLOCK_D + tile)
    return total


@triton.jit
def _finish_forward_kernel(partial_ptr, degree_ptr, context_ptr, inv_degree_ptr, splits,
                           BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per (b, h): Lambda = sum of the partial degrees, inv = 1/Lambda (0 where 0), C = diag(inv) A^T V."""
    bh = tl.program_id(0).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    degree = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for split in range(splits):
        degree += tl.load(degree_ptr + (bh * splits + split) * BLOCK_M + offs_m)
    positive = degree > 0
    inv_degree = tl.where(positive, 1.0 / tl.where(positive, degree, 1.0), 0.0)
    context = _sum_splits(partial_ptr, bh, splits, BLOCK_M, BLOCK_D) * inv_degree[:, None]
    tl.store(context_ptr + bh * BLOCK_M * BLOCK_D + offs_m[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :], context)
    tl.store(inv_degree_ptr + bh * BLOCK_M + offs_m, inv_degree)


@triton.jit
def _finish_backward_kernel(partial_ptr, inv_degree_ptr, context_ptr, dpartial_ptr, weight_ptr, splits,
                            BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per (b, h): D = diag(inv) A^T G from the partial sums, and w_j = <D_j, C_j>."""
    bh = tl.program_id(0).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    tile = bh * BLOCK_M * BLOCK_D + offs_m[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
    inv_degree = tl.load(inv_degree_ptr + bh * BLOCK_M + offs_m)
    dpartial = _sum_splits(partial_ptr, bh, splits, BLOCK_M, BLOCK_D) * inv_degree[:, None]
    tl.store(dpartial_ptr + tile, dpartial)
    tl.store(weight_ptr + bh * BLOCK_M + offs_m, tl.sum(dpartial * tl.load(context_ptr + tile), axis=1))


@triton.jit
def _scatter_kernel(
    x_ptr, u_ptr, context_ptr, out_ptr,
    heads, n_tokens, n_anchors, head_dim, scale,
    stride_xb, stride_xh, stride_xn, stride_xd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_um, stride_ud,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """``A @ C`` for one token block; C is the (BLOCK_M, BLOCK_D) fp32 context of this (b, h)."""
    pid_bh = tl.program_id(0)
    batch = (pid_bh // heads).to(tl.int64)
    head = (pid_bh % heads).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    anchor_valid = offs_m < n_anchors
    dim_valid = offs_d < head_dim
    tokens = tl.program_id(1) * BLOCK_N + offs_n
    token_valid = tokens < n_tokens
    tile_mask = token_valid[:, None] & dim_valid[None, :]
    u_t = tl.load(u_ptr + offs_m[None, :] * stride_um + offs_d[:, None] * stride_ud,
                  mask=anchor_valid[None, :] & dim_valid[:, None], other=0.0)
    x = tl.load(x_ptr + batch * stride_xb + head * stride_xh + tokens[:, None] * stride_xn + offs_d[None, :] * stride_xd,
                mask=tile_mask, other=0.0)
    context = tl.load(context_ptr + pid_bh.to(tl.int64) * BLOCK_M * BLOCK_D + offs_m[:, None] * BLOCK_D + offs_d[None, :])
    assign = _assignment(x, u_t, scale, anchor_valid, token_valid, DOT_PRECISION)
    out = tl.dot(assign.to(x.dtype), context.to(x.dtype), input_precision=DOT_PRECISION)
    tl.store(out_ptr + batch * stride_ob + head * stride_oh + tokens[:, None] * stride_on + offs_d[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _backward_kernel(
    x_ptr, v_ptr, g_ptr, u_ptr, context_ptr, dpartial_ptr, weight_ptr,
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
    """dX and dV for this program's tokens and its partial dU (see the module docstring).

    ``context_ptr`` holds C, ``dpartial_ptr`` D = diag(inv) A^T G and ``weight_ptr`` w = <D_j, C_j>,
    all fp32 and padded to (BLOCK_M, BLOCK_D) per (b, h)."""
    pid_bh = tl.program_id(0)
    pid_split = tl.program_id(1)
    batch = (pid_bh // heads).to(tl.int64)
    head = (pid_bh % heads).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    anchor_valid = offs_m < n_anchors
    dim_valid = offs_d < head_dim
    anchor_tile = anchor_valid[:, None] & dim_valid[None, :]
    u = tl.load(u_ptr + offs_m[:, None] * stride_um + offs_d[None, :] * stride_ud, mask=anchor_tile, other=0.0)
    u_t = tl.trans(u)
    per_head = pid_bh.to(tl.int64) * BLOCK_M * BLOCK_D + offs_m[:, None] * BLOCK_D + offs_d[None, :]
    context = tl.load(context_ptr + per_head).to(u.dtype)
    dpartial = tl.load(dpartial_ptr + per_head).to(u.dtype)
    weight = tl.load(weight_ptr + pid_bh.to(tl.int64) * BLOCK_M + offs_m)
    x_base = x_ptr + batch * stride_xb + head * stride_xh
    v_base = v_ptr + batch * stride_vb + head * stride_vh
    g_base = g_ptr + batch * stride_gb + head * stride_gh
    dx_base = dx_ptr + batch * stride_dxb + head * stride_dxh
    dv_base = dv_ptr + batch * stride_dvb + head * stride_dvh
    du = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    first_token = pid_split * blocks_per_program * BLOCK_N
    for block in range(blocks_per_program):
        tokens = first_token + block * BLOCK_N + offs_n
        token_valid = tokens < n_tokens
        tile_mask = token_valid[:, None] & dim_valid[None, :]
        rows = tokens[:, None]
        cols = offs_d[None, :]
        x = tl.load(x_base + rows * stride_xn + cols * stride_xd, mask=tile_mask, other=0.0)
        v = tl.load(v_base + rows * stride_vn + cols * stride_vd, mask=tile_mask, other=0.0)
        g = tl.load(g_base + rows * stride_gn + cols * stride_gd, mask=tile_mask, other=0.0)
        assign = _assignment(x, u_t, scale, anchor_valid, token_valid, DOT_PRECISION)
        d_assign = tl.dot(g, tl.trans(context), input_precision=DOT_PRECISION)
        d_assign += tl.dot(v, tl.trans(dpartial), input_precision=DOT_PRECISION)
        d_assign -= weight[None, :]
        d_logits = assign * (d_assign - tl.sum(assign * d_assign, axis=1)[:, None])
        d_logits_lp = d_logits.to(u.dtype)
        dx = tl.dot(d_logits_lp, u, input_precision=DOT_PRECISION) * scale
        dv = tl.dot(assign.to(u.dtype), dpartial, input_precision=DOT_PRECISION)
        du += tl.dot(tl.trans(d_logits_lp), x, input_precision=DOT_PRECISION)
        tl.store(dx_base + rows * stride_dxn + cols * stride_dxd, dx.to(dx_ptr.dtype.element_ty), mask=tile_mask)
        tl.store(dv_base + rows * stride_dvn + cols * stride_dvd, dv.to(dv_ptr.dtype.element_ty), mask=tile_mask)
    out = (pid_bh * tl.num_programs(1) + pid_split).to(tl.int64)
    tl.store(du_partial_ptr + out * BLOCK_M * BLOCK_D + offs_m[:, None] * BLOCK_D + offs_d[None, :], du * scale)


class ForwardState(NamedTuple):
    """What the backward needs from the forward, besides the inputs: fp32, padded per (b, h)."""

    context: torch.Tensor  # C = diag(inv) A^T V, (B*h, BLOCK_M, BLOCK_D)
    inv_degree: torch.Tensor  # 1 / Lambda (0 where Lambda = 0), (B*h, BLOCK_M)


class _Launch(NamedTuple):
    """Block sizes and the split of the token blocks across programs for one call."""

    block_n: int
    block_m: int
    block_d: int
    n_blocks: int
    blocks_per_program: int
    splits: int
    dot_precision: str


def unsupported_reason(qk: torch.Tensor, anchors: torch.Tensor, v: torch.Tensor) -> Optional[str]:
    """Why these inputs cannot run through the kernels, or None when they can (the anchors
    are cast to the dtype of ``qk`` before :func:`forward`).

    Args:
        qk: (B, h, n, dh) tokens; anchors: (m, dh); v: (B, h, n, dh).

    Returns:
        A sentence naming the unsupported property, or None.
    """
    if qk.dim() != 4 or v.shape != qk.shape:
        return f"qk and v must both be (B, h, n, dh), got {tuple(qk.shape)} and {tuple(v.shape)}"
    if anchors.dim() != 2 or anchors.shape[1] != qk.shape[-1]:
        return f"anchors must be (m, dh={qk.shape[-1]}), got {tuple(anchors.shape)}"
    if qk.dtype not in _LIMITS or v.dtype != qk.dtype:
        return f"dtypes qk={qk.dtype}, v={v.dtype}: both must be the same, one of {list(_LIMITS)}"
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


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    """Streaming multiprocessors of a GPU (cached: the query costs about 14 us per call)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _plan(qk: torch.Tensor, anchors: torch.Tensor) -> _Launch:
    batch, heads, tokens, head_dim = qk.shape
    block_n = _LIMITS[qk.dtype].block_n
    n_blocks = triton.cdiv(tokens, block_n)
    if qk.is_cuda:
        target = _PROGRAMS_PER_SM * _multiprocessors(qk.device.index)
    else:
        target = _INTERPRETER_PROGRAMS
    wanted_splits = min(n_blocks, max(1, math.ceil(target / (batch * heads))))
    blocks_per_program = math.ceil(n_blocks / wanted_splits)
    return _Launch(
        block_n=block_n,
        block_m=_padded(anchors.shape[0]),
        block_d=_padded(head_dim),
        n_blocks=n_blocks,
        blocks_per_program=blocks_per_program,
        splits=math.ceil(n_blocks / blocks_per_program),
        dot_precision="ieee" if qk.dtype == torch.float32 else "tf32",
    )


def _gather(x: torch.Tensor, y: torch.Tensor, anchors: torch.Tensor, scale: float, plan: _Launch):
    """Partial sums over each split's tokens of ``A^T Y`` and of ``A``, fp32:
    (B*h, splits, BLOCK_M, BLOCK_D) and (B*h, splits, BLOCK_M)."""
    batch, heads, tokens, head_dim = x.shape
    partial = x.new_empty(batch * heads, plan.splits, plan.block_m, plan.block_d, dtype=torch.float32)
    degree = x.new_empty(batch * heads, plan.splits, plan.block_m, dtype=torch.float32)
    _gather_kernel[(batch * heads, plan.splits)](
        x, y, anchors, partial, degree,
        heads, tokens, anchors.shape[0], head_dim, plan.blocks_per_program, scale,
        *x.stride(), *y.stride(), *anchors.stride(),
        BLOCK_N=plan.block_n, BLOCK_M=plan.block_m, BLOCK_D=plan.block_d, DOT_PRECISION=plan.dot_precision,
        num_warps=_NUM_WARPS,
    )
    return partial, degree


def token_major_like(x: torch.Tensor) -> torch.Tensor:
    """An empty (B, h, n, dh) tensor stored as (B, n, h, dh), so that the caller's
    ``transpose(1, 2).reshape(B, n, h * dh)`` is free."""
    batch, heads, tokens, head_dim = x.shape
    return x.new_empty(batch, tokens, heads, head_dim).transpose(1, 2)


def forward_outputs_like(qk: torch.Tensor, anchors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty tensors shaped, typed and strided as :func:`forward`'s output, ``context`` and
    ``inv_degree`` (for tracing, e.g. torch.compile's fake tensors)."""
    batch, heads, _, head_dim = qk.shape
    block_m, block_d = _padded(anchors.shape[0]), _padded(head_dim)
    return (token_major_like(qk), qk.new_empty(batch * heads, block_m, block_d, dtype=torch.float32),
            qk.new_empty(batch * heads, block_m, dtype=torch.float32))


def forward(qk: torch.Tensor, anchors: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, ForwardState]:
    """``A @ ((A^T @ v) / Lambda)`` for every batch and head, and the state the backward needs.

    Args:
        qk: (B, h, n, dh) tokens serving as queries and keys, any strides.
        anchors: (m, dh) anchors in the dtype of ``qk``.
        v: (B, h, n, dh) values, dtype of ``qk``.
        scale: logit scale.

    Returns:
        The (B, h, n, dh) output in the input dtype and a :class:`ForwardState`.
    """
    assert anchors.dtype == qk.dtype == v.dtype, f"dtypes differ: {qk.dtype}, {anchors.dtype}, {v.dtype}"
    plan = _plan(qk, anchors)
    batch, heads, tokens, head_dim = qk.shape
    partial, degree = _gather(qk, v, anchors, scale, plan)
    out, context, inv_degree = forward_outputs_like(qk, anchors)
    _finish_forward_kernel[(batch * heads,)](partial, degree, context, inv_degree, plan.splits,
                                             BLOCK_M=plan.block_m, BLOCK_D=plan.block_d)
    _scatter_kernel[(batch * heads, plan.n_blocks)](
        qk, anchors, context, out,
        heads, tokens, anchors.shape[0], head_dim, scale,
        *qk.stride(), *out.stride(), *anchors.stride(),
        BLOCK_N=plan.block_n, BLOCK_M=plan.block_m, BLOCK_D=plan.block_d, DOT_PRECISION=plan.dot_precision,
        num_warps=_NUM_WARPS,
    )
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
    plan = _plan(qk, anchors)
    grad_out = grad_out.to(qk.dtype)
    batch, heads, tokens, head_dim = qk.shape
    partial, _ = _gather(qk, grad_out, anchors, scale, plan)
    dpartial = torch.empty_like(state.context)  # D = diag(inv) A^T G
    weight = torch.empty_like(state.inv_degree)  # w_j = <D_j, C_j>
    _finish_backward_kernel[(batch * heads,)](partial, state.inv_degree, state.context, dpartial, weight, plan.splits,
                                              BLOCK_M=plan.block_m, BLOCK_D=plan.block_d)
    d_qk = token_major_like(qk)
    d_v = token_major_like(v)
    d_anchors_partial = qk.new_empty(batch * heads, plan.splits, plan.block_m, plan.block_d, dtype=torch.float32)
    _backward_kernel[(batch * heads, plan.splits)](
        qk, v, grad_out, anchors, state.context, dpartial, weight,
        d_qk, d_v, d_anchors_partial,
        heads, tokens, anchors.shape[0], head_dim, plan.blocks_per_program, scale,
        *qk.stride(), *v.stride(), *grad_out.stride(), *d_qk.stride(), *d_v.stride(), *anchors.stride(),
        BLOCK_N=plan.block_n, BLOCK_M=plan.block_m, BLOCK_D=plan.block_d, DOT_PRECISION=plan.dot_precision,
        num_warps=_NUM_WARPS,
    )
    d_anchors = d_anchors_partial.sum(dim=(0, 1))[: anchors.shape[0], :head_dim].to(anchors.dtype)
    return d_qk, d_anchors, d_v
