"""launch/predict.py: files, folders, globs and shards -> the top-k classes of each image with the
names of the class map written beside the training shards (carried into the export), and their
probabilities, as CSV or JSON; the same classes the model gives through timm's own preprocessing."""
import csv
import io
import json
import subprocess
import sys

import pytest
import timm
import torch
from data_fixtures import make_jpeg_tree
from helpers import REPO, cpu_env
from inference_fixtures import CLASS_NAMES, trained_run  # noqa: F401
from PIL import Image
from timm.data import create_transform, resolve_data_config

import convert_checkpoint

PREDICT = str(REPO / "launch" / "predict.py")


def _predict(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, PREDICT, *arguments, "--no-progress", "--workers", "0"], cwd=REPO,
                          env=cpu_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)


@pytest.fixture
def export(trained_run, tmp_path):
    folder = tmp_path / "export"
    assert convert_checkpoint.main([str(trained_run), "--format", "timm", "--output", str(folder)]) == 0
    return folder


def test_files_folders_and_globs_get_named_classes_and_probabilities(export, tmp_path):
    make_jpeg_tree(tmp_path / "tree", {"a": 3, "b": 2})
    (tmp_path / "loose").mkdir()
    make_jpeg_tree(tmp_path / "loose", {"c": 2})
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    proc = _predict(str(export), str(tmp_path / "tree"), str(tmp_path / "loose" / "c" / "*.jpg"),
                    str(tmp_path / "broken.jpg"), "--top-k", "3", "--batch-size", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert len(rows) == 7 and "predicted 7 of 8 images" in proc.stderr and "broken.jpg" in proc.stderr
    assert rows[0]["input"].endswith("tree/a/a_0.jpg") and rows[-1]["input"].endswith("loose/c/c_1.jpg")

    model = timm.create_model(f"local-dir:{export}", pretrained=True).eval()
    transform = create_transform(**resolve_data_config(model=model))
    for row in rows:
        probabilities = [float(row[f"probability_{k}"]) for k in (1, 2, 3)]
        assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1 + 1e-6
        for k in (1, 2, 3):
            assert row[f"name_{k}"] == CLASS_NAMES[int(row[f"class_{k}"])]
        with Image.open(row["input"]) as image, torch.no_grad():
            expected = model(transform(image.convert("RGB"))[None]).softmax(-1)[0]
        assert int(row["class_1"]) == int(expected.argmax())
        assert probabilities[0] == pytest.approx(float(expected.max()), abs=1e-5)


def test_shards_of_a_run_as_json(trained_run, tmp_path):
    output = tmp_path / "predictions.json"
    val_index = trained_run.parent.parent / "shards" / "val-index.json"
    proc = _predict(str(trained_run), str(val_index), "--output", str(output), "--top-k", "20")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(output.read_text())
    assert len(rows) == 297 and rows[0]["input"].startswith("digit_")
    assert all(len(row["predictions"]) == 10 for row in rows)  # top-k capped at the 10 classes
    first = rows[0]["predictions"]
    assert {p["name"] for p in first} == set(CLASS_NAMES) and sum(p["probability"] for p in first) == pytest.approx(1)
    assert all(p["name"] == CLASS_NAMES[p["class"]] for row in rows for p in row["predictions"])


def test_inputs_without_images_are_one_error_line(export, tmp_path):
    (tmp_path / "notes.txt").write_text("no image here")
    proc = _predict(str(export), str(tmp_path / "notes.txt"))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "names no image file" in proc.stderr and "Traceback" not in proc.stderr
