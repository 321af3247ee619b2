"""The fused anchor-mix kernels against the PyTorch path, and the dispatcher's choices.

Without a GPU the kernels run through Triton's interpreter (TRITON_INTERPRET=1, set below before
the kernels are imported); with one they are compiled and run on CUDA. The interpreter's
``tl.dot`` mishandles bfloat16 operands, so bfloat16 is checked on CUDA only; float16 exercises
the same low-precision roundings on CPU.
"""
import copy
import importlib
import os
import subprocess
import sys
import textwrap

import torch
from torch.utils.flop_counter import FlopCounterMode

INTERPRETED = not torch.cuda.is_available()
if INTERPRETED:
    # triton decides interpreted vs compiled when a function is defined: for its own library
    # (tl.sum, tl.max, tl.zeros) when triton is first imported, which torch does while other test
    # modules are collected, and for our kernels when their module is imported. Define both again
    # under the variable, then restore it so that no other test module runs the interpreter.
    os.environ["TRITON_INTERPRET"] = "1"
    import triton.language
    import triton.language.standard

    importlib.reload(triton.language.standard)
    importlib.reload(triton.language)  # rebinds tl.sum & co. to the reloaded library
    if "anchorformer.kernels.anchor_mix_triton" in sys.modules:
        importlib.reload(sys.modules["anchorformer.kernels.anchor_mix_triton"])
    else:
        importlib.import_module("anchorformer.kernels.anchor_mix_triton")
    del os.environ["TRITON_INTERPRET"]

import pytest  # noqa: E402

from anchorformer.kernels import anchor_mix, dispatch  # noqa: E402
from anchorformer.kernels.dispatch import anchor_mix_fast, select_backend, set_backend  # noqa: E402
from anchorformer.models.anchor_attention import AnchorAttention  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# bfloat16 (the training dtype) on a GPU; float16 takes the same code path, and each extra dtype
# costs GPU check time in kernel compilation
LOW_PRECISION = [torch.bfloat16] if DEVICE.type == "cuda" else [torch.float16]
# (batch, heads, tokens, head dim, anchors): several token blocks split across programs with a
# ragged last block; fewer tokens than one block with non-power-of-two dh and m; exact blocks at
# the models' dh and m. On a GPU, programs take several token blocks only when batch x heads is
# large, hence the last shape there (too slow for the interpreter, which covers it with the first).
SHAPES = [(2, 3, 150, 32, 30), (1, 2, 5, 24, 7), (1, 2, 128, 64, 30)]
if DEVICE.type == "cuda":
    SHAPES.append((64, 3, 300, 64, 30))
# max |kernel - float64 reference| / max |reference|, per input dtype: fp32 products are exact
# ("ieee") up to summation order; 16-bit inputs round A, C and D to 8 (bf16) or 11 (fp16) bits.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def _reset_backend(monkeypatch):
    if INTERPRETED:  # the dispatcher accepts CPU tensors for the kernels only under the interpreter
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    set_backend(None)
    yield
    set_backend(None)


def _inputs(shape, dtype, seed=0):
    """Strided qk and v as the layer makes them (views of one projection), anchors, and a gradient."""
    batch, heads, tokens, head_dim, n_anchors = shape
    generator = torch.Generator().manual_seed(seed)
    qk_v = torch.randn(batch, tokens, 2, heads, head_dim, generator=generator, dtype=torch.float64)
    anchors = torch.randn(n_anchors, head_dim, generator=generator, dtype=torch.float64)
    grad = torch.randn(batch, heads, tokens, head_dim, generator=generator, dtype=torch.float64)
    qk, v = qk_v.to(DEVICE, dtype).permute(2, 0, 3, 1, 4)
    return qk, anchors.to(DEVICE, dtype), v, grad.to(DEVICE, dtype)


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


