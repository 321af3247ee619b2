"""The anchor mix as two calls of ``F.scaled_dot_product_attention``: the most optimised kernel of
every device (FlashAttention, cuDNN, the CPU's fused attention) computes it exactly.

With ``s = scale``, tokens ``X = qk`` (n, dh), anchors ``U`` (m, dh), values ``V``, logits
``L = s X U^T`` (n, m), ``A = softmax_rows(L)`` and ``lse_i = logsumexp_j L_ij``:

1. Anchors attend to tokens. ``log A_ij = L_ij - lse_i = [s U_j, 1] . [X_i, -lse_i]``, so one
   attention call with the m queries ``[s U, 1]``, the n keys ``[X, -lse]`` and scale 1 puts
   ``softmax_over_tokens(log A)_ij = A_ij / Lambda_j`` on the values: ``C = (A^T V) / Lambda``.
2. Tokens attend to anchors: queries ``X``, keys ``U``, scale ``s``, values ``C``:
   ``out = A C``, which is ``anchorformer.kernels.reference.anchor_mix``.

An anchor of zero degree (every ``A_ij`` underflows to 0) would still get weights summing to 1 in
step 1, and in 16-bit its logits may all overflow to -inf (0/0 = NaN, also in the backward). Such
an anchor gets a zero query (finite, uniform weights) and a zero ``C``, which is the reference's
``1/0 -> 0``; its ``A_ij = 0`` keep it out of step 2 and out of every gradient.
"""
import torch
import torch.nn.functional as F

__all__ = ["anchor_mix_sdpa"]


def _padded(x: torch.Tensor, width: int) -> torch.Tensor:
    """``x`` with zero columns appended up to ``width`` (a zero column adds 0 to every dot product)."""
    return F.pad(x, (0, width - x.shape[-1])) if width > x.shape[-1] else x


def _head_width(head_dim: int, device: torch.device) -> int:
    """The head dim the attention kernels take: CUDA's fused kernels (flash, memory-efficient,
    cuDNN) need a multiple of 8, the CPU's takes any; both need queries, keys and values of one
    width to fuse (else they fall back to the unfused maths)."""
    multiple = 8 if device.type == "cuda" else 1
    return -(-head_dim // multiple) * multiple


def anchor_mix_sdpa(qk: torch.Tensor, anchors: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """:func:`~anchorformer.kernels.reference.anchor_mix` (same arguments: qk and v (B, h, n, dh),
    anchors (m, dh), scale; same result, in the dtype of ``v``) as two scaled-dot-product attention
    calls. As in the reference, the anchors are rounded to the dtype of ``qk`` and the log-sum-exp
    and the degrees run in (at least) float32; the attention kernels accumulate in float32.
    """
    batch, heads, _, head_dim = qk.shape
    n_anchors = anchors.shape[0]
    dtype = qk.dtype
    anchors = anchors.to(dtype).contiguous()  # fused attention kernels need unit stride in the head dim
    accum_dtype = torch.promote_types(dtype, torch.float32)
    logits = torch.matmul(qk * scale, anchors.t()).to(accum_dtype)  # (B, h, n, m)
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (B, h, n, 1)
    with torch.no_grad():
        live = (torch.exp(logits - lse).sum(dim=-2) > 0).unsqueeze(-1)  # (B, h, m, 1): Lambda > 0
        # a shift per (batch, head) leaves the softmax over tokens as it is; centring keeps the
        # bias small, so its rounding to a 16-bit dtype costs few of its bits
        shift = lse.mean(dim=-2, keepdim=True)

    width = _head_width(head_dim + 1, qk.device)
    anchor_queries = _padded(torch.cat([anchors * scale, anchors.new_ones(n_anchors, 1)], dim=-1), width)
    anchor_queries = torch.where(live, anchor_queries, 0.0)  # (B, h, m, width)
    token_keys = _padded(torch.cat([qk, (shift - lse).to(dtype)], dim=-1), width)  # (B, h, n, width)
    context = F.scaled_dot_product_attention(anchor_queries, token_keys, _padded(v.to(dtype), width), scale=1.0)
    context = torch.where(live, context[..., :head_dim], 0.0)  # (B, h, m, dh) = (A^T V) / Lambda, 1/0 -> 0

    width = _head_width(head_dim, qk.device)
    anchor_keys = _padded(anchors, width).expand(batch, heads, n_anchors, width)
    out = F.scaled_dot_product_attention(_padded(qk, width), anchor_keys, _padded(context, width), scale=scale)
    return out[..., :head_dim].to(v.dtype)
