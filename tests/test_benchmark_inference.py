"""The ``inference`` benchmark (AnchorFormer vs DeiT batch-1 latency and img/s) on CPU with tiny
images, so that it finishes in seconds: every requested row for both families, ratios that follow
from the timings, targets where the issue sets them, numbers recorded for docs/benchmarks.json."""
import pytest
import torch

from benchmarks import BENCHMARKS, load
from benchmarks import inference as inference_benchmark
from benchmarks.report import machine_description
from benchmarks.results import take
from benchmark_fixtures import benchmark_args as _args, one_torch_thread, table_rows as _table_rows  # noqa: F401


def test_inference_benchmark_is_registered():
    assert load("inference") is inference_benchmark and "inference" in BENCHMARKS


def test_rows_for_latency_throughput_and_backbone_in_both_precisions():
    take()
    args = _args(inference_benchmark, ["--device", "cpu", "--resolutions", "32", "--backbone-resolution", "48",
                                       "--throughput-sizes", "tiny", "--tokens-per-batch", "10", "--repeats", "1",
                                       "--modes", "eager"])
    section = inference_benchmark.run(args)
    rows = _table_rows(section)
    assert [row[:6] for row in rows] == [
        ["latency", "tiny", "32", "1", "fp32", "eager"], ["latency", "tiny", "32", "1", "bf16", "eager"],
        ["throughput", "tiny", "32", "2", "fp32", "eager"], ["throughput", "tiny", "32", "2", "bf16", "eager"],
        ["backbone", "tiny", "48", "1", "fp32", "eager"], ["backbone", "tiny", "48", "1", "bf16", "eager"]]
    for row in rows:
        deit, anchor, ratio = float(row[7]), float(row[8]), float(row[9].rstrip("x"))
        assert deit > 0 and anchor > 0 and row[6] == ("ms" if row[0] == "latency" else "img/s")
        assert ratio == pytest.approx(anchor / deit, rel=0.05, abs=0.01)  # of the rounded values
        assert row[10] == "-" and row[11] == "torch"  # no target at 32 px; the PyTorch anchor mix on CPU
    assert machine_description(torch.device("cpu")) in section and "Load average (1 min)" in section
    recorded = take()
    assert len(recorded) == 3 * len(rows) and all(result.target is None for result in recorded)


def test_the_issue_targets_apply_at_224_and_384():
    case = inference_benchmark.Case("latency", "tiny", 384, 1, "fp32", "eager")
    row = inference_benchmark._row(case, {"deit_s": 0.010, "anchor_s": 0.006, "backends": "torch"})
    assert row[9:11] == ["0.60x", "<= 0.7x (met)"]
    case = inference_benchmark.Case("throughput", "base", 224, 4, "bf16", "compiled")
    row = inference_benchmark._row(case, {"deit_s": 1.0, "anchor_s": 1.0, "backends": "-"})
    assert row[9:11] == ["1.00x", ">= 1.1x (missed)"]
    assert [r.met for r in take() if r.target is not None] == [True, False]


def test_compiled_rows_are_limited_by_tokens_and_bad_options_refused():
    args = _args(inference_benchmark, ["--device", "cpu", "--resolutions", "224,384", "--backbone-resolution", "0"])
    cases = inference_benchmark._cases(args, on_gpu=False)
    compiled = {(c.kind, c.resolution, c.precision) for c in cases if c.mode == "compiled"}
    assert compiled == {("latency", 224, "fp32")}  # CPU: batch-1 224 px fp32 only, each compile costs 20-50 s
    assert {(c.size, c.batch) for c in cases if c.kind == "throughput"} == {("base", 2), ("base", 1)}  # 2 x 197 tokens
    with pytest.raises(ValueError, match="multiples of the patch size"):
        inference_benchmark.run(_args(inference_benchmark, ["--device", "cpu", "--resolutions", "30"]))
    with pytest.raises(SystemExit):
        _args(inference_benchmark, ["--precisions", "fp16"])
