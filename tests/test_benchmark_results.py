"""docs/benchmarks.json, the machine-readable twin of the tables: what the benchmarks record, how a
target is judged, and that one run of tools/benchmark.py writes both files with the same verdicts."""
import json

import pytest

import benchmark as benchmark_cli
from benchmarks import results
from benchmark_fixtures import one_torch_thread, table_rows  # noqa: F401


def test_record_judges_the_target_on_its_side():
    results.take()
    assert results.record("base n=197", "ratio", 0.4, 0.5, "at_most") is True
    assert results.record("base n=785", "ratio", 0.3, 0.25, "at_most") is False
    assert results.record("base 224 px", "speedup", 1.2, 1.2, "at_least") is True
    assert results.record("tiny 224 px", "img/s", 812.5) is None
    with pytest.raises(ValueError, match="both target and goal"):
        results.record("x", "y", 1.0, target=1.0)
    recorded = results.take()
    assert [r.met for r in recorded] == [True, False, True, None]
    assert recorded[3].target is None and recorded[3].value == 812.5
    assert results.take() == []  # taken once
    assert results.verdict(True, 1.2, "at_least") == ">= 1.2x (met)"
    assert results.verdict(False, 0.5, "at_most") == "<= 0.5x (missed)"
    assert results.verdict(None, None) == "-"


def test_write_json_replaces_only_its_section(tmp_path):
    path = tmp_path / "benchmarks.json"
    results.write_json(path, "model-cuda", "cuda", "H200", [results.Result("base", "img/s", 3.0)])
    results.write_json(path, "attention-cpu", "cpu", "cpu", [results.Result("tiny", "ratio", 0.5, 0.7, "at_most", True)])
    results.write_json(path, "model-cuda", "cuda", "H200", [results.Result("base", "img/s", 4.0)])
    rows = json.loads(path.read_text())
    assert [(r["section"], r["value"]) for r in rows] == [("attention-cpu", 0.5), ("model-cuda", 4.0)]
    assert set(rows[0]) == {"section", "device", "machine", "model", "metric", "value", "target", "goal", "met"}


def test_one_run_writes_the_table_and_its_json_twin_with_the_same_verdicts(tmp_path):
    doc = tmp_path / "benchmarks.md"
    benchmark_cli.main(["--doc", str(doc), "--write-docs", "attention", "--device", "cpu", "--tokens", "197",
                        "--widths", "tiny", "--repeats", "1"])
    (row,) = table_rows(doc.read_text())
    rows = json.loads(doc.with_suffix(".json").read_text())
    assert {r["section"] for r in rows} == {"attention-cpu"}
    (ratio,) = [r for r in rows if r["metric"] == "mixing anchor / SDPA time"]
    assert ratio["model"].startswith("tiny n=197") and ratio["target"] == 0.7 and ratio["goal"] == "at_most"
    assert ratio["value"] == pytest.approx(float(row[4]), abs=1e-3)
    assert row[5] == results.verdict(ratio["met"], 0.7, "at_most")


def test_without_write_docs_the_table_is_printed_and_no_file_written(tmp_path, capsys):
    doc = tmp_path / "benchmarks.md"
    benchmark_cli.main(["--doc", str(doc), "attention", "--device", "cpu", "--tokens", "197", "--widths", "tiny",
                        "--repeats", "1"])
    assert "| tiny" in capsys.readouterr().out
    assert not doc.exists() and not doc.with_suffix(".json").exists()
