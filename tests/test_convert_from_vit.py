"""tools/convert_checkpoint.py --from-vit: a timm folder, a .pth file or a run of this framework
becomes an AnchorFormer export that timm and model.pretrained_checkpoint load, with the conversion
report recorded; bad input is one error line, exit 2, and nothing written."""
import json
import subprocess
import sys

import convert_checkpoint
import pytest
import timm
import torch
from data_fixtures import write_jpeg_shards
from helpers import REPO, cpu_env
from timm.models import save_for_hf

import anchorformer.models  # noqa: F401
from anchorformer.convert import create_model_from_export, load_timm_folder, read_metadata
from anchorformer.tasks.classification import load_pretrained

SHAPE = dict(img_size=16, patch_size=4, embed_dim=48, depth=2, num_heads=3)
TARGET = "anchorformer_tiny_patch16_224"


@pytest.fixture
def vit(tmp_path):
    """A small DeiT as a timm folder and as a .pth state dict, and training shards of 16 px digits."""
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", num_classes=4, **SHAPE).eval()
    save_for_hf(model, str(tmp_path / "deit"), model_args=SHAPE, safe_serialization=True)
    torch.save({"model": model.state_dict()}, tmp_path / "deit.pth")
    _, index = write_jpeg_shards(tmp_path / "shards", "train", 40, per_shard=20, num_classes=4)
    return tmp_path, model, index


def _convert(*argv: str) -> int:
    return convert_checkpoint.main(["--from-vit", *argv])


def test_a_timm_folder_converts_into_an_export_that_loads_with_the_report(vit, capsys):
    root, model, index = vit
    output = root / "out" / "af.safetensors"
    assert _convert(str(root / "deit"), "--anchor-data", index, "--anchor-images", "24", "--num-anchors", "6",
                    "--fit-steps", "3", "--output", str(output)) == 0
    printed = capsys.readouterr().out
    assert "qk rule sym" in printed and "24 images" in printed and "parity: max |logits difference|" in printed
    report = json.loads(read_metadata(output)["conversion"])
    assert report == json.loads(output.with_suffix(".json").read_text())["conversion"]
    assert report["qk_rule"] == "sym" and report["source"]["model"] == "deit_tiny_patch16_224"
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight", "head.weight",
            "blocks.1.mlp.fc2.bias"} <= set(report["carried_over"])
    assert report["anchors"]["images"] == 24 and report["anchors"]["shards"] == index
    assert len(report["anchors"]["attention_fit"]["mse_after"]) == SHAPE["depth"]
    assert report["anchors"]["preprocessing"]["crop_pct"] == 0.9  # the timm folder's own preprocessing
    loaded = create_model_from_export(output)
    assert loaded.blocks[0].attn.num_anchors == 6 and loaded.num_classes == 4
    assert torch.equal(loaded.state_dict()["blocks.0.mlp.fc1.weight"], model.state_dict()["blocks.0.mlp.fc1.weight"])
    # model.pretrained_checkpoint: the classification task's loader, into a head of other classes
    target = timm.create_model(TARGET, num_classes=7, num_anchors=6, **SHAPE)
    load_pretrained(target, str(output))
    assert torch.equal(target.blocks[1].attn.anchors.weight, loaded.blocks[1].attn.anchors.weight)
    assert not list(output.parent.glob(".*staging*"))


def test_a_pth_file_converts_into_a_timm_folder(vit, capsys):
    root, model, index = vit
    folder = root / "af_folder"
    # a loose state dict records neither its model nor its heads: the target names them
    assert _convert(str(root / "deit.pth"), "--model", TARGET, "--model-args", json.dumps(SHAPE), "--qk-rule", "mean",
                    "--num-anchors", "5", "--anchor-data", index, "--fit-steps", "0", "--format", "timm",
                    "--output", str(folder)) == 0
    loaded = load_timm_folder(folder)
    assert loaded.blocks[0].attn.num_anchors == 5
    conversion = json.loads((folder / "config.json").read_text())["anchorformer"]["conversion"]
    assert conversion["qk_rule"] == "mean" and conversion["anchors"]["attention_fit"] is None
    assert conversion["source_architecture"]["num_heads"] is None
    dim = SHAPE["embed_dim"]
    qkv = model.state_dict()["blocks.0.attn.qkv.weight"]
    assert torch.equal(loaded.blocks[0].attn.qk_v.weight[:dim], (qkv[:dim] + qkv[dim:2 * dim]) / 2)


