"""Exports users load without this package: the timm folder (loaded through timm alone, it scores
exactly the trainer's validation accuracy with timm's own preprocessing), ONNX run by onnxruntime
and torch.export programs (both at a batch size they were not traced at, equal to eager PyTorch on
real images); conversion writes nothing when a check fails and refuses a --model the checkpoint
contradicts."""
import json
import subprocess
import sys

import numpy as np
import onnxruntime
import pytest
import timm
import torch
from helpers import REPO, cpu_env
from inference_fixtures import CLASS_NAMES, trained_run, trainer_metrics, validation_samples, top1_of  # noqa: F401
from sklearn.datasets import load_sample_images
from timm.data import create_transform, resolve_data_config

import anchorformer.models  # noqa: F401  (registers the models)
from anchorformer.config import load
from anchorformer.convert import export_graph
from anchorformer.data.transforms import build_eval_transform

import convert_checkpoint


def _run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *command], cwd=REPO, env=cpu_env(OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=600)


def test_timm_folder_loads_through_timm_alone_with_the_trainers_accuracy(trained_run, tmp_path):
    folder = tmp_path / "export"
    assert convert_checkpoint.main([str(trained_run), "--format", "timm", "--output", str(folder)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]

    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()  # timm alone from here
    assert model.num_classes == 10 and model.pretrained_cfg["label_names"] == CLASS_NAMES
    data_config = resolve_data_config(model=model)
    assert {key: tuple(value) if isinstance(value, list) else value for key, value in data_config.items()} == {
        "input_size": (3, 16, 16), "interpolation": "bilinear", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
        "crop_pct": 1.0, "crop_mode": "center"}  # the demo recipe's, not timm's 224 px / 0.9 / ImageNet defaults
    transform = create_transform(**data_config)
    recipe = load(trained_run / "config.yaml")
    assert repr(transform) == repr(build_eval_transform(recipe.data.augment, recipe.data.image_size))  # the trainer's

    expected = trainer_metrics(trained_run)["eval/top1"]
    assert top1_of(model, validation_samples(trained_run), transform) == expected


@pytest.mark.parametrize("fmt, options, message", [
    # the run's patch-4 model cannot feed the dense backbone: its check fails after the file was staged
    ("backbone", [], "the simple feature pyramid assumes patch size 16"),
    ("timm", ["--tolerance", "-1"], "parity check failed"),  # no difference passes a negative bound
    ("classification", ["--tolerance", "-1"], "parity check failed"),
])
def test_a_failed_check_writes_nothing(trained_run, tmp_path, capsys, fmt, options, message):
    output = tmp_path / ("export" if fmt == "timm" else "weights.safetensors")
    code = convert_checkpoint.main([str(trained_run), "--format", fmt, "--image-size", "32", "--output",
                                    str(output), *options])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == [], "the output, its config or the staging folder was left behind"


def test_a_model_name_the_checkpoint_contradicts_is_refused(trained_run, tmp_path, capsys):
    code = convert_checkpoint.main([str(trained_run), "--model", "anchorformer_small_patch16_224", "--output",
                                    str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "'anchorformer_small_patch16_224' disagrees with 'anchorformer_tiny_patch16_224'" in err
    assert list(tmp_path.iterdir()) == []


def _real_images(size: int, count: int) -> torch.Tensor:
    """Center crops of scikit-learn's two sample photos (and their mirror images), normalised."""
    photos = [torch.from_numpy(photo.copy()).permute(2, 0, 1).float() / 255 for photo in load_sample_images().images]
    photos += [photo.flip(-1) for photo in photos]
    crops = [torch.nn.functional.interpolate(photo[None, :, :, 80:507], size=(size, size), mode="bilinear",
                                             antialias=True)[0] for photo in photos[:count]]
    return (torch.stack(crops) - 0.5) / 0.5


@pytest.mark.parametrize("name", ["anchorformer_tiny_patch16_224", "anchorformer_small_distilled_patch16_224"])
@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_graph_exports_reproduce_eager_pytorch_at_another_batch_size(name, fmt, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=32, num_classes=7).eval()
    path = tmp_path / f"model.{fmt}"
    exported = export_graph(model, fmt, path, _real_images(32, 2), opset=18)
    assert exported.max_difference <= 1e-4 and exported.batch_sizes == (2, 1)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    images = _real_images(32, 3)  # traced at batch 2, run at 3
    with torch.no_grad():
        expected = model(images).numpy()
    if fmt == "onnx":
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["images"] and session.get_inputs()[0].shape[0] == "batch"
        actual = session.run(["logits"], {"images": images.numpy()})[0]
    else:
        with torch.no_grad():
            actual = torch.export.load(str(path)).module()(images).numpy()
    assert actual.shape == (3, 7)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-4)


def test_export_cli_writes_beside_the_timm_folder_and_prints_the_parity(trained_run, tmp_path):
    folder = tmp_path / "export"
    assert convert_checkpoint.main([str(trained_run), "--format", "timm", "--output", str(folder)]) == 0
    proc = _run("tools/export.py", str(folder), "--format", "onnx", "--opset", "17")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {folder / 'model.onnx'} (onnx, opset 17, dynamic batch, 16 px)" in proc.stdout
    difference = float(proc.stdout.split("eager PyTorch = ")[1].split()[0])
    assert difference <= 1e-4
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    recipe = load(trained_run / "config.yaml")
    transform = build_eval_transform(recipe.data.augment, recipe.data.image_size)
    images = torch.stack([transform(image) for image, _ in validation_samples(trained_run)[:5]])
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {"images": images.numpy()})[0], model(images).numpy(),
                                   rtol=0, atol=1e-4)

    refused = _run("tools/export.py", str(folder), "--format", "onnx", "--opset", "13")
    assert refused.returncode == 2 and refused.stderr.strip().startswith("error: --opset 13 is too old")
    assert json.loads((folder / "config.json").read_text())["num_classes"] == 10
