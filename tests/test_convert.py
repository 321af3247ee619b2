"""Checkpoint conversion: a real 2-process ZeRO-3 run of the engine converts (model and EMA) with
identical logits; exports load through timm and into both dense stages; wrong inputs fail with a
message naming the problem."""
import json
import subprocess
import sys
import textwrap

import convert_checkpoint
import pytest
import timm
import torch
from helpers import REPO, cpu_env
from safetensors import safe_open

import anchorformer.models  # noqa: F401
from anchorformer.convert import (
    backbone_parity, classification_parity, create_model_from_export, export_backbone, export_classification,
    fixed_input, load_source, read_metadata,
)
from anchorformer.models.backbone import AnchorFormerBackbone
from anchorformer.models.mask_rcnn import build_detector
from anchorformer.models.upernet import UperNetSegmentor

NAME = "anchorformer_tiny_patch16_224"
TINY = dict(embed_dim=64, depth=2, num_heads=2, num_anchors=8)


@pytest.fixture
def trained_pt(tmp_path):
    """A consolidated state dict (DDP-style ``module.`` prefix) of a tiny 5-class model at 64 px."""
    torch.manual_seed(0)
    model = timm.create_model(NAME, num_classes=5, img_size=64, **TINY)
    path = tmp_path / "model.pth"
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    return path, model.eval()


def test_classification_export_loads_through_timm_with_identical_logits(trained_pt, tmp_path):
    path, model = trained_pt
    source = load_source(path)
    exported = export_classification(source, tmp_path / "out" / "cls.safetensors", NAME, dict(TINY, img_size=64))
    metadata = read_metadata(exported.path)
    assert metadata["format"] == "classification" and metadata["model"] == NAME
    assert metadata["resolution"] == "64" and metadata["num_classes"] == "5" and metadata["source"] == str(path)
    args = json.loads(metadata["model_args"])
    loaded = timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(exported.path),
                                                                                 num_classes=5), **args).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert classification_parity(source, exported, NAME, dict(TINY, img_size=64)) == 0.0
    config = json.loads(exported.path.with_suffix(".json").read_text())
    assert config["architecture"] == NAME and config["num_classes"] == 5
    assert not list(exported.path.parent.glob(".*tmp*")), "temporary files left behind"


@pytest.mark.parametrize("layout, prefix", [("anchorformer", ""), ("mmdet", "backbone.")])
def test_backbone_export_drops_the_head_resizes_pos_embed_and_loads_into_both_stages(trained_pt, tmp_path, layout,
                                                                                   prefix):
    path, _ = trained_pt
    source = load_source(path)
    exported = export_backbone(source, tmp_path / f"{layout}.safetensors", 96, layout, NAME, dict(TINY, img_size=64))
    with safe_open(str(exported.path), framework="pt") as handle:
        keys = set(handle.keys())
        assert handle.get_tensor(f"{prefix}pos_embed").shape == (1, 1 + 6 * 6, 64)  # 96 px / 16 = 6
    assert all(k.startswith(prefix) for k in keys) and not any("head" in k for k in keys)
    assert read_metadata(exported.path)["layout"] == layout
    assert backbone_parity(source, exported, NAME, dict(TINY, img_size=64)) < 1e-5
    detector = build_detector(NAME, 2, image_size=96, train_scales=(96,), weights=str(exported.path),
                              model_kwargs=TINY, out_channels=16, mask_head_channels=16)
    segmentor = UperNetSegmentor(NAME, 3, image_size=96, weights=str(exported.path), model_kwargs=TINY,
                                 pyramid_channels=16, head_channels=16)
    for encoder in (detector.backbone.encoder, segmentor.backbone.encoder):
        assert torch.equal(encoder.blocks[0].attn.qk_v.weight,
                           source.state_dict["blocks.0.attn.qk_v.weight"])


def test_cli_converts_and_prints_parity(trained_pt, tmp_path, capsys):
    path, _ = trained_pt
    output = tmp_path / "cli.safetensors"
    code = convert_checkpoint.main([str(path), "--model", NAME, "--model-args", json.dumps(TINY),
                                    "--format", "classification", "--output", str(output)])
    printed = capsys.readouterr().out
    assert code == 0 and output.is_file()
    assert "parity: max |logits difference| = 0" in printed


def test_checkpoint_of_another_variant_fails_with_the_key_list(trained_pt, tmp_path):
    path, _ = trained_pt
    with pytest.raises(ValueError, match=r"missing keys: \['blocks.2.attn.anchors.weight"):
        export_classification(load_source(path), tmp_path / "x.safetensors", NAME, dict(TINY, depth=3, img_size=64))
    with pytest.raises(ValueError, match="shape mismatches"):
        export_classification(load_source(path), tmp_path / "x.safetensors", NAME, dict(TINY, embed_dim=128,
                                                                                        img_size=64))
    assert not (tmp_path / "x.safetensors").exists()


def test_corrupt_and_missing_inputs_name_the_problem(trained_pt, tmp_path, capsys):
    path, _ = trained_pt
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated.pth.*is the file complete"):
        load_source(truncated)
    bad_safetensors = tmp_path / "bad.safetensors"
    bad_safetensors.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_source(bad_safetensors)
    with pytest.raises(ValueError, match="does not exist"):
        load_source(tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="not a DeepSpeed checkpoint"):
        load_source(tmp_path)
    with pytest.raises(ValueError, match="no EMA weights"):
        load_source(path, weights="ema")
    with pytest.raises(ValueError, match="does not record its model"):
        export_classification(load_source(path), tmp_path / "y.safetensors")
    assert convert_checkpoint.main([str(truncated), "--model", NAME]) == 2
    assert "is the file complete" in capsys.readouterr().err


