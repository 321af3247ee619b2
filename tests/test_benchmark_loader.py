"""The ``loader`` benchmark on tiny images: every path measured in the same run, the stage table
adding up, workers per GPU from the recorded GPU rates (read from docs/benchmarks.md or given),
and the numbers recorded for docs/benchmarks.json."""
import math

import pytest

from benchmarks import loader
from benchmarks.results import take
from benchmark_fixtures import benchmark_args, one_torch_thread, table_rows  # noqa: F401

MODEL_SECTION = """<!-- begin model-224-cuda -->
| model | px | batch | DeiT img/s | AnchorFormer img/s | ratio |
|---|---|---|---|---|---|
| tiny | 224 | 128 | 5639.8 | 4076.8 | 0.72x |
| base | 224 | 128 | 2617.7 | 2972.7 | 1.14x |
<!-- end model-224-cuda -->
"""


def _tables(section: str) -> list[list[list[str]]]:
    """Every markdown table of ``section`` as rows of cells (headers dropped)."""
    return [table_rows(block) for block in section.split("\n\n") if block.startswith("|")]


def test_gpu_rates_come_from_the_model_benchmarks_rows(tmp_path):
    doc = tmp_path / "benchmarks.md"
    assert loader.recorded_gpu_rates(doc) == {}
    doc.write_text("# Benchmarks\n\n" + MODEL_SECTION)
    assert loader.recorded_gpu_rates(doc) == {"DeiT-B": 2617.7, "AnchorFormer-B": 2972.7}


@pytest.mark.slow
def test_loader_benchmark_measures_every_path_and_the_workers_a_gpu_needs(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # images and shards go to a temporary folder, removed after
    doc = tmp_path / "benchmarks.md"
    doc.write_text(MODEL_SECTION)
    take()
    section = loader.run(benchmark_args(loader, [
        "--images", "32", "--image-size", "32", "--batch", "8", "--workers", "1", "--rounds", "1",
        "--device", "cpu", "--model-doc", str(doc), "--deit-images-per-second", "1000",
        "--note", "A shared machine."]))
    rates, stages, needed = _tables(section)
    (workers, pil, fast, gpu, folder, fast_ratio, gpu_ratio, folder_ratio, target), = rates
    assert workers == "1" and min(float(pil), float(fast), float(gpu), float(folder)) > 0
    assert float(fast_ratio.rstrip("x")) == pytest.approx(float(fast) / float(pil), rel=0.02, abs=0.01)
    assert float(gpu_ratio.rstrip("x")) == pytest.approx(float(gpu) / float(pil), rel=0.02, abs=0.01)
    assert float(folder_ratio.rstrip("x")) == pytest.approx(float(pil) / float(folder), rel=0.02, abs=0.01)
    assert target.startswith(">= 2.0x (")
    costs = {row[0]: row[1:] for row in stages}
    assert set(costs) == {*loader._STAGES, "**sum**", "**img/s implied**"}
    for column in range(3):
        parts = sum(float(cells[column]) for name, cells in costs.items() if not name.startswith("**")
                    and cells[column] != "-")
        assert parts == pytest.approx(float(costs["**sum**"][column]), abs=0.01)
    assert costs["RandAugment"][2] == "-" and float(costs["plan (gpu)"][2]) > 0  # the gpu path's workers do not augment
    by_model = {row[0]: row for row in needed}
    assert by_model["DeiT-B"][1] == "1000"  # the option wins over the doc
    assert by_model["AnchorFormer-B"][1] == "2973"
    for name, rate, *counts, verdict in needed:
        assert [int(count) for count in counts] == [math.ceil(float(rate) / float(per_worker))
                                                    for per_worker in (pil, fast, gpu, folder)]
    assert needed[1][-1].startswith("<= 4 (") and needed[0][-1] == "-"
    assert "no GPU here" in section and section.rstrip().endswith("A shared machine.")
    recorded = {(result.model, result.metric): result for result in take()}
    assert recorded["1 workers", "fast / pil img/s"].target == 2.0
    assert recorded["AnchorFormer-B", "gpu-path workers per GPU"].goal == "at_most"
    assert not list(tmp_path.glob("loader-benchmark-*"))


def test_loader_benchmark_refuses_bad_options():
    for argv, message in ((["--rounds", "0"], "--rounds"), (["--images", "8"], "--images"),
                          (["--workers", "0"], "--workers")):
        with pytest.raises(ValueError, match=message):
            loader.run(benchmark_args(loader, ["--device", "cpu", *argv]))