def _mix_with_grads(fn, qk, anchors, v, grad):
    leaves = [t.detach().clone().requires_grad_() for t in (qk, anchors, v)]
    out = fn(*leaves, leaves[0].shape[-1] ** -0.5)
    out.backward(grad)
    return [out] + [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("dtype", [torch.float32] + LOW_PRECISION)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_forward_and_gradients_match_reference(shape, dtype):
    set_backend("triton")
    qk, anchors, v, grad = _inputs(shape, dtype)
    fused = _mix_with_grads(anchor_mix_fast, qk, anchors, v, grad)
    reference = _mix_with_grads(anchor_mix, qk.double(), anchors.double(), v.double(), grad.double())
    for name, actual, expected in zip(["out", "d_qk", "d_anchors", "d_v"], fused, reference):
        assert actual.dtype == dtype and actual.shape == expected.shape, name
        error = _relative_error(actual, expected)
        assert error <= TOLERANCE[dtype], f"{name}: relative error {error:.2e} > {TOLERANCE[dtype]:.0e}"


def test_anchor_attention_layer_trains_as_accurately_through_the_kernels():
    # the layer as models use it: fp32 weights, bf16 autocast on a GPU (fp32 under the interpreter),
    # against the layer in float64; the kernels must be about as close to it as the PyTorch path
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    torch.manual_seed(0)
    layer = AnchorAttention(64, num_heads=2, num_anchors=30).to(DEVICE)  # the tile of SHAPES[0]
    x = torch.randn(2, 150, 64, device=DEVICE)

    def train_step(backend: str, precision: torch.dtype):
        set_backend(backend)
        model = copy.deepcopy(layer).to(torch.float64 if precision == torch.float64 else torch.float32)
        inputs = x.to(model.qk_v.weight.dtype, copy=True).requires_grad_()
        calls_before = dispatch.backend_calls().get(backend, 0)
        with torch.autocast(DEVICE.type, dtype=precision, enabled=precision == torch.bfloat16):
            out = model(inputs)
        out.double().square().mean().backward()
        assert dispatch.backend_calls()[backend] == calls_before + 1
        return {"out": out, "d_x": inputs.grad, **{name: p.grad for name, p in model.named_parameters()}}

    exact = train_step("torch", torch.float64)
    pytorch_path = train_step("torch", dtype)
    kernels = train_step("triton", dtype)
    for name, expected in exact.items():
        kernel_error = _relative_error(kernels[name], expected)
        pytorch_error = _relative_error(pytorch_path[name], expected)
        assert kernel_error <= max(2 * pytorch_error, TOLERANCE[dtype]), (name, kernel_error, pytorch_error)


def test_output_is_stored_token_major_so_merging_heads_is_free():
    set_backend("triton")
    qk, anchors, v, _ = _inputs(SHAPES[0], torch.float32)
    out = anchor_mix_fast(qk, anchors, v, 0.5)
    merged = out.transpose(1, 2)
    assert merged.is_contiguous()
    torch.testing.assert_close(out, anchor_mix(qk, anchors, v, 0.5), rtol=1e-5, atol=1e-5)


def test_anchor_with_zero_degree_gives_zero_and_finite_gradients():
    # every token points along +e0, anchor 0 along -e0 far away: its softmax weight underflows
    # to exactly 0 for every token, so Lambda_0 = 0 and the 1/0 guard must hold in both directions.
    set_backend("triton")
    qk, anchors, v, grad = _inputs((1, 2, 70, 24, 7), torch.float32)  # the tile of SHAPES[1]: no extra compile
    qk = qk.abs() + 1.0
    anchors = anchors.clone()
    anchors[0] = -1e4
    assert anchor_mix(qk, anchors, v, 0.25).isfinite().all()
    fused = _mix_with_grads(anchor_mix_fast, qk, anchors, v, grad)
    reference = _mix_with_grads(anchor_mix, qk.double(), anchors.double(), v.double(), grad.double())
    for name, actual, expected in zip(["out", "d_qk", "d_anchors", "d_v"], fused, reference):
        assert actual.isfinite().all(), name
        torch.testing.assert_close(actual.double(), expected, rtol=1e-4, atol=1e-5, msg=name)
    assert fused[2][0].abs().max() == 0  # the dead anchor gets no gradient


def test_auto_picks_pytorch_path_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    qk, anchors, v, _ = (t.cpu() for t in _inputs(SHAPES[0], torch.float32))
    assert select_backend(qk, anchors, v) == "torch"
    torch.testing.assert_close(anchor_mix_fast(qk, anchors, v, 0.5), anchor_mix(qk, anchors, v, 0.5), rtol=0, atol=0)
    set_backend("triton")
    with pytest.raises(ValueError, match="need CUDA"):
        select_backend(qk, anchors, v)


def test_auto_picks_triton_where_supported_and_falls_back_elsewhere():
    qk, anchors, v, _ = _inputs(SHAPES[0], torch.float32)
    assert select_backend(qk, anchors, v) == "triton"
    assert select_backend(qk.double(), anchors.double(), v.double()) == "torch"
    wide = torch.randn(200, qk.shape[-1], device=DEVICE)
    assert select_backend(qk, wide, v) == "torch"
    # dh=128: 16-bit inputs fit the kernels' shared-memory budget, fp32 ones do not
    qk_128, anchors_128, v_128, _ = _inputs((1, 1, 8, 128, 30), torch.float32)
    assert select_backend(qk_128, anchors_128, v_128) == "torch"
    assert select_backend(qk_128.half(), anchors_128, v_128.half()) == "triton"
    set_backend("triton")
    with pytest.raises(ValueError, match="m=200"):
        select_backend(qk, wide, v)


def test_backend_from_environment_and_unknown_names(monkeypatch):
    qk, anchors, v, _ = _inputs(SHAPES[0], torch.float32)
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert select_backend(qk, anchors, v) == "torch"
    set_backend("triton")  # the function wins over the variable
    assert select_backend(qk, anchors, v) == "triton"
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda-graphs")
    set_backend(None)
    with pytest.raises(ValueError, match=r"'cuda-graphs'.*ANCHORFORMER_ANCHOR_MIX.*'auto'"):
        select_backend(qk, anchors, v)
    with pytest.raises(ValueError, match="choose from"):
        set_backend("fused")


@pytest.mark.slow
def test_compiled_pytorch_path_matches_eager():
    set_backend("compile")
    qk, anchors, v, grad = _inputs((1, 2, 20, 16, 5), torch.float32)
    compiled = _mix_with_grads(anchor_mix_fast, qk, anchors, v, grad)
    eager = _mix_with_grads(anchor_mix, qk, anchors, v, grad)
    for name, actual, expected in zip(["out", "d_qk", "d_anchors", "d_v"], compiled, eager):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=name)


