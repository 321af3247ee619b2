"""The fused anchor-mix kernels against the PyTorch path under both launch plans, and the
dispatcher's choices.

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
from torch.utils._python_dispatch import TorchDispatchMode
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
from kernel_fixtures import DEVICE, mix_inputs, mix_with_grads, relative_error  # noqa: E402

from anchorformer.kernels import anchor_mix, anchor_mix_triton, autotune, dispatch  # noqa: E402
from anchorformer.kernels.dispatch import anchor_mix_fast, select_backend, set_backend  # noqa: E402
from anchorformer.models.anchor_attention import AnchorAttention  # noqa: E402

# bfloat16 (the training dtype) on a GPU; float16 takes the same code path, and each extra dtype
# costs GPU check time in kernel compilation
LOW_PRECISION = [torch.bfloat16] if DEVICE.type == "cuda" else [torch.float16]
# (batch, heads, tokens, head dim, anchors): an odd n over several token blocks, ragged last block
# (the token split gives 2 splits of 3 fp32 blocks, the last one past the end); fewer tokens than
# one block with non-power-of-two dh and m; exact blocks at the models' dh and m. On a GPU the
# last shape also runs: 192 programs, more than an H200's 132 SMs, where auto takes the
# one-program plan (too slow for the interpreter, which covers its code paths with the first).
SHAPES = [(2, 3, 151, 32, 30), (1, 2, 5, 24, 7), (1, 2, 128, 64, 30)]
if DEVICE.type == "cuda":
    SHAPES.append((64, 3, 300, 64, 30))
PLANS = ["one-program", "token-split"]
# (token dtype, anchor dtype): the anchors arrive in fp32 under autocast, rounded in the kernels
DTYPES = [(torch.float32, torch.float32)] + [(low, low) for low in LOW_PRECISION] + [
    (low, torch.float32) for low in LOW_PRECISION]
# max |kernel - float64 reference| / max |reference|, per input dtype: fp32 products are exact
# ("ieee") up to summation order; 16-bit inputs round A, C and D to 8 (bf16) or 11 (fp16) bits.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def _reset_backend(monkeypatch):
    if INTERPRETED:  # the dispatcher accepts CPU tensors for the kernels only under the interpreter
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(autotune, "_choices", {})  # each test meets its keys for the first time
    monkeypatch.setattr(autotune, "_records", {})
    monkeypatch.setattr(autotune, "_ROUNDS", 1)  # the interpreter is slow; test_autotune.py checks the timing
    set_backend(None)
    anchor_mix_triton.set_plan("auto")
    yield
    set_backend(None)
    anchor_mix_triton.set_plan("auto")


@pytest.mark.parametrize("dtype, anchor_dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("plan", PLANS)
def test_triton_forward_and_gradients_match_reference(plan, shape, dtype, anchor_dtype):
    set_backend("triton")
    anchor_mix_triton.set_plan(plan)
    qk, anchors, v, grad = mix_inputs(shape, dtype, anchor_dtype)
    assert not (qk.is_contiguous() or v.is_contiguous() or anchors.is_contiguous() or grad.is_contiguous())
    fused = mix_with_grads(anchor_mix_fast, qk, anchors, v, grad)
    reference = mix_with_grads(anchor_mix, qk.double(), anchors.double(), v.double(), grad.double())
    for name, actual, expected in zip(["out", "d_qk", "d_anchors", "d_v"], fused, reference):
        assert actual.dtype == (anchor_dtype if name == "d_anchors" else dtype), name
        assert actual.shape == expected.shape, name
        error = relative_error(actual, expected)
        assert error <= TOLERANCE[dtype], f"{name}: relative error {error:.2e} > {TOLERANCE[dtype]:.0e}"


@pytest.mark.parametrize("plan", PLANS)
def test_anchor_attention_layer_trains_as_accurately_through_the_kernels(plan):
    # the layer as models use it: fp32 weights, bf16 autocast on a GPU (fp32 under the interpreter),
    # against the layer in float64; the kernels must be about as close to it as the PyTorch path
    anchor_mix_triton.set_plan(plan)
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
        kernel_error = relative_error(kernels[name], expected)
        pytorch_error = relative_error(pytorch_path[name], expected)
        assert kernel_error <= max(2 * pytorch_error, TOLERANCE[dtype]), (name, kernel_error, pytorch_error)


def test_output_is_stored_token_major_so_merging_heads_is_free():
    set_backend("triton")
    qk, anchors, v, _ = mix_inputs(SHAPES[0], torch.float32)
    out = anchor_mix_fast(qk, anchors, v, 0.5)
    merged = out.transpose(1, 2)
    assert merged.is_contiguous()
    torch.testing.assert_close(out, anchor_mix(qk, anchors, v, 0.5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("plan", PLANS)
def test_anchor_with_zero_degree_gives_zero_and_finite_gradients(plan):
    # every token points along +e0, anchor 0 along -e0 far away: its softmax weight underflows
    # to exactly 0 for every token, so Lambda_0 = 0 and the 1/0 guard must hold in both directions.
    set_backend("triton")
    anchor_mix_triton.set_plan(plan)
    qk, anchors, v, grad = mix_inputs((1, 2, 70, 24, 7), torch.float32)  # the tile of SHAPES[1]: no extra compile
    qk = qk.abs() + 1.0
    anchors = anchors.clone()
    anchors[0] = -1e4
    assert anchor_mix(qk, anchors, v, 0.25).isfinite().all()
    fused = mix_with_grads(anchor_mix_fast, qk, anchors, v, grad)
    reference = mix_with_grads(anchor_mix, qk.double(), anchors.double(), v.double(), grad.double())
    for name, actual, expected in zip(["out", "d_qk", "d_anchors", "d_v"], fused, reference):
        assert actual.isfinite().all(), name
        torch.testing.assert_close(actual.double(), expected, rtol=1e-4, atol=1e-5, msg=name)
    assert fused[2][0].abs().max() == 0  # the dead anchor gets no gradient


def test_plan_rule_splits_tokens_only_where_heads_leave_multiprocessors_idle():
    splits_tokens = anchor_mix_triton._splits_tokens
    assert not splits_tokens(programs=128 * 12, n_blocks=4, multiprocessors=132)  # AF-B training
    assert splits_tokens(programs=4 * 3, n_blocks=50, multiprocessors=132)  # small batch, many tokens
    assert not splits_tokens(programs=4 * 3, n_blocks=1, multiprocessors=132)  # nothing to split


def test_plan_is_cached_per_shape_and_forced_by_name():
    qk, anchors, _, _ = mix_inputs(SHAPES[0], torch.float32)
    assert anchor_mix_triton.plan_name(qk, anchors) == "one-program"  # 6 programs on the interpreter's 2 SMs
    anchor_mix_triton.set_plan("token-split")
    assert anchor_mix_triton.plan_name(qk, anchors) == "token-split"
    hits = anchor_mix_triton._launch.cache_info().hits
    anchor_mix_triton.plan_name(qk, anchors)
    assert anchor_mix_triton._launch.cache_info().hits == hits + 1
    with pytest.raises(ValueError, match=r"'split'.*choose from"):
        anchor_mix_triton.set_plan("split")


def test_plan_from_environment(monkeypatch):
    monkeypatch.setenv(anchor_mix_triton.PLAN_ENV_VAR, "token-split")
    assert anchor_mix_triton._plan_from_environment() == "token-split"
    monkeypatch.setenv(anchor_mix_triton.PLAN_ENV_VAR, "fastest")
    with pytest.raises(ValueError, match=r"'fastest' from \$ANCHORFORMER_ANCHOR_MIX_PLAN"):
        anchor_mix_triton._plan_from_environment()


class _LaunchRecorder(TorchDispatchMode):
    """Records what one call launches: each Triton kernel by name and each torch op that
    computes (views and allocations launch nothing)."""

    _ALLOCATIONS = {torch.ops.aten.empty, torch.ops.aten.empty_like, torch.ops.aten.new_empty,
                    torch.ops.aten.empty_strided}

    def __init__(self, monkeypatch):
        super().__init__()
        self.launches = []
        self._in_triton = False  # the interpreter's own tensor work is not a launch
        for name in dir(anchor_mix_triton):
            if name.endswith("_kernel"):
                monkeypatch.setattr(anchor_mix_triton, name, self._recorded(getattr(anchor_mix_triton, name)))

    def _recorded(self, kernel):
        recorder = self

        class Recorded:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    recorder.launches.append(kernel.fn.__name__)
                    recorder._in_triton = True
                    try:
                        return kernel[grid](*args, **kwargs)
                    finally:
                        recorder._in_triton = False
                return launch

        return Recorded()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not (self._in_triton or func.is_view or func.overloadpacket in self._ALLOCATIONS):
            self.launches.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("plan, anchor_dtype, forward_launches, backward_launches", [
    ("one-program", torch.float32, ["_one_program_forward_kernel"], ["_one_program_backward_kernel", "sum"]),
    ("one-program", torch.float16, ["_one_program_forward_kernel"], ["_one_program_backward_kernel", "sum",
                                                                     "_to_copy"]),
    ("token-split", torch.float32, ["_gather_kernel", "_finish_forward_kernel", "_scatter_kernel"],
     ["_gather_kernel", "_finish_backward_kernel", "_token_split_backward_kernel", "sum"]),
])
def test_launches_per_plan(plan, anchor_dtype, forward_launches, backward_launches, monkeypatch):
    # the one-program plan: one forward launch, two backward ones (the kernel and dU's sum over
    # heads) with fp32 anchors (autocast), a third (the cast of dU) only for 16-bit anchors
    anchor_mix_triton.set_plan(plan)
    qk, anchors, v, grad = mix_inputs(SHAPES[0], torch.float16, anchor_dtype)
    recorder = _LaunchRecorder(monkeypatch)
    with recorder:
        _, state = anchor_mix_triton.forward(qk, anchors, v, 0.25)
    assert recorder.launches == forward_launches
    recorder.launches.clear()
    with recorder:
        anchor_mix_triton.backward(grad, qk, anchors, v, 0.25, state)
    assert recorder.launches == backward_launches


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("plan", PLANS)
def test_kernels_replay_inside_a_cuda_graph(plan):
    set_backend("triton")
    anchor_mix_triton.set_plan(plan)
    qk, anchors, v, grad = mix_inputs(SHAPES[0], torch.bfloat16, torch.float32)
    leaves = [t.detach().clone().requires_grad_() for t in (qk, anchors, v)]
    side = torch.cuda.Stream()  # warm-up (kernel compilation, the plan cache) off the capture stream
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        anchor_mix_fast(*leaves, 0.25).backward(grad)
    torch.cuda.current_stream().wait_stream(side)
    for leaf in leaves:
        leaf.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = anchor_mix_fast(*leaves, 0.25)
        out.backward(grad)
    fresh = mix_inputs(SHAPES[0], torch.bfloat16, torch.float32, seed=1)
    with torch.no_grad():
        for static, new in zip(leaves + [grad], fresh):
            static.copy_(new)
    graph.replay()
    expected = mix_with_grads(anchor_mix_fast, *fresh)
    for name, actual, wanted in zip(["out", "d_qk", "d_anchors", "d_v"], [out] + [t.grad for t in leaves], expected):
        torch.testing.assert_close(actual, wanted, rtol=0, atol=0, msg=name)  # deterministic kernels


def test_auto_on_cpu_times_sdpa_and_pytorch_and_refuses_forced_triton(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    qk, anchors, v, _ = (t.cpu() for t in mix_inputs(SHAPES[1], torch.float32))
    choice = select_backend(qk, anchors, v)
    (decision,) = autotune.decisions()
    assert set(decision["ms"]) == {"sdpa", "torch"}  # compile is never a candidate, triton needs CUDA here
    assert choice == decision["choice"] == min(decision["ms"], key=decision["ms"].get)
    torch.testing.assert_close(anchor_mix_fast(qk, anchors, v, 0.5), anchor_mix(qk, anchors, v, 0.5))
    set_backend("triton")
    with pytest.raises(ValueError, match="need CUDA"):
        select_backend(qk, anchors, v)


def _timed_backends(qk, anchors, v) -> set[str]:
    select_backend(qk, anchors, v)
    return set(autotune.decisions()[-1]["ms"])


def test_auto_times_triton_only_where_the_kernels_take_the_inputs():
    qk, anchors, v, _ = mix_inputs(SHAPES[1], torch.float32)
    assert _timed_backends(qk, anchors, v) == {"triton", "sdpa", "torch"}
    assert _timed_backends(qk.double(), anchors.double(), v.double()) == {"sdpa", "torch"}
    wide = torch.randn(200, qk.shape[-1], device=DEVICE)
    assert _timed_backends(qk, wide, v) == {"sdpa", "torch"}
    # dh=128: 16-bit inputs fit the kernels' shared-memory budget, fp32 ones do not
    qk_128, anchors_128, v_128, _ = mix_inputs((1, 1, 8, 128, 30), torch.float32)
    assert _timed_backends(qk_128, anchors_128, v_128) == {"sdpa", "torch"}
    assert _timed_backends(qk_128.half(), anchors_128, v_128.half()) == {"triton", "sdpa", "torch"}
    set_backend("triton")
    with pytest.raises(ValueError, match="m=200"):
        select_backend(qk, wide, v)


def test_untimed_rule_takes_the_kernels_for_cuda_tensors_they_support():
    # what a graph torch.compile traces takes, and a call under a dispatch mode with no decision
    qk, anchors, v, _ = mix_inputs(SHAPES[1], torch.float32)
    assert autotune.untimed_choice(qk, anchors, v) == ("triton" if DEVICE.type == "cuda" else "torch")
    assert autotune.untimed_choice(qk.double(), anchors.double(), v.double()) == "torch"


def test_backend_from_environment_and_unknown_names(monkeypatch):
    qk, anchors, v, _ = mix_inputs(SHAPES[0], torch.float32)
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
    qk, anchors, v, grad = mix_inputs((1, 2, 20, 16, 5), torch.float32)
    compiled = mix_with_grads(anchor_mix_fast, qk, anchors, v, grad)
    eager = mix_with_grads(anchor_mix, qk, anchors, v, grad)
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
    qk, anchors, v, grad = mix_inputs((1, 2, 20, 16, 5), torch.float32)
    calls_before = dispatch.backend_calls()
    assert "anchorformer.anchor_mix_forward.default" not in _traced_calls(anchor_mix_fast, qk, anchors, v, 0.25)
    torch._dynamo.reset()
    compiled = mix_with_grads(torch.compile(anchor_mix_fast), qk, anchors, v, grad)
    assert dispatch.backend_calls() == calls_before  # nothing dispatched at run time: all in the graph
    assert autotune.decisions() == []  # nothing timed while tracing
    eager = mix_with_grads(anchor_mix, qk, anchors, v, grad)
    for name, actual, expected in zip(["out", "d_qk", "d_anchors", "d_v"], compiled, eager):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=name)


def test_flop_counter_counts_the_kernels_as_the_pytorch_path():
    # MFU counts the maths' FLOPs: the fused ops must count what the reference path counts
    qk, anchors, v, grad = mix_inputs((2, 3, 40, 16, 5), torch.float32)
    counts = {}
    for backend in ("triton", "torch"):
        set_backend(backend)
        counter = FlopCounterMode(display=False)
        with counter:
            mix_with_grads(anchor_mix_fast, qk, anchors, v, grad)
        counts[backend] = counter.get_flop_counts()
    fused = counts["triton"]["Global"]
    assert set(map(str, fused)) == {"anchorformer.anchor_mix_forward", "anchorformer.anchor_mix_backward"}
    assert sum(fused.values()) == sum(counts["torch"]["Global"].values()) == 3 * 6 * 2 * 3 * 40 * 5 * 16


def test_eager_autograd_takes_the_short_path_and_dispatch_modes_the_custom_op():
    set_backend("triton")
    qk, anchors, v, _ = mix_inputs((1, 2, 20, 16, 5), torch.float32)
    leaves = [t.detach().clone().requires_grad_() for t in (qk, anchors, v)]
    assert type(anchor_mix_fast(*leaves, 0.25).grad_fn).__name__ == "_FusedAnchorMixBackward"
    with FlopCounterMode(display=False):
        assert "anchor_mix_forward" in type(anchor_mix_fast(*leaves, 0.25).grad_fn).__name__.lower()


@pytest.mark.parametrize("dtype, anchor_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float32)])
def test_custom_ops_pass_torch_library_checks(dtype, anchor_dtype):
    # schema, fake (meta) outputs with the kernels' strides and dtypes, autograd registration, AOT tracing
    qk, anchors, v, _ = mix_inputs((1, 2, 20, 16, 5), dtype, anchor_dtype)
    leaves = [t.detach().clone().requires_grad_() for t in (qk, anchors, v)]
    torch.library.opcheck(torch.ops.anchorformer.anchor_mix_forward.default, (*leaves, 0.25))


def test_compiled_model_keeps_the_kernels_when_asked_by_name():
    # fullgraph: the custom op traces without a graph break, and the graph calls it
    set_backend("triton")
    qk, anchors, v, grad = mix_inputs((1, 2, 20, 16, 5), torch.float32)
    assert "anchorformer.anchor_mix_forward.default" in _traced_calls(anchor_mix_fast, qk, anchors, v, 0.25)
    torch._dynamo.reset()
    fused = mix_with_grads(torch.compile(anchor_mix_fast, backend="aot_eager", fullgraph=True), qk, anchors, v, grad)
    eager = mix_with_grads(anchor_mix, qk, anchors, v, grad)
    for name, actual, expected in zip(["out", "d_qk", "d_anchors", "d_v"], fused, eager):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=name)


# Compiles every kernel to sm_90 machine code with the ptxas that ships with triton: catches what
# the interpreter lets through (operand dtypes of tl.dot, layouts), checks the shared-memory budget
# of the largest tiles the dispatcher lets through (16-bit tokens with 16-bit or fp32 anchors, fp32)
# and that the models' tile (dh=64, m=30 under autocast) spills no registers. Needs no GPU.
_COMPILE_FOR_HOPPER = textwrap.dedent("""
    import os, re, subprocess, tempfile
    import torch, triton
    import triton.backends.nvidia
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from anchorformer.kernels import anchor_mix_triton as k

    TOKENS = ("x_ptr", "y_ptr", "v_ptr", "g_ptr", "out_ptr", "dx_ptr", "dv_ptr")
    PTXAS = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "ptxas")

    def signature(fn, tokens, anchors, constants):
        def kind(name):
            if name in constants:
                return "constexpr"
            if name.endswith("_ptr"):
                return "*" + (tokens if name in TOKENS else anchors if name == "u_ptr" else "fp32")
            return "fp32" if name == "scale" else "i32"
        return {name: kind(name) for name in fn.arg_names}

    def spilled_bytes(ptx):
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as source:
            source.write(ptx)
            source.flush()
            report = subprocess.run([PTXAS, "-v", "--gpu-name=sm_90a", source.name, "-o", os.devnull],
                                    capture_output=True, text=True, check=True).stderr
        return sum(map(int, re.findall(r"(\\d+) bytes spill (?:stores|loads)", report)))

    kernels = [getattr(k, name) for name in dir(k) if name.endswith("_kernel")]
    for tokens, anchors, block_d, check in (("bf16", "bf16", 128, "shared"), ("bf16", "fp32", 128, "shared"),
                                             ("fp32", "fp32", 64, "shared"), ("bf16", "fp32", 64, "spills")):
        dtype = torch.float32 if tokens == "fp32" else torch.bfloat16
        constants = dict(BLOCK_M=32, BLOCK_D=block_d, BLOCK_N=k._LIMITS[dtype].block_n,
                         DOT_PRECISION="ieee" if tokens == "fp32" else "tf32")
        for fn in kernels:
            used = {name: value for name, value in constants.items() if name in fn.arg_names}
            compiled = triton.compile(ASTSource(fn, signature(fn, tokens, anchors, used), constexprs=used),
                                      target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
            if check == "shared":
                print(tokens, anchors, block_d, fn.__name__, "shared", compiled.metadata.shared)
                assert compiled.metadata.shared <= 100 * 1024, (tokens, anchors, fn.__name__, compiled.metadata.shared)
            else:
                spilled = spilled_bytes(compiled.asm["ptx"])
                print(tokens, anchors, block_d, fn.__name__, "spilled", spilled)
                assert spilled == 0, (tokens, anchors, fn.__name__, spilled)
""")


@pytest.mark.slow
def test_kernels_compile_for_hopper_within_shared_memory_budget():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE_FOR_HOPPER], env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    kernels = [name for name in dir(anchor_mix_triton) if name.endswith("_kernel")]
    assert len(kernels) == 7 and len(result.stdout.splitlines()) == 4 * len(kernels), result.stdout
