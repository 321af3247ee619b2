"""The ``quality`` benchmark (AnchorFormer vs DeiT trained for the same wall-clock): real training
of small variants of the demo recipe on the embedded digits, with a budget of a few seconds."""
import argparse

import pytest
import torch

from benchmarks import load
from benchmarks import quality
from benchmarks.report import machine_description
from benchmark_fixtures import benchmark_args, one_torch_thread  # noqa: F401
from helpers import REPO

DEMO = REPO / "configs" / "demo.yaml"
SMALL = ["model.kwargs.depth=2", "model.kwargs.embed_dim=48", "model.kwargs.num_heads=2",
         "model.kwargs.num_anchors=8"]


def _args(argv: list[str]) -> argparse.Namespace:
    return benchmark_args(quality, argv)


def _table(section: str) -> list[dict[str, str]]:
    """The rows of the section's table as {column: cell}."""
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header, *rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[:1] + lines[2:]]
    return [dict(zip(header, row)) for row in rows]


def test_quality_is_registered_and_builds_a_deit_twin_of_the_recipe():
    assert load("quality") is quality
    configs = quality.model_configs(DEMO)
    anchor, deit = configs["AnchorFormer"]["model"], configs["DeiT"]["model"]
    assert anchor["name"] == "anchorformer_tiny_patch16_224" and deit["name"] == "deit_tiny_patch16_224"
    assert deit["kwargs"] == {k: v for k, v in anchor["kwargs"].items() if k != "num_anchors"}
    assert "num_anchors" in anchor["kwargs"]
    assert configs["AnchorFormer"]["optim"] == configs["DeiT"]["optim"]
    assert configs["AnchorFormer"]["train"] == configs["DeiT"]["train"]


def test_quality_rejects_bad_options(tmp_path):
    for budget in ("0", "-5", "nan", "inf"):
        with pytest.raises(ValueError, match="--budget-s"):
            quality.run(_args(["--budget-s", budget]))
    for seeds in ("", ",", "0,x"):
        with pytest.raises(SystemExit):
            _args(["--seeds", seeds])
    with pytest.raises(ValueError, match="--seeds"):
        quality.run(argparse.Namespace(**{**vars(_args([])), "seeds": []}))
    with pytest.raises(ValueError, match="does not exist"):
        quality.run(_args(["--recipe", str(tmp_path / "missing.yaml")]))
    deit_recipe = tmp_path / "deit.yaml"
    deit_recipe.write_text(f"base: {DEMO}\nmodel: {{name: deit_tiny_patch16_224, kwargs: {{patch_size: 4}}}}\n")
    with pytest.raises(ValueError, match="anchorformer_"):
        quality.run(_args(["--recipe", str(deit_recipe)]))
    with pytest.raises(ValueError, match="--calibration-steps"):
        quality.run(_args(["--calibration-steps", "0"]))
    with pytest.raises(ValueError, match="--calibration-rounds"):
        quality.run(_args(["--calibration-rounds", "0"]))
    with pytest.raises(ValueError, match="--threads"):
        quality.run(_args(["--threads", "0"]))


def test_quality_trains_both_models_for_the_budget(embedded_cache_dir):
    budget = 2.0
    overrides = [f"data.cache_dir={embedded_cache_dir}", *SMALL]
    section = quality.run(_args(["--budget-s", str(budget), "--seeds", "0", "--calibration-steps", "8",
                                 "--calibration-rounds", "2",
                                 *(f"--set={o}" for o in overrides)]))
    rows = _table(section)
    assert [row["model"].split()[0] for row in rows] == ["AnchorFormer", "DeiT"]
    assert "`deit_tiny_patch16_224`" in rows[1]["model"]
    for row in rows:
        assert float(row["params (M)"]) > 0 and float(row["GMACs/img"]) > 0
        seconds_per_step, rounds = row["s/step calibrated (rounds)"].split()
        seconds_per_step = float(seconds_per_step)
        low, high = (float(x) for x in rounds.strip("()").split("-"))
        assert 0 < low == seconds_per_step <= high  # the fastest calibration round
        epochs = int(row["epochs"])
        steps, planned = (float(x.strip("()")) for x in row["steps trained (planned)"].split())
        train_s = float(row["train s, mean (range)"].split()[0])
        assert float(row["s/step in training"]) == pytest.approx(train_s / steps, rel=0.05)
        mean, best = float(row["top-1 % mean ± std"].split()[0]), float(row["best top-1 %"])
        assert 0.0 <= mean <= 100.0 and mean == best == float(row["top-1 % per seed"])  # one seed
        # planned = budget / s/step; whole epochs, as close to the plan as whole epochs allow
        assert planned == pytest.approx(budget / seconds_per_step, rel=0.02, abs=1)
        steps_per_epoch = steps / epochs
        assert steps_per_epoch == 23  # 1500 digits, batch 64
        assert epochs == max(1, round(planned / steps_per_epoch))
        assert 0.5 * planned <= steps <= 2 * planned or (epochs == 1 and planned < steps_per_epoch / 2)
        assert budget / 4 <= train_s <= 4 * budget + 2  # the measured wall-clock follows the plan
    assert "AF − DeiT top-1:" in section and ("**held**" in section or "**did not hold**" in section)
    assert machine_description(torch.device("cpu")) in section  # names the device and its 1 thread