def _traced_calls(fn, *args) -> list[str]:
    """The functions that torch.compile's graph of ``fn(*args)`` calls (nothing is compiled)."""
    traced = []

    def record_graph(graph_module, example_inputs):
        traced.extend(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return graph_module.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=record_graph, fullgraph=True)(*args)
    return traced


@pytest.mark.slow
def test_compiled_model_on_cpu_fuses_the_pytorch_path():
    # auto inside torch.compile: the kernels only for CUDA tensors (the interpreter accepts CPU
    # tensors in eager mode); on CPU the compiler traces the PyTorch path and fuses it
    qk, anchors, v, grad = _inputs((1, 2, 20, 16, 5), torch.float32)
    calls_before = dispatch.backend_calls()
    assert "anchorformer.anchor_mix_forward.default" not in _traced_calls(anchor_mix_fast, qk, anchors, v, 0.25)
    torch._dynamo.reset()
    compiled = _mix_with_grads(torch.compile(anchor_mix_fast), qk, anchors, v, grad)
    assert dispatch.backend_calls() == calls_before  # nothing dispatched at run time: all in the graph
    eager = _mix_with_grads(anchor_mix, qk, anchors, v, grad)
    for name, actual, expected in zip(["out", "d_qk", "d_anchors", "d_v"], compiled, eager):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=name)


def test_flop_counter_counts_the_kernels_as_the_pytorch_path():
    # MFU counts the maths' FLOPs: the fused ops must count what the reference path counts
    qk, anchors, v, grad = _inputs((2, 3, 40, 16, 5), torch.float32)
    counts = {}
    for backend in ("triton", "torch"):
        set_backend(backend)
        counter = FlopCounterMode(display=False)
        with counter:
            _mix_with_grads(anchor_mix_fast, qk, anchors, v, grad)
        counts[backend] = counter.get_flop_counts()
    fused = counts["triton"]["Global"]
    assert set(map(str, fused)) == {"anchorformer.anchor_mix_forward", "anchorformer.anchor_mix_backward"}
    assert sum(fused.values()) == sum(counts["torch"]["Global"].values()) == 3 * 6 * 2 * 3 * 40 * 5 * 16


