"""The ``diagnostics`` benchmark (training img/s with the anchor diagnostics / without, issue 23's
target): a tiny demo model on the embedded digits, so that it finishes in seconds."""
import json
import re

import pytest

import benchmark as benchmark_cli
from benchmarks import diagnostics, load
from benchmark_fixtures import benchmark_args, one_torch_thread, table_rows  # noqa: F401
from helpers import REPO

RECIPE = REPO / "configs" / "demo.yaml"
# a one-layer demo model; a probe every 10 steps so that the 23 steps of an epoch hold two
TINY = ["model.depth=1", "model.embed_dim=32", "model.num_heads=2", "data.num_workers=0",
        "logging.anchor_every_steps=10"]


def _argv(cache_dir, epochs: int, rounds: int) -> list[str]:
    return ["diagnostics", "--recipe", str(RECIPE), "--epochs", str(epochs), "--rounds", str(rounds),
            f"--set=data.cache_dir={cache_dir}", *(f"--set={o}" for o in TINY)]


def test_diagnostics_benchmark_times_both_arms_and_writes_the_ratio_with_its_target(embedded_cache_dir, tmp_path):
    assert load("diagnostics") is diagnostics
    doc = tmp_path / "benchmarks.md"
    benchmark_cli.main(["--doc", str(doc), "--write-docs", *_argv(embedded_cache_dir, epochs=2, rounds=2)])
    section = doc.read_text()
    assert "<!-- begin diagnostics-cpu -->" in section and "2 rounds, the arms alternating" in section
    # 46 steps: probes at steps 10, 20, 30, 40 and at the 2 evaluations; none without diagnostics
    assert "(46 steps of 64 images" in section and "(probes logged per run: 6)" in section
    assert "no probe logged" in section
    rows = {row[0]: row[1:] for row in table_rows(section)}
    assert list(rows) == ["steps", "steps + evaluations"]
    recorded = {r["metric"]: r for r in json.loads(doc.with_suffix(".json").read_text())}
    assert {r["section"] for r in recorded.values()} == {"diagnostics-cpu"}
    for measure, (off, on, ratio, target) in rows.items():
        rates = {}
        for arm, cell in (("off", off), ("on", on)):
            best, low, high = (float(x) for x in re.fullmatch(r"([\d.]+) \(([\d.]+)-([\d.]+)\)", cell).groups())
            assert 0 < low <= high == best  # the least time of the rounds, their range beside it
            rates[arm] = recorded[f"img/s, {measure}, diagnostics {arm}"]["value"]
            assert rates[arm] == pytest.approx(best, abs=0.06)
        judged = recorded[f"img/s with / without diagnostics, {measure}"]
        assert judged["value"] == pytest.approx(rates["on"] / rates["off"]) == pytest.approx(float(ratio), abs=6e-4)
        assert judged["target"] == diagnostics.TARGET == 0.98 and judged["goal"] == "at_least"
        assert target == f">= 0.98x ({'met' if judged['met'] else 'missed'})"
    for arm in ("off", "on"):  # the evaluations only add time
        assert (recorded[f"img/s, steps, diagnostics {arm}"]["value"]
                > recorded[f"img/s, steps + evaluations, diagnostics {arm}"]["value"])


def test_diagnostics_benchmark_prints_its_table_and_writes_nothing_without_write_docs(embedded_cache_dir, tmp_path,
                                                                                      capsys):
    doc = tmp_path / "benchmarks.md"
    benchmark_cli.main(["--doc", str(doc), *_argv(embedded_cache_dir, epochs=1, rounds=1)])
    assert "| steps + evaluations |" in capsys.readouterr().out
    assert not doc.exists() and not doc.with_suffix(".json").exists()


def test_diagnostics_benchmark_rejects_bad_options(tmp_path):
    for flag in ("--epochs", "--rounds", "--threads"):
        with pytest.raises(ValueError, match=flag):
            diagnostics.run(benchmark_args(diagnostics, [flag, "0"]))
    with pytest.raises(ValueError, match="does not exist"):
        diagnostics.run(benchmark_args(diagnostics, ["--recipe", str(tmp_path / "missing.yaml")]))