def test_without_anchor_data_the_report_says_the_anchors_are_not_from_data(vit, capsys):
    root, _, _ = vit
    assert _convert(str(root / "deit"), "--output", str(root / "af.safetensors")) == 0
    assert "pass --anchor-data" in capsys.readouterr().out
    assert "not initialised from data" in json.loads(read_metadata(root / "af.safetensors")["conversion"])["anchors"]


@pytest.mark.parametrize("case, expected", [
    ("missing", "does not exist"),
    ("not a vit", "not a timm ViT/DeiT"),
    ("other width", "embed_dim 48 (source) vs 96 (target)"),
    ("other heads", "num_heads 3 (source) vs 4 (target)"),
    ("unreadable shards", "no readable image"),
    ("missing shards", "matches no file"),
])
def test_bad_input_is_one_error_line_exit_2_and_nothing_written(vit, capsys, case, expected):
    root, _, index = vit
    source, extra = str(root / "deit"), ["--anchor-data", index]
    if case == "missing":
        source = str(root / "nope.pth")
    elif case == "not a vit":
        torch.save(timm.create_model(TARGET, **SHAPE).state_dict(), root / "af.pth")
        source = str(root / "af.pth")
    elif case == "other width":
        extra += ["--model-args", json.dumps({"embed_dim": 96})]
    elif case == "other heads":
        extra += ["--model-args", json.dumps({"num_heads": 4})]
    elif case == "unreadable shards":
        garbage = root / "garbage-000000.tar"
        garbage.write_bytes(b"not a tar file" * 100)
        extra = ["--anchor-data", str(garbage)]
    else:
        extra = ["--anchor-data", str(root / "none-{000000..000001}.tar")]
    output = root / "out" / "af.safetensors"
    assert _convert(source, *extra, "--output", str(output)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not output.parent.exists() or not any(output.parent.iterdir())


def test_from_vit_refuses_the_backbone_format_and_needs_an_output(vit):
    root, _, _ = vit
    with pytest.raises(SystemExit):
        _convert(str(root / "deit"), "--format", "backbone", "--output", str(root / "x.safetensors"))
    with pytest.raises(SystemExit):
        _convert(str(root / "deit"))


@pytest.mark.slow
def test_a_deit_run_of_this_framework_converts_and_fine_tunes(tmp_path, embedded_cache_dir):
    """configs/demo.yaml as a DeiT for one epoch -> --from-vit -> one epoch of the demo from the export."""
    common = [f"data.cache_dir={embedded_cache_dir}", f"logging.output_dir={tmp_path}", "schedule.epochs=1",
              "schedule.warmup_epochs=0", "model.depth=1", "model.embed_dim=48"]
    deit = [sys.executable, "launch/train.py", "configs/demo.yaml", "model.name=deit_tiny_patch16_224",
            "model.num_anchors=null", "logging.run_name=deit", *common]
    done = subprocess.run(deit, cwd=REPO, env=cpu_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    shards = next(embedded_cache_dir.glob("digits-*px")) / "train-index.json"
    output = tmp_path / "af.safetensors"
    assert convert_checkpoint.main([str(tmp_path / "deit"), "--from-vit", "--anchor-data", str(shards),
                                    "--anchor-images", "200", "--fit-steps", "5", "--num-anchors", "16",  # the demo's
                                    "--output", str(output)]) == 0
    metadata = read_metadata(output)
    assert metadata["model"] == TARGET and json.loads(metadata["conversion"])["source"]["step"] is not None
    tune = [sys.executable, "launch/train.py", "configs/demo.yaml", f"model.pretrained_checkpoint={output}",
            "logging.run_name=af", *common]
    done = subprocess.run(tune, cwd=REPO, env=cpu_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "af" / "summary.json").read_text())["metrics"]["eval/top1"] > 0
