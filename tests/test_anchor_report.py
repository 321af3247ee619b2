"""tools/anchor_report.py: a run folder or an export -> PNG files and a JSON of the anchor
diagnostics; bad input is one ``error:`` line and exit status 2."""
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from inference_fixtures import trained_run  # noqa: F401  (fixture)
from PIL import Image
from safetensors.torch import save_file

import anchorformer.models  # noqa: F401  (registers the models with timm)
import anchor_report

SMALL = {"img_size": 16, "patch_size": 4, "depth": 3, "embed_dim": 48, "num_heads": 3, "num_anchors": 8}


def _export(folder: Path, architecture: str = "anchorformer_tiny_patch16_224") -> Path:
    """A small model in timm's folder layout (config.json + model.safetensors)."""
    torch.manual_seed(0)
    args = SMALL if architecture.startswith("anchorformer") else {k: v for k, v in SMALL.items() if k != "num_anchors"}
    model = timm.create_model(architecture, num_classes=10, **args)
    folder.mkdir(parents=True)
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    pretrained = {"input_size": [3, 16, 16], "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0,
                  "interpolation": "bilinear", "num_classes": 10}
    (folder / "config.json").write_text(json.dumps({"architecture": architecture, "num_classes": 10,
                                                    "model_args": args, "pretrained_cfg": pretrained}))
    return folder


def _images(folder: Path, count: int = 3) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    (folder / "broken.png").write_text("not an image")
    return folder


def test_export_and_image_files_give_pictures_and_json(tmp_path):
    out = tmp_path / "report"
    code = anchor_report.main([str(_export(tmp_path / "export")), "--images", str(_images(tmp_path / "images")),
                               "--count", "2", "--device", "cpu", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "anchor_report.json").read_text())
    assert report["num_anchors"] == 8 and report["grid"] == [4, 4] and len(report["layers"]) == 3
    assert [layer["dead"] for layer in report["layers"]] == [0, 0, 0]
    assert [maps["layer"] for maps in report["maps"]] == [0, 1, 2]
    assert len(report["images"]) == 2 and report["images"][0].endswith("0.png")
    expected = {"anchor_report.json", "inputs.png", "degrees.png",
                *(f"anchor_maps_layer_{i:02d}.png" for i in range(3))}
    assert {p.name for p in out.iterdir()} == expected  # nothing else (no temporary files left)
    with Image.open(out / "anchor_maps_layer_02.png") as picture:
        assert picture.size == (3 * 48 + 2 * 2, 2 * 48 + 2)  # 3 views x 2 images, 16 px images shown at 48 px


@pytest.mark.parametrize("case", ["missing model", "not an anchorformer", "no image", "out is a file"])
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, capsys, case):
    images = str(_images(tmp_path / "images"))
    model = str(_export(tmp_path / "export"))
    out = tmp_path / "report"
    if case == "missing model":
        model = str(tmp_path / "nowhere")
    elif case == "not an anchorformer":
        model = str(_export(tmp_path / "deit", "deit_tiny_patch16_224"))
    elif case == "no image":
        images = str(tmp_path / "images" / "*.jpg")
    else:
        out.write_text("")
    assert anchor_report.main([model, "--images", images, "--device", "cpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert not out.is_dir()


@pytest.mark.slow
def test_run_folder_uses_its_own_validation_images(trained_run, tmp_path):  # noqa: F811
    out = tmp_path / "report"
    assert anchor_report.main([str(trained_run), "--count", "5", "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads((out / "anchor_report.json").read_text())
    assert report["source"] and report["step"] == 30
    assert len(report["images"]) == 5 and report["images"][0].startswith("validation image 0")
    assert all(np.array(maps["assignment"]).shape == (5, 4, 4) for maps in report["maps"])
    with Image.open(out / "inputs.png") as picture:
        assert picture.size == (5 * 48 + 4 * 2, 48)
