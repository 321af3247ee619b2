"""The ``model`` (training img/s and MFU, AnchorFormer vs DeiT) and ``anchor-mix`` (backend
timing) benchmarks, on CPU with tiny images so that they finish in seconds."""
import pytest
import torch

from benchmarks import anchor_mix as anchor_mix_benchmark
from benchmarks import model as model_benchmark
from benchmarks.report import machine_description
from benchmark_fixtures import benchmark_args as _args, one_torch_thread, table_rows as _table_rows  # noqa: F401


def test_model_benchmark_measures_both_families_for_classification_and_backbone():
    args = _args(model_benchmark, ["--device", "cpu", "--resolutions", "32", "--backbone-resolution", "48",
                                   "--tokens-per-step", "10", "--repeats", "1", "--peak-tflops", "0.5"])
    section = model_benchmark.run(args)
    rows = _table_rows(section)
    assert [row[:3] for row in rows] == [["tiny", "32", "2"], ["tiny backbone", "48", "1"]]  # batch = 10 // tokens
    for row in rows:
        deit_img_s, anchor_img_s, ratio = float(row[3]), float(row[4]), float(row[5].rstrip("x"))
        assert deit_img_s > 0 and anchor_img_s > 0
        assert ratio == pytest.approx(anchor_img_s / deit_img_s, rel=0.1, abs=0.05)  # of rounded img/s
        assert float(row[7]) > 0 and float(row[8]) > 0  # GFLOP/img counted for both
        assert row[9].endswith("%") and row[10].endswith("%")
    assert machine_description(torch.device("cpu")) in section  # the device is named


def test_model_benchmark_rejects_bad_options():
    with pytest.raises(ValueError, match="multiples of the patch size"):
        model_benchmark.run(_args(model_benchmark, ["--device", "cpu", "--resolutions", "30"]))
    with pytest.raises(ValueError, match="nothing to measure"):
        model_benchmark.run(_args(model_benchmark, ["--device", "cpu", "--resolutions", "", "--backbone-resolution", "0"]))
    with pytest.raises(SystemExit):
        _args(model_benchmark, ["--sizes", "huge"])


@pytest.mark.slow
def test_anchor_mix_benchmark_times_every_backend_and_auto_and_says_why_triton_cannot_run():
    section = anchor_mix_benchmark.run(_args(anchor_mix_benchmark, ["--device", "cpu", "--tokens", "20",
                                                                    "--batch", "1", "--head-dim", "16"]))
    backends_table, auto_table = (part for part in section.split("\n\n") if part.startswith("|"))
    (row,) = _table_rows(backends_table)
    assert row[0] == "20" and row[2] == "1.00x"  # eager is the reference
    assert float(row[1]) > 0 and float(row[4]) > 0 and float(row[7]) > 0  # eager, compiled and sdpa timed
    assert all(row[i].startswith("n/a:") and "CUDA" in row[i] for i in (10, 13))  # both plans; no GPU here
    assert row[-5] in ("sdpa", "torch") and row[-4] == "-"  # auto's pick on CPU: no kernel plan
    assert row[-3:] == ["-", "-", "-"]  # GPU time and HBM floor: CUDA only
    (auto,) = _table_rows(auto_table)
    timed = dict(item.split() for item in auto[1].split(", "))
    assert set(timed) == {"sdpa", "torch"} and auto[2] == min(timed, key=lambda name: float(timed[name]))
    assert auto[4] in ("torch", "compile", "sdpa")
    assert float(auto[7]) == pytest.approx(float(auto[5]) / float(auto[6]), rel=0.01)
    assert auto[8] in ("<= 1.05x (met)", "<= 1.05x (missed)")  # the verdict itself depends on the load
