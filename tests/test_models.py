"""The AnchorFormer family honours timm's model contract."""
import pytest
import timm
import torch
from safetensors.torch import save_file

import anchorformer.models  # noqa: F401  (registers the models)
from anchorformer.models import AnchorAttention, AnchorFormer, AnchorFormerDistilled, default_weights_file
from anchorformer.models.complexity import param_count, shape_of

VARIANTS = sorted(timm.list_models("anchorformer_*"))
SMALL_IMAGE = 32  # a 2 x 2 patch grid keeps every variant fast on CPU


def build(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, img_size=SMALL_IMAGE, **kwargs)


def images(batch: int = 2, size: int = SMALL_IMAGE) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_registry_holds_every_variant():
    assert VARIANTS == sorted([
        "anchorformer_tiny_patch16_224", "anchorformer_small_patch16_224", "anchorformer_base_patch16_224",
        "anchorformer_base_patch16_384", "anchorformer_tiny_distilled_patch16_224",
        "anchorformer_small_distilled_patch16_224", "anchorformer_base_distilled_patch16_224",
        "anchorformer_base_distilled_patch16_384"])


@pytest.mark.parametrize("name", VARIANTS)
def test_forward_backward_reaches_every_parameter(name):
    model = build(name, num_classes=7)
    assert all(isinstance(block.attn, AnchorAttention) for block in model.blocks)
    assert model.blocks[0].norm1.eps == 1e-6
    model.train()
    if isinstance(model, AnchorFormerDistilled):
        model.set_distilled_training(True)
        logits, logits_dist = model(images())
        loss = logits.logsumexp(-1).sum() + logits_dist.logsumexp(-1).sum()
    else:
        logits = model(images())
        loss = logits.logsumexp(-1).sum()
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, no_grad


@pytest.mark.parametrize("name", VARIANTS)
def test_pretrained_cfg_names_are_in_the_state_dict(name):
    model = build(name)
    keys = model.state_dict().keys()
    cfg = model.pretrained_cfg
    assert f"{cfg['first_conv']}.weight" in keys
    classifiers = cfg["classifier"] if isinstance(cfg["classifier"], tuple) else (cfg["classifier"],)
    assert all(f"{c}.weight" in keys for c in classifiers)
    assert "url" not in cfg or not cfg["url"]  # local files only


@pytest.mark.parametrize("name", VARIANTS)
def test_param_count_matches_closed_form(name):
    model = timm.create_model(name)
    size = model.pretrained_cfg["input_size"][-1]
    assert sum(p.numel() for p in model.parameters()) == param_count(shape_of(model), size)


def test_distilled_model_averages_heads_at_inference():
    model = build("anchorformer_tiny_distilled_patch16_224", num_classes=5).eval()
    x = images()
    tokens = model.forward_features(x)
    expected = (model.head(tokens[:, 0]) + model.head_dist(tokens[:, 1])) / 2
    torch.testing.assert_close(model(x), expected)