def test_eager_autograd_takes_the_short_path_and_dispatch_modes_the_custom_op():
    set_backend("triton")
    qk, anchors, v, _ = _inputs((1, 2, 20, 16, 5), torch.float32)
    leaves = [t.detach().clone().requires_grad_() for t in (qk, anchors, v)]
    assert type(anchor_mix_fast(*leaves, 0.25).grad_fn).__name__ == "_FusedAnchorMixBackward"
    with FlopCounterMode(display=False):
        assert "anchor_mix_forward" in type(anchor_mix_fast(*leaves, 0.25).grad_fn).__name__.lower()


def test_custom_ops_pass_torch_library_checks():
    # schema, fake (meta) outputs with the kernels' strides, autograd registration, AOT tracing
    qk, anchors, v, _ = _inputs((1, 2, 20, 16, 5), torch.float32)
    leaves = [t.detach().clone().requires_grad_() for t in (qk, anchors, v)]
    torch.library.opcheck(torch.ops.anchorformer.anchor_mix_forward.default, (*leaves, 0.25))


def test_compiled_model_keeps_the_kernels_when_asked_by_name():
    # fullgraph: the custom op traces without a graph break, and the graph calls it
    set_backend("triton")
    qk, anchors, v, grad = _inputs((1, 2, 20, 16, 5), torch.float32)
    assert "anchorformer.anchor_mix_forward.default" in _traced_calls(anchor_mix_fast, qk, anchors, v, 0.25)
    torch._dynamo.reset()
    fused = _mix_with_grads(torch.compile(anchor_mix_fast, backend="aot_eager", fullgraph=True), qk, anchors, v, grad)
    eager = _mix_with_grads(anchor_mix, qk, anchors, v, grad)
    for name, actual, expected in zip(["out", "d_qk", "d_anchors", "d_v"], fused, eager):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=name)


# Compiles the kernels to sm_90 machine code with the ptxas that ships with triton: catches what
# the interpreter lets through (operand dtypes of tl.dot, layouts) and checks the shared-memory
# budget of the largest tiles the dispatcher lets through. Runs without a GPU or the interpreter.
_COMPILE_FOR_HOPPER = textwrap.dedent("""
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from anchorformer.kernels import anchor_mix_triton as k

    def signature(fn, element, constants):
        types = {}
        for name in fn.arg_names:
            if name in constants:
                types[name] = "constexpr"
            elif name.endswith("_ptr"):
                low_precision = name in ("x_ptr", "y_ptr", "u_ptr", "v_ptr", "g_ptr", "out_ptr", "dx_ptr", "dv_ptr")
                types[name] = "*" + (element if low_precision else "fp32")
            else:
                types[name] = "fp32" if name == "scale" else "i32"
        return types

    for dtype, element, block_m, block_d in ((torch.bfloat16, "bf16", 32, 128), (torch.float32, "fp32", 32, 64)):
        tile = dict(BLOCK_M=block_m, BLOCK_D=block_d)
        blocks = dict(tile, BLOCK_N=k._LIMITS[dtype].block_n, DOT_PRECISION="ieee" if element == "fp32" else "tf32")
        for fn, constants in ((k._gather_kernel, blocks), (k._scatter_kernel, blocks), (k._backward_kernel, blocks),
                              (k._finish_forward_kernel, tile), (k._finish_backward_kernel, tile)):
            source = ASTSource(fn, signature(fn, element, constants), constexprs=constants)
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
            print(element, fn.__name__, compiled.metadata.shared)
            assert compiled.metadata.shared <= 100 * 1024, (element, fn.__name__, compiled.metadata.shared)
""")


@pytest.mark.slow
def test_kernels_compile_for_hopper_within_shared_memory_budget():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE_FOR_HOPPER], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(result.stdout.splitlines()) == 10, result.stdout
