"""The ``model`` (training img/s and MFU, AnchorFormer vs DeiT; auto against the backends forced by
hand) and ``anchor-mix`` (backend timing) benchmarks, on CPU with tiny images so that they finish
in seconds."""
import json
from unittest import mock

import pytest
import torch

import benchmark as benchmark_cli
from anchorformer.kernels import autotune
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
    for backends in ("torch,sdpa", "auto", "auto,torch,torch"):
        with pytest.raises(ValueError, match="--backends needs auto and at least one backend forced by hand"):
            model_benchmark.run(_args(model_benchmark, ["--device", "cpu", "--backends", backends]))
    with pytest.raises(ValueError, match="drop --compile"):
        model_benchmark.run(_args(model_benchmark, ["--device", "cpu", "--backends", "auto,torch", "--compile"]))
    with pytest.raises(ValueError, match="--turns must be >= 1"):
        model_benchmark.run(_args(model_benchmark, ["--device", "cpu", "--backends", "auto,torch", "--turns", "0"]))


# the smallest AnchorFormer step: 5 tokens, batch 2; one timed turn of each backend
_BACKENDS_RUN = ["model", "--device", "cpu", "--resolutions", "32", "--backbone-resolution", "0", "--tokens-per-step",
                 "10", "--repeats", "1", "--turns", "1", "--backends", "auto,torch,sdpa", "--precision", "fp32"]


def test_model_benchmark_times_auto_as_a_fresh_process_meets_it_against_every_forced_backend(tmp_path):
    doc = tmp_path / "benchmarks.md"
    with mock.patch.object(autotune, "_time", wraps=autotune._time) as auto_measured:
        benchmark_cli.main(["--doc", str(doc), "--write-docs", *_BACKENDS_RUN])
    # measured twice: for the AF/DeiT table, and again after the reset, as a fresh process would
    assert auto_measured.call_count == 2
    section = doc.read_text()
    assert "One step = forward + backward + AdamW in fp32" in section
    table = section.split("\n\n")[-1]
    assert table.splitlines()[0] == ("| model | px | batch | auto ms | torch ms | sdpa ms | auto timed, ms | auto | "
                                     "auto first step s | best forced | auto / best | target |")
    (row,) = _table_rows(table)
    assert row[:3] == ["tiny", "32", "2"]
    ms = dict(zip(("auto", "torch", "sdpa"), map(float, row[3:6])))
    timed = dict(item.split() for item in row[6].split(", "))  # auto's one measurement: one key, one layer shape
    assert set(timed) == {"sdpa", "torch"} and row[7] == min(timed, key=lambda name: float(timed[name]))
    assert float(row[8]) > 0
    assert row[9] == min(("torch", "sdpa"), key=ms.get)
    assert float(row[10]) == pytest.approx(ms["auto"] / ms[row[9]], rel=0.01)
    assert row[11] == f"<= 1.05x ({'met' if float(row[10]) <= 1.05 else 'missed'})"
    rows = {r["metric"]: r for r in json.loads(doc.with_suffix(".json").read_text()) if r["model"] == "tiny 32 px fp32"}
    ratio = rows["auto / best forced step"]
    assert ratio["target"] == 1.05 and ratio["goal"] == "at_most" and ratio["value"] == pytest.approx(float(row[10]),
                                                                                                       abs=1e-3)
    assert {f"{name} step ms" for name in ms} | {"auto first step s", "bare step AF / DeiT img/s"} <= set(rows)


def test_model_benchmark_backends_table_is_printed_and_no_file_written_without_write_docs(tmp_path, capsys):
    doc = tmp_path / "benchmarks.md"
    benchmark_cli.main(["--doc", str(doc), *_BACKENDS_RUN])
    assert "| auto / best | target |" in capsys.readouterr().out
    assert not doc.exists() and not doc.with_suffix(".json").exists()


@pytest.mark.slow
def test_anchor_mix_benchmark_times_every_backend_and_auto_and_says_why_triton_cannot_run():
    section = anchor_mix_benchmark.run(_args(anchor_mix_benchmark, ["--device", "cpu", "--tokens", "20",
                                                                    "--batch", "1", "--head-dim", "16"]))
    backends_table, auto_table = (part for part in section.split("\n\n") if part.startswith("|"))
    (row,) = _table_rows(backends_table)
    assert row[0] == "20" and row[2] == "1.00x"  # eager is the reference
    assert float(row[1]) > 0 and float(row[4]) > 0 and float(row[7]) > 0  # eager, compiled and sdpa timed
    # both Triton plans: no GPU here, said once in the caption instead of a column of reasons
    assert len(row) == 1 + 3 * 3 + 5 and "Not run on this device: triton one-program (" in section
    assert section.count("the kernels need CUDA") == 2
    assert row[-5] in ("sdpa", "torch") and row[-4] == "-"  # auto's pick on CPU: no kernel plan
    assert row[-3:] == ["-", "-", "-"]  # GPU time and HBM floor: CUDA only
    (auto,) = _table_rows(auto_table)
    timed = dict(item.split() for item in auto[1].split(", "))
    assert set(timed) == {"sdpa", "torch"} and auto[2] == min(timed, key=lambda name: float(timed[name]))
    assert auto[4] in ("torch", "compile", "sdpa")
    assert float(auto[7]) == pytest.approx(float(auto[5]) / float(auto[6]), rel=0.01)
    assert auto[8] in ("<= 1.05x (met)", "<= 1.05x (missed)")  # the verdict itself depends on the load
