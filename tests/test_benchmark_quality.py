"""The ``quality`` benchmark (the map of AnchorFormer vs DeiT at equal wall-clock over token and anchor
counts): the models it builds from the recipe, its refusals, and a tiny plan of real training on
the embedded digits (2 token counts, 1 anchor count, 2 seeds, budgets of a fraction of a second)."""
import argparse
import os
import statistics

import pytest
import torch
from PIL import Image

from benchmarks import load
from benchmarks import quality
from benchmarks.quality import Cell
from benchmarks.report import machine_description
from benchmarks.results import take
from benchmark_fixtures import benchmark_args, one_torch_thread  # noqa: F401
from helpers import REPO

RECIPE = REPO / "configs" / "quality_map.yaml"
SMALL = ["model.depth=1", "model.embed_dim=32", "model.num_heads=2", "data.num_workers=0"]


def _args(argv: list[str]) -> argparse.Namespace:
    return benchmark_args(quality, argv)


def _table(section: str) -> list[dict[str, str]]:
    """The rows of the section's table as {column: cell}."""
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header, *rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[:1] + lines[2:]]
    return [dict(zip(header, row)) for row in rows]


def test_quality_is_registered_and_builds_a_deit_twin_and_anchor_variants_per_token_count():
    assert load("quality") is quality
    configs = quality.model_configs(RECIPE, tokens=[17, 65, 257], anchors=[4, 32])
    assert list(configs) == [Cell(t, m) for t in (17, 65, 257) for m in (None, 4, 32)]
    for cell, cfg in configs.items():
        model = cfg["model"]
        assert model["patch_size"] == {17: 4, 65: 2, 257: 1}[cell.tokens]
        if cell.anchors is None:
            assert model["name"] == "deit_tiny_patch16_224" and model["num_anchors"] is None
        else:
            assert model["name"] == "anchorformer_tiny_patch16_224" and model["num_anchors"] == cell.anchors
        deit = configs[Cell(cell.tokens, None)]
        assert {k: v for k, v in model.items() if k not in ("name", "num_anchors")} == \
            {k: v for k, v in deit["model"].items() if k not in ("name", "num_anchors")}
        assert cfg["optim"] == deit["optim"] and cfg["train"] == deit["train"] and cfg["data"] == deit["data"]


def test_quality_rejects_bad_options(tmp_path):
    for epochs in ("0", "-5", "nan", "inf"):
        with pytest.raises(ValueError, match="--deit-epochs"):
            quality.run(_args(["--deit-epochs", epochs]))
    for flag, value in (("--seeds", "0,x"), ("--tokens", "17,many"), ("--anchors", "4.5")):
        with pytest.raises(SystemExit):
            _args([flag, value])
    with pytest.raises(ValueError, match="--seeds"):
        quality.run(_args(["--seeds", ","]))
    with pytest.raises(ValueError, match="does not exist"):
        quality.run(_args(["--recipe", str(tmp_path / "missing.yaml")]))
    deit_recipe = tmp_path / "deit.yaml"
    deit_recipe.write_text(f"base: {RECIPE}\nmodel: {{name: deit_tiny_patch16_224}}\n")
    with pytest.raises(ValueError, match="anchorformer_"):
        quality.run(_args(["--recipe", str(deit_recipe)]))
    with pytest.raises(ValueError, match="--tokens 50: tokens - 1 must be a square grid"):
        quality.run(_args(["--tokens", "17,50"]))
    with pytest.raises(ValueError, match="--tokens 10: tokens - 1 must be a square grid"):  # 3x3 does not divide 16 px
        quality.run(_args(["--tokens", "10"]))
    with pytest.raises(ValueError, match="anchors >= 1"):
        quality.run(_args(["--anchors", "0"]))
    for flag in ("--calibration-steps", "--calibration-rounds"):
        with pytest.raises(ValueError, match=flag):
            quality.run(_args([flag, "0"]))
    with pytest.raises(ValueError, match="--threads"):
        quality.run(_args(["--threads", "0"]))


