"""``auto`` measures: the first call of a key times the backends that can run there and keeps the
fastest, never timing that key again; the decisions are a JSON-able table that can be pinned (rank
0's on every rank, a checkpoint's on resume) and measured ahead from shapes; timing stays out of
the caller's graph, random stream, activation checkpoints, dispatch modes and traces. On the CPU
(the Triton cases are in test_kernels.py)."""
import json
import logging
import time
import warnings

import pytest
import torch
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

from anchorformer.kernels import (anchor_mix, anchor_mix_fast, autotune, backends, dispatch, select_backend,
                                  set_backend, unavailable_reason)
from anchorformer.models.anchor_attention import AnchorAttention

SHAPE = (2, 3, 40, 16, 7)  # (batch, heads, tokens, head dim, anchors)


@pytest.fixture(autouse=True)
def _fresh_process_state(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setattr(autotune, "_choices", {})
    monkeypatch.setattr(autotune, "_records", {})
    set_backend(None)
    yield
    set_backend(None)


@pytest.fixture
def measurements(monkeypatch) -> list[tuple]:
    """(candidates, train) of every measurement auto makes during the test."""
    made = []
    time_candidates = autotune._time

    def recorded(candidates, qk, anchors, v, train):
        made.append((tuple(candidates), train))
        return time_candidates(candidates, qk, anchors, v, train)

    monkeypatch.setattr(autotune, "_time", recorded)
    return made


def _inputs(shape=SHAPE, dtype=torch.float32, requires_grad=False):
    batch, heads, tokens, head_dim, n_anchors = shape
    generator = torch.Generator().manual_seed(0)
    qk_v = torch.randn(batch, tokens, 2, heads, head_dim, generator=generator, dtype=dtype)
    anchors = torch.randn(n_anchors, head_dim, generator=generator, dtype=dtype).requires_grad_(requires_grad)
    qk, v = qk_v.requires_grad_(requires_grad).permute(2, 0, 3, 1, 4)
    return qk, anchors, v


def test_the_first_call_of_a_key_times_each_candidate_and_keeps_the_fastest(measurements, caplog):
    qk, anchors, v = _inputs()
    with caplog.at_level(logging.INFO, logger="anchorformer.kernels.autotune"):
        choice = select_backend(qk, anchors, v)
    assert select_backend(qk, anchors, v) == choice
    torch.testing.assert_close(anchor_mix_fast(qk, anchors, v, 0.25), anchor_mix(qk, anchors, v, 0.25))
    assert measurements == [(("sdpa", "torch"), False)]
    (decision,) = autotune.decisions()
    assert json.loads(json.dumps(decision)) == decision  # plain data: summary.json, checkpoints, broadcasts
    assert decision == {"batch": 2, "heads": 3, "tokens": 40, "head_dim": 16, "anchors": 7, "dtype": "float32",
                        "anchor_dtype": "float32", "device": "cpu", "train": False, "ms": decision["ms"],
                        "choice": choice, "source": "measured"}
    assert set(decision["ms"]) == {"sdpa", "torch"} and choice == min(decision["ms"], key=decision["ms"].get)
    assert f"B=2 h=3 n=40 dh=16 m=7 float32 cpu eval: sdpa {decision['ms']['sdpa']} ms" in caplog.text
    assert autotune.format_table(autotune.decisions()).startswith("B=2 h=3 n=40 dh=16 m=7 float32 cpu eval: sdpa ")


def test_train_eval_shape_and_dtype_are_keys_of_their_own(measurements):
    qk, anchors, v = _inputs(requires_grad=True)
    with torch.no_grad():
        anchor_mix_fast(qk, anchors, v, 0.25)  # eval: forward only
    anchor_mix_fast(qk, anchors, v, 0.25).sum().backward()  # train: forward + backward
    anchor_mix_fast(*_inputs((2, 3, 41, 16, 7)), 0.25)
    anchor_mix_fast(*_inputs(dtype=torch.float64), 0.25)
    for _ in range(2):  # every key again: nothing more is timed
        with torch.no_grad():
            anchor_mix_fast(qk, anchors, v, 0.25)
        anchor_mix_fast(qk, anchors, v, 0.25).sum().backward()
    assert [train for _, train in measurements] == [False, True, False, False]
    assert [(d["tokens"], d["dtype"], d["train"]) for d in autotune.decisions()] == [
        (40, "float32", False), (40, "float32", True), (41, "float32", False), (40, "float64", False)]


def test_timing_leaves_the_callers_graph_gradients_and_random_stream_alone():
    qk, anchors, v = _inputs(requires_grad=True)
    grad = torch.randn(SHAPE[0], SHAPE[1], SHAPE[2], SHAPE[3])
    rng = torch.get_rng_state()
    out = anchor_mix_fast(qk, anchors, v, 0.25)  # measured here, on these inputs
    assert torch.equal(torch.get_rng_state(), rng)
    assert autotune.decisions()[0]["train"]
    set_backend(autotune.decisions()[0]["choice"])  # the same path, untimed
    leaves = [t.detach().clone().requires_grad_() for t in (qk, anchors, v)]
    expected = anchor_mix_fast(*leaves, 0.25)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.backward(grad)
    expected.backward(grad)
    qk_v = qk._base  # the projection both views come from: its gradient holds d_qk and d_v
    torch.testing.assert_close(qk_v.grad.permute(2, 0, 3, 1, 4)[0], leaves[0].grad, rtol=0, atol=0)
    torch.testing.assert_close(anchors.grad, leaves[1].grad, rtol=0, atol=0)


def test_rounds_stop_at_the_budget_and_a_slow_candidate_loses(monkeypatch):
    monkeypatch.setattr(autotune, "BUDGET_S", 0.3)
    run = backends.run

    def slow_sdpa(name, *args):
        if name == "sdpa":
            time.sleep(0.1)
        return run(name, *args)

    monkeypatch.setattr(backends, "run", slow_sdpa)
    start = time.perf_counter()
    assert select_backend(*_inputs()) == "torch"
    elapsed = time.perf_counter() - start
    # warm-up (0.1 s) + rounds until the 0.3 s budget is spent, each round 0.1 s: never ten rounds
    assert elapsed < 1.0, elapsed
    assert autotune.decisions()[0]["ms"]["sdpa"] >= 100


def test_a_candidate_that_fails_is_left_out_with_a_warning(monkeypatch, caplog):
    run = backends.run

    def broken_sdpa(name, *args):
        if name == "sdpa":
            raise RuntimeError("out of memory (simulated)")
        return run(name, *args)

    monkeypatch.setattr(backends, "run", broken_sdpa)
    with caplog.at_level(logging.WARNING, logger="anchorformer.kernels.autotune"):
        assert select_backend(*_inputs()) == "torch"
    assert autotune.decisions()[0]["ms"]["sdpa"] is None
    assert "backend sdpa failed while auto timed it, left out: out of memory (simulated)" in caplog.text


def test_pinned_decisions_are_taken_without_timing_and_replace_measured_ones(measurements):
    qk, anchors, v = _inputs()
    measured = select_backend(qk, anchors, v)
    table = autotune.decisions()
    other = "sdpa" if measured == "torch" else "torch"
    autotune.pin([{**table[0], "choice": other, "ms": None}])  # e.g. rank 0 decided otherwise
    assert select_backend(qk, anchors, v) == other
    assert autotune.decisions() == [{**table[0], "choice": other, "ms": {}, "source": "pinned"}]
    # a resumed process pins the checkpoint's table: the same path, nothing timed
    autotune.reset()
    autotune.pin(json.loads(json.dumps(table)))
    assert select_backend(qk, anchors, v) == measured
    assert len(measurements) == 1


def test_reset_forgets_every_decision_so_the_next_call_measures_again(measurements):
    qk, anchors, v = _inputs()
    select_backend(qk, anchors, v)
    autotune.pin([{**autotune.decisions()[0], "tokens": 41}])  # pinned decisions go too
    autotune.reset()
    assert autotune.decisions() == []
    select_backend(qk, anchors, v)
    assert len(measurements) == 2 and [d["source"] for d in autotune.decisions()] == ["measured"]


@pytest.mark.parametrize("change, message", [
    ({"choice": "cuda-graphs"}, r"unknown backend 'cuda-graphs'; choose from \['triton', 'compile', 'sdpa', 'torch'\]"),
    ({"choice": "triton"}, r"-> 'triton' cannot run here: tensors are on cpu, the kernels need CUDA"),
    ({"dtype": "float8"}, r"unknown dtype \['float8'\]"),
    ({"anchors": None}, r"lacks \['anchors'\]"),
])
def test_pin_refuses_a_bad_table_whole(change, message):
    good = {"batch": 1, "heads": 1, "tokens": 9, "head_dim": 8, "anchors": 3, "dtype": "float32",
            "anchor_dtype": "float32", "device": "cpu", "train": True, "choice": "sdpa"}
    bad = {**good, "tokens": 10, **change}
    if change.get("anchors", 0) is None:
        del bad["anchors"]
    with pytest.raises(ValueError, match=message):
        autotune.pin([good, bad])
    assert autotune.decisions() == []  # the good entry before it was not taken either


def test_measure_decides_a_key_from_shapes_before_any_call(measurements):
    rng = torch.get_rng_state()
    decision = autotune.measure(*SHAPE, dtype=torch.bfloat16, device="cpu", train=True, anchor_dtype=torch.float32)
    assert torch.equal(torch.get_rng_state(), rng)
    assert (decision["dtype"], decision["anchor_dtype"], decision["train"]) == ("bfloat16", "float32", True)
    assert autotune.measure(*SHAPE, dtype=torch.bfloat16, device="cpu", train=True,
                            anchor_dtype=torch.float32) == decision
    # the layer under bf16 autocast: bf16 tokens, fp32 anchor weight -- the key measured above
    torch.manual_seed(0)
    layer = AnchorAttention(SHAPE[1] * SHAPE[3], num_heads=SHAPE[1], num_anchors=SHAPE[4])
    x = torch.randn(SHAPE[0], SHAPE[2], SHAPE[1] * SHAPE[3], requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x).float().sum().backward()
    assert len(measurements) == 1 and len(autotune.decisions()) == 1


def test_nothing_is_timed_under_a_dispatch_mode_a_jit_trace_or_on_meta_tensors(measurements):
    qk, anchors, v = _inputs()
    with FlopCounterMode(display=False) as counter:
        anchor_mix_fast(qk, anchors, v, 0.25)
    assert counter.get_total_flops() == 3 * 2 * 2 * 3 * 40 * 7 * 16  # the PyTorch path, counted
    meta = [t.to("meta") for t in (qk, anchors, v)]
    assert select_backend(*meta) == "torch" and anchor_mix_fast(*meta, 0.25).device.type == "meta"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace is deprecated, still supported
        # check_trace=False: the check would also run the function eagerly, which times (as it should)
        traced = torch.jit.trace(lambda a, b, c: anchor_mix_fast(a, b, c, 0.25), (qk, anchors, v),
                                 check_trace=False)
    torch.testing.assert_close(traced(qk, anchors, v), anchor_mix(qk, anchors, v, 0.25))
    assert measurements == [] and autotune.decisions() == []


def test_flop_counting_sees_the_maths_whatever_auto_decided(measurements):
    # MFU counts the maths' FLOPs; the CPU's fused attention kernel has no FLOP formula at all
    qk, anchors, v = _inputs()
    autotune.pin([{"batch": 2, "heads": 3, "tokens": 40, "head_dim": 16, "anchors": 7, "dtype": "float32",
                   "anchor_dtype": "float32", "device": "cpu", "train": False, "choice": "sdpa"}])
    assert select_backend(qk, anchors, v) == "sdpa"
    with FlopCounterMode(display=False) as counter:
        anchor_mix_fast(qk, anchors, v, 0.25)
    assert counter.get_total_flops() == 3 * 2 * 2 * 3 * 40 * 7 * 16


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_timing_inside_an_activation_checkpoint_keeps_its_gradients(use_reentrant, measurements):
    # measured inside the checkpointed forward (non-reentrant) or in its recompute during the
    # backward (reentrant: the first forward runs without grad, an eval key)
    torch.manual_seed(0)
    layer = AnchorAttention(SHAPE[1] * SHAPE[3], num_heads=SHAPE[1], num_anchors=SHAPE[4])
    x = torch.randn(SHAPE[0], SHAPE[2], SHAPE[1] * SHAPE[3])
    grads = []
    for checkpointed in (True, False):  # the second run takes the decisions the first one made
        inputs = x.clone().requires_grad_()
        out = checkpoint(layer, inputs, use_reentrant=use_reentrant) if checkpointed else layer(inputs)
        out.square().sum().backward()
        grads.append([inputs.grad] + [p.grad.clone() for p in layer.parameters()])
        layer.zero_grad()
    for checkpointed, plain in zip(*grads):
        torch.testing.assert_close(checkpointed, plain, rtol=0, atol=0)
    assert [train for _, train in measurements] == ([False, True] if use_reentrant else [True])


def test_a_forced_backend_is_taken_untimed_or_refused_with_the_reason(measurements, monkeypatch):
    qk, anchors, v = _inputs()
    set_backend("sdpa")
    assert select_backend(qk, anchors, v) == "sdpa"
    set_backend(None)
    monkeypatch.setenv(dispatch.ENV_VAR, "compile")
    assert select_backend(qk, anchors, v) == "compile"
    assert measurements == []
    set_backend("triton")
    with pytest.raises(ValueError, match=r"'triton' cannot run: .*need CUDA.*ANCHORFORMER_ANCHOR_MIX=auto"):
        select_backend(qk, anchors, v)


def test_unavailable_reason_answers_before_any_work():
    for name in ("auto", "compile", "sdpa", "torch"):
        assert unavailable_reason(name, "cpu", torch.bfloat16, 64, 30, torch.float32) is None
    assert "need CUDA" in unavailable_reason("triton", "cpu", torch.float32, 64, 30)
    assert "floating point" in unavailable_reason("sdpa", "cpu", torch.int64, 64, 30)
    if backends.triton_ops._TRITON_INSTALLED:
        assert unavailable_reason("triton", "cuda", torch.bfloat16, 64, 30, torch.float32) is None
        assert "dh <= 64" in unavailable_reason("triton", "cuda", torch.float32, 128, 30)
    with pytest.raises(ValueError, match="unknown anchor-mix backend 'fused'"):
        unavailable_reason("fused", "cpu", torch.float32, 64, 30)
