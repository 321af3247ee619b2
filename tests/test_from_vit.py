"""ViT/DeiT -> AnchorFormer (models/from_vit.py): every tensor carried over exactly (the value bias
folded exactly into the output projection), the qk rules and the sym rule's optimality, k-means
anchors (shapes, determinism, through the converted layers), and sources of another shape refused
with the mismatch named."""
import pytest
import timm
import torch

import anchorformer.models  # noqa: F401
from anchorformer.kernels.reference import anchor_mix
from anchorformer.models.from_vit import (
    QK_RULES, convert_vit_state_dict, init_from_data, is_vit_state_dict, kmeans, merge_qk, vit_architecture,
)

SHAPE = dict(img_size=16, patch_size=4, embed_dim=48, depth=2, num_heads=3)


def _deit(distilled: bool = False, **overrides) -> torch.nn.Module:
    """A small DeiT with non-zero qkv biases (timm's init leaves them at zero)."""
    torch.manual_seed(0)
    name = "deit_tiny_distilled_patch16_224" if distilled else "deit_tiny_patch16_224"
    model = timm.create_model(name, num_classes=5, **{**SHAPE, **overrides})
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.bias.normal_()
    return model.eval()


def _anchorformer(distilled: bool = False, **overrides) -> torch.nn.Module:
    name = "anchorformer_tiny_distilled_patch16_224" if distilled else "anchorformer_tiny_patch16_224"
    return timm.create_model(name, num_classes=5, num_anchors=6, **{**SHAPE, **overrides}).eval()


@pytest.mark.parametrize("distilled", [False, True])
def test_every_tensor_but_q_and_k_is_carried_over_exactly(distilled):
    vit = _deit(distilled).state_dict()
    model = _anchorformer(distilled)
    fresh_anchors = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("anchors.weight")}
    state, report = convert_vit_state_dict(vit, model, "sym", source_heads=3)
    assert set(state) == set(model.state_dict())
    dim = SHAPE["embed_dim"]
    for key, value in state.items():
        if ".attn." not in key:
            assert torch.equal(value, vit[key]), key
    for i in range(SHAPE["depth"]):
        attn, qkv = f"blocks.{i}.attn.", vit[f"blocks.{i}.attn.qkv.weight"]
        assert torch.equal(state[f"{attn}qk_v.weight"][dim:], qkv[2 * dim:])
        assert torch.equal(state[f"{attn}proj.weight"], vit[f"{attn}proj.weight"])
        expected_bias = vit[f"{attn}proj.bias"] + vit[f"{attn}proj.weight"] @ vit[f"{attn}qkv.bias"][2 * dim:]
        assert torch.allclose(state[f"{attn}proj.bias"], expected_bias, atol=1e-6)
        assert torch.equal(state[f"{attn}anchors.weight"], fresh_anchors[f"{attn}anchors.weight"])
    assert report["qk_rule"] == "sym" and len(report["qk_relative_error"]) == SHAPE["depth"]
    assert len(report["folded"]) == len(report["dropped"]) == SHAPE["depth"]
    assert "cls_token" in report["carried_over"] and "pos_embed" in report["carried_over"]