def test_gradient_checkpointing_changes_nothing():
    model = build("anchorformer_tiny_patch16_224", num_classes=4, drop_path_rate=0.0).train()
    x = images()
    out_plain = model(x)
    grads_plain = torch.autograd.grad(out_plain.square().sum(), list(model.parameters()))
    model.set_grad_checkpointing(True)
    out_ckpt = model(x)
    grads_ckpt = torch.autograd.grad(out_ckpt.square().sum(), list(model.parameters()))
    torch.testing.assert_close(out_ckpt, out_plain, rtol=0, atol=0)
    for a, b in zip(grads_ckpt, grads_plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_forward_intermediates_matches_forward_features():
    model = build("anchorformer_small_patch16_224").eval()
    x = images()
    final, intermediates = model.forward_intermediates(x, indices=3)
    torch.testing.assert_close(final, model.forward_features(x))
    assert len(intermediates) == 3 and intermediates[0].shape == (2, 384, 2, 2)
    pruned = model.prune_intermediate_layers(indices=2, prune_head=True, prune_norm=True)
    assert pruned == [10, 11] and model.num_classes == 0


def test_features_only_returns_the_advertised_strides_and_channels():
    model = timm.create_model("anchorformer_tiny_patch16_224", features_only=True, img_size=64,
                              out_indices=(3, 7, 11))
    features = model(images(size=64))
    assert model.feature_info.channels() == [192] * 3
    assert model.feature_info.reduction() == [16] * 3
    assert [tuple(f.shape) for f in features] == [(2, 192, 4, 4)] * 3


def test_dynamic_image_size_accepts_other_resolutions():
    model = build("anchorformer_tiny_patch16_224", dynamic_img_size=True).eval()
    assert model(images(size=48)).shape == (2, 1000)
    assert model.forward_features(torch.randn(1, 3, 64, 32)).shape == (1, 1 + 4 * 2, 192)


def test_reset_classifier_and_no_weight_decay():
    model = build("anchorformer_tiny_patch16_224")
    model.reset_classifier(3)
    assert model(images()).shape == (2, 3)
    assert {"pos_embed", "cls_token"} <= set(model.no_weight_decay())
    groups = model.group_matcher()
    assert "stem" in groups and "blocks" in groups


def test_safetensors_round_trip_is_exact(tmp_path):
    model = build("anchorformer_tiny_patch16_224", num_classes=6).eval()
    path = tmp_path / "tiny.safetensors"
    save_file(model.state_dict(), str(path))
    loaded = timm.create_model("anchorformer_tiny_patch16_224", pretrained=True, num_classes=6,
                               img_size=SMALL_IMAGE, pretrained_cfg_overlay=dict(file=str(path), num_classes=6))
    loaded.eval()
    x = images()
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_loading_at_another_image_size_resizes_pos_embed(tmp_path):
    model = build("anchorformer_tiny_patch16_224", num_classes=6)
    path = tmp_path / "tiny.safetensors"
    save_file(model.state_dict(), str(path))
    bigger = timm.create_model("anchorformer_tiny_patch16_224", pretrained=True, num_classes=6, img_size=64,
                               pretrained_cfg_overlay=dict(file=str(path)))
    assert bigger.pos_embed.shape == (1, 1 + 16, 192)
    torch.testing.assert_close(bigger.cls_token, model.cls_token)
    torch.testing.assert_close(bigger.pos_embed[:, 0], model.pos_embed[:, 0])  # prefix token kept
    assert bigger(images(size=64)).shape == (2, 6)


def test_new_head_when_num_classes_differs(tmp_path):
    model = build("anchorformer_tiny_patch16_224", num_classes=6)
    path = tmp_path / "tiny.safetensors"
    save_file(model.state_dict(), str(path))
    finetune = timm.create_model("anchorformer_tiny_patch16_224", pretrained=True, num_classes=3,
                                 img_size=SMALL_IMAGE, pretrained_cfg_overlay=dict(file=str(path)))
    torch.testing.assert_close(finetune.blocks[5].attn.anchors.weight, model.blocks[5].attn.anchors.weight)
    assert finetune.head.weight.shape == (3, 192)


@pytest.mark.parametrize("other, missing, unexpected", [
    ("anchorformer_tiny_distilled_patch16_224", "", "dist_token"),
    ("anchorformer_small_patch16_224", "", ""),
])
def test_checkpoint_of_another_variant_fails_listing_keys(tmp_path, other, missing, unexpected):
    path = tmp_path / "other.safetensors"
    save_file(build(other).state_dict(), str(path))
    with pytest.raises(ValueError, match="does not match") as err:
        timm.create_model("anchorformer_tiny_patch16_224", pretrained=True, img_size=SMALL_IMAGE,
                          pretrained_cfg_overlay=dict(file=str(path)))
    message = str(err.value)
    assert "missing keys" in message and "unexpected keys" in message and "shape mismatches" in message
    assert unexpected in message
    if other.startswith("anchorformer_small"):
        assert "blocks.0.attn.qk_v.weight: checkpoint (768, 384) vs model (384, 192)" in message


def test_authors_checkpoint_names_are_converted(tmp_path):
    model = build("anchorformer_tiny_distilled_patch16_224").eval()
    renames = {".attn.qk_v.": ".attn.x_to_emb.", ".attn.anchors.": ".attn.dist_anchor_B.",
               ".attn.proj.": ".attn.to_out.0."}
    authors = {}
    for key, value in model.state_dict().items():
        for ours, theirs in renames.items():
            key = key.replace(ours, theirs)
        authors[key] = value
    path = tmp_path / "authors.pth"
    torch.save({"model": authors}, path)
    loaded = timm.create_model("anchorformer_tiny_distilled_patch16_224", pretrained=True, img_size=SMALL_IMAGE,
                               pretrained_cfg_overlay=dict(file=str(path))).eval()
    torch.testing.assert_close(loaded(images()), model(images()), rtol=0, atol=0)


def test_pretrained_true_loads_the_default_weights_file(tmp_path, monkeypatch):
    monkeypatch.setenv("ANCHORFORMER_WEIGHTS", str(tmp_path))  # after import: resolved at creation
    model = build("anchorformer_tiny_patch16_224").eval()
    save_file(model.state_dict(), str(default_weights_file("anchorformer_tiny_patch16_224")))
    loaded = timm.create_model("anchorformer_tiny_patch16_224.in1k", pretrained=True, img_size=SMALL_IMAGE).eval()
    torch.testing.assert_close(loaded(images()), model(images()), rtol=0, atol=0)


def test_missing_default_weights_name_the_file_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("ANCHORFORMER_WEIGHTS", str(tmp_path))
    with pytest.raises(ValueError, match="convert_checkpoint"):
        timm.create_model("anchorformer_tiny_patch16_224", pretrained=True)


@pytest.mark.parametrize("kwargs, name", [
    (dict(num_anchors=0), "num_anchors"),
    (dict(embed_dim=200, num_heads=3), "num_heads"),
    (dict(img_size=40), "patch_size"),
])
def test_bad_arguments_raise_value_error_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        timm.create_model("anchorformer_tiny_patch16_224", **kwargs)


def test_non_multiple_image_size_is_fine_with_dynamic_padding():
    model = timm.create_model("anchorformer_tiny_patch16_224", img_size=40, dynamic_img_size=True,
                              dynamic_img_pad=True)
    assert isinstance(model, AnchorFormer) and model(images(size=40)).shape == (2, 1000)
    with pytest.raises(ValueError, match="dynamic_img_size"):
        timm.create_model("anchorformer_tiny_patch16_224", img_size=40, dynamic_img_pad=True)


def test_num_anchors_reaches_every_layer():
    model = build("anchorformer_tiny_patch16_224", num_anchors=12)
    assert {block.attn.anchors.weight.shape for block in model.blocks} == {(12, 64)}


@pytest.mark.parametrize("family", ["anchorformer_tiny_patch16_224", "anchorformer_tiny_distilled_patch16_224"])
def test_blocks_start_from_the_reference_init_unless_timm_is_asked_for(family):
    # the authors build their blocks after timm's init: PyTorch's default U(+-1/sqrt(fan_in)) there
    reference, timm_init = (timm.create_model(family, depth=2, block_init=mode) for mode in ("reference", "timm"))
    for model, linear_std in ((reference, 1 / (3 * 192) ** 0.5), (timm_init, 0.02)):
        fc1 = model.blocks[0].mlp.fc1
        assert fc1.weight.std().item() == pytest.approx(linear_std, rel=0.05)
        assert model.pos_embed.std().item() == pytest.approx(0.02, rel=0.1)  # timm's, outside the blocks
    assert reference.blocks[1].attn.anchors.weight.abs().max() <= 1 / 64 ** 0.5  # fan_in = head dim
    assert torch.count_nonzero(reference.blocks[0].mlp.fc1.bias) > 0 and not timm_init.blocks[0].mlp.fc1.bias.any()
    with pytest.raises(ValueError, match="block_init must be one of"):
        timm.create_model(family, depth=1, block_init="xavier")
