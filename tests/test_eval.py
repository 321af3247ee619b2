"""launch/eval.py: a run folder alone evaluates its latest checkpoint (model or EMA) on its own
validation data with exactly the trainer's numbers and writes RUN/eval/latest.json; an export
folder and an ImageFolder work too, at another test resolution; two processes count every sample
once; bad input is one `error:` line."""
import json
import subprocess
import sys

import pytest
from data_fixtures import make_jpeg_tree
from helpers import BIN, REPO, cpu_env
from inference_fixtures import CLASS_NAMES, trained_run, trainer_metrics  # noqa: F401

import convert_checkpoint

EVAL = str(REPO / "launch" / "eval.py")


def _eval(*arguments: str, launcher: tuple[str, ...] = (sys.executable,)) -> subprocess.CompletedProcess:
    return subprocess.run([*launcher, EVAL, *arguments, "--no-progress"], cwd=REPO, env=cpu_env(OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=600)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def test_a_run_folder_alone_reproduces_the_trainers_evaluation(trained_run):
    proc = _ok(_eval(str(trained_run)))
    result = json.loads((trained_run / "eval" / "latest.json").read_text())
    trainer = trainer_metrics(trained_run)
    for key in ("top1", "top5", "samples"):
        assert result[key] == trainer[f"eval/{key}"], key
    assert result["loss"] == pytest.approx(trainer["eval/loss"], rel=1e-6)
    assert result["samples"] == 297 and result["images_per_s"] > 0 and result["step"] == 30
    assert f"top-1 {trainer['eval/top1']:.2f}%" in proc.stdout and "wrote" in proc.stdout
    # the run's linear baseline beside it (a small run: 1500 training digits)
    assert result["linear_baseline_top1"] == trainer["eval/linear_baseline_top1"]
    assert f"linear baseline {result['linear_baseline_top1']:.2f} % top-1" in proc.stdout

    _ok(_eval(str(trained_run), "--weights", "ema", "--checkpoint", "step_30"))
    ema = json.loads((trained_run / "eval" / "step_30-ema.json").read_text())
    assert ema["top1"] == trainer["eval_ema/top1"] and ema["weights"] == "ema"


def test_an_export_on_an_image_folder_at_another_resolution(trained_run, tmp_path):
    export = tmp_path / "export"
    assert convert_checkpoint.main([str(trained_run), "--format", "timm", "--output", str(export)]) == 0
    counts = {name: 2 for name in CLASS_NAMES[:3]} | {"seven": 3}
    make_jpeg_tree(tmp_path / "images", counts)
    output = tmp_path / "folder.json"
    _ok(_eval(str(export), "--data", str(tmp_path / "images"), "--img-size", "32", "--crop-pct", "0.9",
              "--batch-size", "4", "--workers", "0", "--output", str(output)))
    result = json.loads(output.read_text())
    assert result["samples"] == sum(counts.values()) and result["image_size"] == 32 and result["crop_pct"] == 0.9
    assert 0 <= result["top1"] <= 100 and result["top1"] <= result["top5"]


@pytest.mark.parametrize("arguments, message", [
    (["no/such/run"], "neither a run folder, a checkpoint, an export folder nor a timm model name"),
    (["RUN", "--crop-pct", "1.5"], "--crop-pct must be in (0, 1]"),
    (["RUN", "--data", "no/such/val-{000000..000001}.tar"], "matches no file"),
    (["RUN", "--weights", "ema", "--checkpoint", "step_999"], "does not exist"),
])
def test_bad_input_is_one_error_line(trained_run, arguments, message):
    proc = _eval(*[str(trained_run) if arg == "RUN" else arg for arg in arguments])
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_two_processes_count_every_sample_exactly_once(trained_run, tmp_path):
    _ok(_eval(str(trained_run), "--output", str(tmp_path / "one.json")))
    single = json.loads((tmp_path / "one.json").read_text())
    torchrun = (str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29563")
    _ok(_eval(str(trained_run), "--output", str(tmp_path / "two.json"), launcher=torchrun))
    double = json.loads((tmp_path / "two.json").read_text())
    assert double["world_size"] == 2 and double["samples"] == single["samples"] == 297  # 5 shards over 2 ranks
    assert double["top1"] == single["top1"] and double["top5"] == single["top5"]
    assert double["loss"] == pytest.approx(single["loss"], rel=1e-9)

    make_jpeg_tree(tmp_path / "images", {name: 1 for name in CLASS_NAMES[:7]})  # 7 files: 4 + 3
    _ok(_eval(str(trained_run), "--data", str(tmp_path / "images"), "--workers", "0", "--output",
              str(tmp_path / "folder.json"), launcher=torchrun))
    assert json.loads((tmp_path / "folder.json").read_text())["samples"] == 7