def test_the_folded_value_bias_gives_the_attention_output_with_the_bias_exactly():
    """S is row-stochastic, so S (v + 1 b^T) = S v + 1 b^T: the fold changes nothing."""
    vit = _deit().state_dict()
    model = _anchorformer()
    model.load_state_dict(convert_vit_state_dict(vit, model)[0])
    attn, dim = model.blocks[0].attn, SHAPE["embed_dim"]
    x = torch.randn(2, 17, dim)
    heads = lambda t: t.reshape(2, 17, 3, dim // 3).transpose(1, 2)  # noqa: E731
    qkv_w, qkv_b = vit["blocks.0.attn.qkv.weight"], vit["blocks.0.attn.qkv.bias"]
    mixed = anchor_mix(heads(x @ attn.qk_v.weight[:dim].T), attn.anchors.weight,
                       heads(x @ qkv_w[2 * dim:].T + qkv_b[2 * dim:]), attn.scale)
    expected = mixed.transpose(1, 2).reshape(2, 17, dim) @ vit["blocks.0.attn.proj.weight"].T \
        + vit["blocks.0.attn.proj.bias"]
    with torch.no_grad():
        assert torch.allclose(attn(x), expected, atol=1e-5)


def test_sym_rule_is_the_best_psd_form_of_rank_dh_of_the_logits():
    torch.manual_seed(1)
    dim, heads = 24, 2
    dh = dim // heads
    w_q, w_k = torch.randn(dim, dim), torch.randn(dim, dim)
    merged, error = merge_qk(w_q, w_k, heads, "sym")
    for h in range(heads):
        q, k, w = (t[h * dh:(h + 1) * dh].double() for t in (w_q, w_k, merged))
        sym = (q.T @ k + k.T @ q) / 2
        values, vectors = torch.linalg.eigh(sym)
        best = vectors[:, -dh:] @ torch.diag(values[-dh:].clamp(min=0)) @ vectors[:, -dh:].T
        assert torch.allclose(w.T @ w, best, atol=1e-4)
    errors = {rule: merge_qk(w_q, w_k, heads, rule)[1] for rule in QK_RULES}
    assert errors["sym"] == error and error == min(errors.values())


def test_sym_rule_reproduces_a_symmetric_vit_exactly():
    """A ViT whose query and key weights coincide has PSD logits: one projection expresses them."""
    w = torch.randn(12, 12)
    merged, error = merge_qk(w, w, 2, "sym")
    assert error < 1e-6
    for h in range(2):
        part = merged[h * 6:(h + 1) * 6]
        assert torch.allclose(part.T @ part, w[h * 6:(h + 1) * 6].T @ w[h * 6:(h + 1) * 6], atol=1e-4)


@pytest.mark.parametrize("rule, expected", [("q", "q"), ("k", "k"), ("mean", "mean")])
def test_simple_rules(rule, expected):
    w_q, w_k = torch.randn(12, 12), torch.randn(12, 12)
    merged, _ = merge_qk(w_q, w_k, 3, rule)
    assert torch.equal(merged, {"q": w_q, "k": w_k, "mean": (w_q + w_k) / 2}[expected])
    with pytest.raises(ValueError, match="not one of"):
        merge_qk(w_q, w_k, 3, "median")


def test_kmeans_finds_separated_clusters_and_is_deterministic():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = torch.cat([c + 0.1 * torch.randn(200, 2, generator=generator) for c in centres])
    found, inertia = kmeans(points, 3, seed=4)
    assert found.shape == (3, 2) and inertia < 0.05
    assert torch.cdist(found, centres).min(0).values.max() < 0.1
    again, _ = kmeans(points, 3, seed=4)
    assert torch.equal(found, again)
    with pytest.raises(ValueError, match="give more images"):
        kmeans(points[:2], 3)


def test_kmeans_anchors_are_set_per_layer_deterministically():
    vit = _deit().state_dict()
    batches = [torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    anchors = []
    for _ in range(2):
        model = _anchorformer()
        model.load_state_dict(convert_vit_state_dict(vit, model)[0])
        report = init_from_data(model, iter(batches), seed=3)
        anchors.append([block.attn.anchors.weight.clone() for block in model.blocks])
        assert model.training is False
    assert all(torch.equal(a, b) for a, b in zip(*anchors))
    assert all(a.shape == (6, SHAPE["embed_dim"] // 3) for a in anchors[0])
    assert report["images"] == 12 and report["vectors_per_layer"] == 12 * 17 * 3
    assert len(report["mean_sq_distance"]) == SHAPE["depth"]
    # the anchors are centroids of layer 0's qk vectors: each lies inside their range
    model = _anchorformer()
    model.load_state_dict(convert_vit_state_dict(vit, model)[0])
    init_from_data(model, iter(batches))
    block = model.blocks[0]
    with torch.no_grad():
        tokens = model._pos_embed(model.patch_embed(torch.cat(batches)))
        vectors = (block.norm1(tokens) @ block.attn.qk_v.weight[:SHAPE["embed_dim"]].T).reshape(-1, 16)
    assert (block.attn.anchors.weight >= vectors.min(0).values - 1e-5).all()
    assert (block.attn.anchors.weight <= vectors.max(0).values + 1e-5).all()


def test_no_images_is_refused():
    model = _anchorformer()
    with pytest.raises(ValueError, match="no images"):
        init_from_data(model, iter([]))


@pytest.mark.parametrize("source, target, named", [
    (dict(embed_dim=60), {}, "embed_dim 60 (source) vs 48 (target)"),
    (dict(depth=3), {}, "depth 3 (source) vs 2 (target)"),
    (dict(patch_size=8), {}, "patch_size 8 (source) vs 4 (target)"),
])
def test_a_source_of_another_shape_is_refused_naming_the_mismatch(source, target, named):
    vit = _deit(**source).state_dict()
    with pytest.raises(ValueError) as caught:
        convert_vit_state_dict(vit, _anchorformer(**target))
    assert named in str(caught.value) and "--model-args" in str(caught.value)


def test_other_heads_another_variant_and_no_vit_are_refused():
    vit = _deit().state_dict()
    with pytest.raises(ValueError, match="num_heads 4 \\(source\\) vs 3"):
        convert_vit_state_dict(vit, _anchorformer(), source_heads=4)
    with pytest.raises(ValueError, match="dist_token"):
        convert_vit_state_dict(_deit(distilled=True).state_dict(), _anchorformer())
    with pytest.raises(ValueError, match="lacks"):
        convert_vit_state_dict(vit, _anchorformer(distilled=True))
    anchor_state = _anchorformer().state_dict()
    assert is_vit_state_dict(vit) and not is_vit_state_dict(anchor_state)
    with pytest.raises(ValueError, match="not a timm ViT/DeiT"):
        vit_architecture(anchor_state)
    assert vit_architecture(vit) == {"embed_dim": 48, "depth": 2, "patch_size": 4}


def test_the_attention_fit_moves_only_qk_and_anchors_and_lowers_the_error():
    # trained attention is far from timm's init (weights of std 0.02, outputs ~1e-3): scale it up
    vit = {k: v * 25 if k.endswith(("qkv.weight", "attn.proj.weight")) else v for k, v in _deit().state_dict().items()}
    batches = [torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    results = []
    for _ in range(2):
        model = _anchorformer()
        state, _ = convert_vit_state_dict(vit, model)
        model.load_state_dict(state)
        report = init_from_data(model, iter(batches), vit=vit, fit_steps=30, fit_tokens=8 * 17, lr=3e-3)
        results.append(model.state_dict())
    fit = report["attention_fit"]
    assert fit["batch_images"] == 8
    assert all(after < before for before, after in zip(fit["mse_before"], fit["mse_after"])), fit
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0]), "the fit is not deterministic"
    dim = SHAPE["embed_dim"]
    for key, value in results[0].items():
        if key.endswith("qk_v.weight"):
            assert torch.equal(value[dim:], state[key][dim:]) and not torch.equal(value[:dim], state[key][:dim])
        elif not key.endswith("anchors.weight"):
            assert torch.equal(value, state[key]), key
    assert report["cpu_seconds"] >= 0 and report["images"] == 16
    assert init_from_data(model, iter(batches))["attention_fit"] is None