def test_quality_map_trains_every_model_within_its_token_counts_budget(embedded_cache_dir, tmp_path):
    deit_epochs, plot = 1.0, tmp_path / "quality.png"
    take()  # forget numbers an earlier test recorded
    section = quality.run(_args([
        "--tokens", "17,65", "--anchors", "4", "--seeds", "0,1", "--deit-epochs", str(deit_epochs),
        "--calibration-steps", "4", "--calibration-rounds", "1", "--plot", str(plot),
        f"--set=data.cache_dir={embedded_cache_dir}", *(f"--set={o}" for o in SMALL)]))
    rows = _table(section)
    recorded = {(r.model, r.metric): r.value for r in take()}  # docs/benchmarks.json gets the same numbers
    assert recorded[("65 tokens AF m=4", "AF - DeiT top-1 points")] == pytest.approx(
        float(rows[3]["AF − DeiT ± s.e. (verdict)"].split()[0]), abs=0.01)
    assert ("17 tokens DeiT", "top-1 % (mean over seeds)") in recorded
    assert [(row["tokens"], row["model"].split(" (")[0]) for row in rows] == [
        ("17 (patch 4)", "DeiT"), ("17 (patch 4)", "AF m=4"), ("65 (patch 2)", "DeiT"), ("65 (patch 2)", "AF m=4")]
    steps_per_epoch = 23  # 1500 digits, batch 64
    for deit, af in (rows[:2], rows[2:]):
        budget = float(deit["budget s"])
        assert af["budget s"] == deit["budget s"]  # equal wall-clock within a token count
        deit_s_step = float(deit["s/step calibrated (rounds)"].split()[0])
        assert budget == pytest.approx(deit_epochs * steps_per_epoch * deit_s_step, abs=0.5)
        assert deit["epochs (planned)"].startswith("1 ")  # DeiT trains --deit-epochs epochs
        assert deit["AF − DeiT ± s.e. (verdict)"] == "—"
        for row in (deit, af):
            assert float(row["params (M)"]) > 0 and float(row["GMACs/img"]) > 0
            seconds, rounds = row["s/step calibrated (rounds)"].split()
            low, high = (float(x) for x in rounds.strip("()").split("-"))
            assert 0 < low == float(seconds) == high  # one round
            epochs, planned = row["epochs (planned)"].split(" (")
            assert int(epochs) == max(1, round(float(planned.split()[0]) / steps_per_epoch))
            per_seed = [float(t) for t in row["top-1 % per seed"].split(", ")]
            mean, std = (float(x) for x in row["top-1 % mean ± std"].split(" ± "))
            assert len(per_seed) == 2 and all(0 <= t <= 100 for t in per_seed)
            assert mean == pytest.approx(statistics.fmean(per_seed), abs=0.01)
            assert std == pytest.approx(statistics.stdev(per_seed), abs=0.01)
        diff, rest = af["AF − DeiT ± s.e. (verdict)"].split(" ± ")
        af_mean, deit_mean = (float(r["top-1 % mean ± std"].split(" ± ")[0]) for r in (af, deit))
        assert float(diff) == pytest.approx(af_mean - deit_mean, abs=0.02)
        stderr, verdict = float(rest.split()[0]), rest.split("(")[1].rstrip(")")
        outside = "wins" if float(diff) > 0 else "loses"
        if abs(abs(float(diff)) - 2 * stderr) <= 0.02:  # the cells are rounded to 0.01: either side of the line
            assert verdict in ("ties", outside)
        else:
            assert verdict == ("ties" if abs(float(diff)) <= 2 * stderr else outside)
        assert f"**{verdict}** at" in section
    assert machine_description(torch.device("cpu")) in section  # names the device and its 1 thread
    assert f"![top-1 against tokens, one line per m]({os.path.relpath(plot, 'docs')})" in section
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.size[0] > 300
