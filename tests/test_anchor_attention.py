"""Anchor attention against the explicit O(n^2) form of the paper, and its numerics."""
import pytest
import torch

from anchorformer.kernels import anchor_mix
from anchorformer.models.anchor_attention import AnchorAttention


def reference_similarity(qk: torch.Tensor, anchors: torch.Tensor, scale: float) -> torch.Tensor:
    """S = A diag(1/Lambda) A^T, the n x n matrix the fast path never forms (1/0 -> 0)."""
    assign = torch.softmax(qk @ anchors.t() * scale, dim=-1)
    degree = assign.sum(dim=-2)
    inv_degree = torch.where(degree > 0, 1.0 / degree, torch.zeros_like(degree))
    return assign @ torch.diag_embed(inv_degree) @ assign.transpose(-2, -1)


def random_inputs(batch=2, heads=3, tokens=37, head_dim=16, anchors=7, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    qk = torch.randn(batch, heads, tokens, head_dim, generator=gen, dtype=dtype)
    u = torch.randn(anchors, head_dim, generator=gen, dtype=dtype)
    v = torch.randn(batch, heads, tokens, head_dim, generator=gen, dtype=dtype)
    return qk, u, v


def test_fast_path_equals_explicit_similarity_in_float64():
    qk, u, v = random_inputs()
    scale = qk.shape[-1] ** -0.5
    s = reference_similarity(qk, u, scale)
    torch.testing.assert_close(anchor_mix(qk, u, v, scale), s @ v, rtol=0, atol=1e-10)


def test_similarity_is_symmetric_and_row_stochastic():
    qk, u, _ = random_inputs(tokens=50, anchors=30)
    s = reference_similarity(qk, u, qk.shape[-1] ** -0.5)
    torch.testing.assert_close(s, s.transpose(-2, -1), rtol=0, atol=1e-12)
    torch.testing.assert_close(s.sum(-1), torch.ones(s.shape[:-1], dtype=s.dtype), rtol=0, atol=1e-12)
    assert (s >= 0).all()


def test_anchor_nobody_picks_contributes_nothing_and_keeps_gradients_finite():
    qk, u, v = random_inputs(dtype=torch.float32)
    qk = qk.abs().requires_grad_()  # every token has positive features ...
    u = u.clone()
    u[0] = -1e4  # ... so anchor 0's logits are hugely negative: its degree underflows to exactly 0
    u.requires_grad_()
    v.requires_grad_()
    scale = qk.shape[-1] ** -0.5
    assign = torch.softmax(qk @ u.t() * scale, dim=-1)
    assert (assign[..., 0].sum(-1) == 0).all()
    out = anchor_mix(qk, u, v, scale)
    expected = reference_similarity(qk.double(), u.double(), scale) @ v.double()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    for grad in (qk.grad, u.grad, v.grad):
        assert torch.isfinite(grad).all()


def test_gradients_match_the_explicit_form():
    qk, u, v = (t.requires_grad_() for t in random_inputs(tokens=19))
    scale = qk.shape[-1] ** -0.5
    weights = torch.randn(qk.shape, dtype=qk.dtype)
    fast = torch.autograd.grad((anchor_mix(qk, u, v, scale) * weights).sum(), (qk, u, v))
    slow = torch.autograd.grad(((reference_similarity(qk, u, scale) @ v) * weights).sum(), (qk, u, v))
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_layer_is_per_head_anchor_mixing_with_one_qk_projection():
    torch.manual_seed(0)
    layer = AnchorAttention(dim=48, num_heads=4, num_anchors=5).double()
    x = torch.randn(2, 11, 48, dtype=torch.float64)
    qk, v = layer.qk_v(x).chunk(2, dim=-1)
    heads = [reference_similarity(qk[..., h * 12:(h + 1) * 12], layer.anchors.weight, 12 ** -0.5)
             @ v[..., h * 12:(h + 1) * 12] for h in range(4)]
    expected = layer.proj(torch.cat(heads, dim=-1))
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-10)
    assert layer.qk_v.bias is None and layer.anchors.bias is None and layer.proj.bias is not None
    assert layer.anchors.weight.shape == (5, 12)  # shared by the heads


def test_bf16_autocast_output_close_to_fp32_and_softmax_in_fp32():
    torch.manual_seed(0)
    layer = AnchorAttention(dim=64, num_heads=4, num_anchors=30)
    x = torch.randn(2, 197, 64)
    with torch.no_grad():
        layer.anchors.weight.mul_(300.0)  # sharp assignments: logits far outside bf16's precision
        expected = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    rel = (out.float() - expected).norm() / expected.norm()
    assert rel < 2e-2, rel


def test_fp16_inputs_with_sharp_assignments_stay_accurate():
    qk, u, v = random_inputs(tokens=257, head_dim=32, anchors=30, dtype=torch.float32)
    qk, u = qk * 8, u * 8  # logits up to ~250: exp() overflows fp16 (and fp32) without care
    scale = 32 ** -0.5
    out = anchor_mix(qk.half(), u.half(), v.half(), scale)
    expected = reference_similarity(qk.double(), u.double(), scale) @ v.double()
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert (out.double() - expected).norm() / expected.norm() < 1e-2


def test_compiles_without_graph_breaks():
    torch._dynamo.reset()
    layer = AnchorAttention(dim=32, num_heads=2, num_anchors=4)
    x = torch.randn(2, 9, 32)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))
    compiled(x).sum().backward()
    assert layer.anchors.weight.grad is not None


@pytest.mark.parametrize("kwargs, name", [
    (dict(dim=48, num_heads=4, num_anchors=0), "num_anchors"),
    (dict(dim=50, num_heads=4), "num_heads"),
    (dict(dim=48, num_heads=4, attn_drop=0.1), "attn_drop"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        AnchorAttention(**kwargs)
