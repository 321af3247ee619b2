"""The ``sdpa`` backend (two scaled-dot-product attention calls) against the PyTorch reference:
forward and gradients in every dtype, zero-degree anchors under each attention kernel, the layer
through the dispatcher, torch.compile, torch.export and ONNX."""
import copy

import pytest
import timm
import torch
from kernel_fixtures import DEVICE, mix_inputs, mix_with_grads, relative_error
from torch.nn.attention import SDPBackend, sdpa_kernel

import anchorformer.models  # noqa: F401  (registers the models)
from anchorformer.convert import export_graph
from anchorformer.kernels import anchor_mix, anchor_mix_fast, anchor_mix_sdpa, backend_calls, set_backend
from anchorformer.models.anchor_attention import AnchorAttention

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# (batch, heads, tokens, head dim, anchors): an odd n, m=7 with n < m and a head dim that is no
# multiple of 8 (padded on CUDA), the models' tile
SHAPES = [(2, 3, 151, 32, 30), (1, 2, 5, 24, 7), (2, 3, 197, 64, 30)]
# the attention kernels that fuse (the math fallback is what an unpadded call would get)
FUSED = ([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
         if DEVICE.type == "cuda" else [SDPBackend.FLASH_ATTENTION])


@pytest.fixture(autouse=True)
def _reset_backend():
    set_backend(None)
    yield
    set_backend(None)


def _double(tensors):
    return [t.double() for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_gradients_match_the_reference_as_closely_as_the_pytorch_path(shape, dtype):
    qk, anchors, v, grad = mix_inputs(shape, dtype)
    assert not (qk.is_contiguous() or v.is_contiguous() or anchors.is_contiguous() or grad.is_contiguous())
    sdpa = mix_with_grads(anchor_mix_sdpa, qk, anchors, v, grad)
    pytorch_path = mix_with_grads(anchor_mix, qk, anchors, v, grad)
    exact = mix_with_grads(anchor_mix, *_double((qk, anchors, v, grad)))
    floor = 1e-12 if dtype == torch.float64 else 1e-6
    for name, actual, usual, expected in zip(["out", "d_qk", "d_anchors", "d_v"], sdpa, pytorch_path, exact):
        assert actual.dtype == dtype and actual.shape == expected.shape, name
        error, usual_error = relative_error(actual, expected), relative_error(usual, expected)
        assert error <= max(3 * usual_error, floor), f"{name}: {error:.1e} vs the PyTorch path's {usual_error:.1e}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernels", [[SDPBackend.MATH], FUSED], ids=["math", "fused"])
def test_anchor_with_zero_degree_gives_the_references_result_and_no_gradient(kernels, dtype):
    # every token points along +e0, anchor 0 along -e0 far away: its weight underflows to 0 for
    # every token (Lambda_0 = 0), and its logits over the tokens are all hugely negative
    qk, anchors, v, grad = mix_inputs(SHAPES[1][:2] + (70,) + SHAPES[1][3:], dtype)
    qk = qk.abs() + 1.0
    anchors = anchors.clone()
    anchors[0] = -1e4
    if DEVICE.type == "cuda" and dtype == torch.float64 and kernels == FUSED:
        pytest.skip("CUDA's fused attention kernels take no float64")
    with sdpa_kernel(kernels):
        sdpa = mix_with_grads(anchor_mix_sdpa, qk, anchors, v, grad)
    pytorch_path = mix_with_grads(anchor_mix, qk, anchors, v, grad)
    exact = mix_with_grads(anchor_mix, *_double((qk, anchors, v, grad)))
    assert exact[2][0].abs().max() == 0
    for name, actual, usual, expected in zip(["out", "d_qk", "d_anchors", "d_v"], sdpa, pytorch_path, exact):
        assert actual.isfinite().all(), name
        error, usual_error = relative_error(actual, expected), relative_error(usual, expected)
        assert error <= max(3 * usual_error, 1e-12 if dtype == torch.float64 else 1e-6), name
    assert sdpa[2][0].abs().max() == 0  # the dead anchor gets no gradient


def test_anchor_layer_trains_through_the_dispatcher_as_accurately_as_the_pytorch_path():
    torch.manual_seed(0)
    layer = AnchorAttention(64, num_heads=2, num_anchors=30).to(DEVICE)
    x = torch.randn(2, 150, 64, device=DEVICE)
    # a linear loss: the square of an output near the values' mean would leave the anchors a
    # gradient of 1e-9, all cancellation, whose relative error says nothing
    weights = torch.randn(2, 150, 64, device=DEVICE, dtype=torch.float64)

    def train_step(backend: str, dtype: torch.dtype):
        set_backend(backend)
        model = copy.deepcopy(layer).to(dtype)
        inputs = x.to(dtype).requires_grad_()
        calls = backend_calls().get(backend, 0)
        out = model(inputs)
        out.double().mul(weights).sum().backward()
        assert backend_calls()[backend] == calls + 1
        return {"out": out, "d_x": inputs.grad, **{name: p.grad for name, p in model.named_parameters()}}

    exact = train_step("torch", torch.float64)
    pytorch_path = train_step("torch", torch.float32)
    sdpa = train_step("sdpa", torch.float32)
    for name, expected in exact.items():
        error, usual_error = relative_error(sdpa[name], expected), relative_error(pytorch_path[name], expected)
        assert error <= max(3 * usual_error, 1e-5), (name, error, usual_error)


def test_attention_calls_take_the_fused_kernels_not_the_math_fallback():
    # the padding makes queries, keys and values one width (and a multiple of 8 on CUDA): the
    # fused kernels accept the calls (sdpa_kernel raises when none of the allowed ones can run)
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    for shape in SHAPES:
        qk, anchors, v, grad = mix_inputs(shape, dtype)
        with sdpa_kernel(FUSED):
            mix_with_grads(anchor_mix_sdpa, qk, anchors, v, grad)


def test_compiled_graph_traces_the_attention_calls_without_a_break():
    set_backend("sdpa")
    qk, anchors, v, grad = mix_inputs(SHAPES[1], torch.float32)
    torch._dynamo.reset()
    compiled = mix_with_grads(torch.compile(anchor_mix_fast, backend="aot_eager", fullgraph=True), qk, anchors, v,
                               grad)
    eager = mix_with_grads(anchor_mix_sdpa, qk, anchors, v, grad)
    for name, actual, expected in zip(["out", "d_qk", "d_anchors", "d_v"], compiled, eager):
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.slow
def test_inductor_compiled_sdpa_matches_eager():
    qk, anchors, v, grad = mix_inputs(SHAPES[0], torch.float32)
    torch._dynamo.reset()
    compiled = mix_with_grads(torch.compile(anchor_mix_sdpa), qk, anchors, v, grad)
    eager = mix_with_grads(anchor_mix_sdpa, qk, anchors, v, grad)
    for name, actual, expected in zip(["out", "d_qk", "d_anchors", "d_v"], compiled, eager):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_forced_sdpa_exports_attention_ops_that_reproduce_the_pytorch_path(fmt, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("anchorformer_tiny_patch16_224", img_size=32, num_classes=7).eval()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    set_backend("sdpa")
    exported = export_graph(model, fmt, tmp_path / f"model.{fmt}", images, opset=18)
    assert exported.max_difference <= 1e-5
    if fmt == "pt2":
        program = torch.export.load(str(exported.path))
        targets = [str(node.target) for node in program.graph.nodes]
        assert targets.count("aten.scaled_dot_product_attention.default") == 2 * len(model.blocks)
        set_backend("torch")
        with torch.no_grad():
            torch.testing.assert_close(program.module()(images), model(images), rtol=1e-5, atol=1e-5)