def test_a_backbone_export_is_not_a_classifier(trained_pt, tmp_path):
    path, _ = trained_pt
    exported = export_backbone(load_source(path), tmp_path / "bb.safetensors", 64, "anchorformer", NAME,
                               dict(TINY, img_size=64))
    with pytest.raises(ValueError, match="not a classification export"):
        create_model_from_export(exported.path)


_ENGINE_RUN = textwrap.dedent("""
    # One 2-process ZeRO-3 run of the engine; rank 0 then saves the logits of the engine's model
    # on a fixed input (every rank runs the forward: ZeRO-3 gathers weights) and the EMA weights
    # as the trainer assembles them from both ranks' partitions.
    import sys
    import torch
    from anchorformer import config, dist
    from anchorformer.engine.trainer import Trainer
    from anchorformer.convert import fixed_input

    cfg = config.load(sys.argv[1], sys.argv[3:])
    env = dist.detect()
    dist.init(env)
    trainer = Trainer(cfg, env)
    try:
        trainer.fit()
        trainer.engine.eval()
        with torch.no_grad():
            logits = trainer.engine(fixed_input(cfg.model.img_size))
        ema = trainer.ema.full_state_dict()
        if env.rank == 0:
            torch.save({"logits": logits, "ema": ema}, sys.argv[2])
    finally:
        trainer.close()
        dist.shutdown()
""")


@pytest.mark.slow
def test_zero3_two_process_run_converts_with_the_engines_logits(tmp_path, capsys):
    script = tmp_path / "run.py"
    script.write_text(_ENGINE_RUN)
    # every weight partitioned (threshold 0), so the EMA is re-assembled from both ranks' slices
    overrides = ["deepspeed.zero_stage=3", "deepspeed.stage3_param_persistence_threshold=0",
                 "train.global_batch_size=16", "train.micro_batch_size=8",
                 "train.max_steps=3", "train.ema.enabled=true", "train.ema.decay=0.5", "data.num_workers=0",
                 "schedule.epochs=1", "schedule.warmup_epochs=0", "logging.progress_bar=false",
                 "logging.tensorboard=false", f"logging.output_dir={tmp_path / 'runs'}", "logging.run_name=zero3",
                 f"data.cache_dir={tmp_path / 'cache'}", "checkpoint.at_epoch_end=false",
                 "model.img_size=32", "data.image_size=32",
                 "model.patch_size=16", "model.depth=2", "model.embed_dim=64", "model.num_heads=2", "model.num_anchors=8"]
    logits_file = tmp_path / "engine_logits.pt"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                    str(script), str(REPO / "configs" / "demo.yaml"), str(logits_file), *overrides],
                   check=True, cwd=tmp_path, env=cpu_env(OMP_NUM_THREADS="1"), timeout=600)
    engine = torch.load(logits_file)
    run_dir = tmp_path / "runs" / "zero3"
    files = {p.name for p in (run_dir / "checkpoints" / "step_3").iterdir()}
    assert {"zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"} <= files

    ema_model = timm.create_model(NAME, num_classes=10, img_size=32, **TINY).eval()
    ema_model.load_state_dict(engine["ema"])
    with torch.no_grad():
        ema_logits = ema_model(fixed_input(32))
    assert not torch.allclose(engine["logits"], ema_logits), "the EMA should differ from the model"
    for weights, expected in (("model", engine["logits"]), ("ema", ema_logits)):
        output = tmp_path / f"{weights}.safetensors"
        assert convert_checkpoint.main([str(run_dir), "--weights", weights, "--output", str(output)]) == 0
        converted = create_model_from_export(output)
        metadata = read_metadata(output)
        assert metadata["step"] == "3" and metadata["weights"] == weights and metadata["resolution"] == "32"
        with torch.no_grad():
            difference = (converted(fixed_input(32)) - expected).abs().max().item()
        assert difference < 1e-5, (weights, difference)

    # the EMA as checkpoints before the resharding layout saved it: whole weights on rank 0 only,
    # ZeRO-3 partitions on every rank
    tag_dir = run_dir / "checkpoints" / "step_3"
    rank_files = [tag_dir / f"trainer_rank{rank}.pt" for rank in (0, 1)]
    states = [torch.load(path, weights_only=False) for path in rank_files]
    whole = sorted(engine["ema"])[::2]
    for rank, (path, state) in enumerate(zip(rank_files, states)):
        chunks = state["ema"].pop("chunks")
        state["ema"]["shadow"] = {key: engine["ema"][key].clone() if key in whole else chunk
                                  for key, chunk in chunks.items() if rank == 0 or key not in whole}
        torch.save(state, path)
    older = tmp_path / "older-ema.safetensors"
    assert convert_checkpoint.main([str(run_dir), "--weights", "ema", "--output", str(older)]) == 0
    with torch.no_grad():
        assert (create_model_from_export(older)(fixed_input(32)) - ema_logits).abs().max().item() < 1e-5
    for state in states:
        state["ema"]["shadow"].clear()
        state["ema"]["unknown"] = state["ema"].pop("shadow")
    for path, state in zip(rank_files, states):
        torch.save(state, path)
    assert convert_checkpoint.main([str(run_dir), "--weights", "ema", "--output", str(tmp_path / "x.safetensors")]) == 2
    assert "in no known layout" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()

    backbone = tmp_path / "backbone.safetensors"
    assert convert_checkpoint.main([str(run_dir), "--format", "backbone", "--image-size", "64",
                                    "--output", str(backbone)]) == 0
    encoder = AnchorFormerBackbone(NAME, 64, weights=str(backbone), model_kwargs=TINY)
    assert encoder.encoder.pos_embed.shape == (1, 1 + 4 * 4, 64)
