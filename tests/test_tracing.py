"""Every registered AnchorFormer scripts with TorchScript and traces with torch.fx, and its FX graph
scripts too (as timm's own model tests do), each with the eager model's outputs; timm's FX feature
extraction returns the requested nodes, also scripted; eager and traced models run the anchor mix
through the dispatcher (the backend measured fastest), the scripted ones through the PyTorch
reference."""
import warnings

import pytest
import timm
import torch
from timm.models import create_feature_extractor, get_graph_node_names

import anchorformer.models  # noqa: F401  (registers the models)
from anchorformer.kernels import backend_calls

VARIANTS = timm.list_models("anchorformer*")
IMAGE = 32  # 2 x 2 patches: full width and depth, tiny token count


def test_every_registered_variant_is_covered():
    """The parametrization reads the registry: it must list the paper's variants (and any added since)."""
    sizes = [f"anchorformer_{size}{kind}_patch16_224" for size in ("tiny", "small", "base") for kind in ("", "_distilled")]
    assert set(sizes) | {"anchorformer_base_patch16_384"} <= set(VARIANTS)


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, img_size=IMAGE, num_classes=5).eval()


def _dispatched(run) -> int:
    """How many anchor mixes ``run()`` sent through the dispatcher."""
    before = sum(backend_calls().values())
    run()
    return sum(backend_calls().values()) - before


@pytest.mark.parametrize("name", VARIANTS)
@torch.no_grad()
def test_script_and_fx_reproduce_the_eager_model(name):
    model = _model(name)
    x = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    traced = torch.fx.symbolic_trace(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated, still supported
        scripted = torch.jit.script(model)
        scripted_graph = torch.jit.script(traced)
    eager = model(x)
    assert eager.shape == (2, 5)
    torch.testing.assert_close(scripted(x), eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scripted_graph(x), eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(traced(x), eager, rtol=0, atol=0)
    depth = len(model.blocks)
    assert _dispatched(lambda: model(x)) == depth
    assert _dispatched(lambda: traced(x)) == depth  # the traced graph keeps the dispatcher's call
    assert _dispatched(lambda: scripted(x)) == 0  # TorchScript runs the PyTorch reference
    assert _dispatched(lambda: scripted_graph(x)) == 0


@torch.no_grad()
def test_fx_feature_extraction_returns_the_requested_nodes():
    model = _model("anchorformer_tiny_distilled_patch16_224")
    x = torch.randn(2, 3, IMAGE, IMAGE)
    _, eval_nodes = get_graph_node_names(model)
    assert "blocks.3.attn.anchor_mix_fast" in eval_nodes and "blocks.3.attn.proj" in eval_nodes
    extractor = create_feature_extractor(model, return_nodes={"blocks.3": "block3", "norm": "norm",
                                                              "blocks.3.attn.anchor_mix_fast": "mix3"})
    features = extractor(x)
    tokens = 2 * 2 + 2  # patches + cls + distillation token
    assert features["block3"].shape == (2, tokens, 192) and features["norm"].shape == (2, tokens, 192)
    assert features["mix3"].shape == (2, 3, tokens, 64)  # (B, heads, n, head dim)
    torch.testing.assert_close(features["norm"], model.forward_features(x), rtol=0, atol=0)

    fx_features = timm.create_model("anchorformer_tiny_patch16_224", img_size=IMAGE, features_only=True,
                                    feature_cls="fx", out_indices=(3, 11)).eval()
    assert [f.shape for f in fx_features(x)] == [(2, 5, 192), (2, 5, 192)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted_features = torch.jit.script(fx_features)  # timm's test_model_forward_fx_torchscript
        scripted_extractor = torch.jit.script(extractor)
    for scripted, eager in zip(scripted_features(x), fx_features(x)):
        torch.testing.assert_close(scripted, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scripted_extractor(x)["mix3"], features["mix3"], rtol=1e-5, atol=1e-5)


def test_a_traced_graph_still_refuses_attention_masks():
    traced = torch.fx.symbolic_trace(_model("anchorformer_tiny_patch16_224"))
    with pytest.raises(ValueError, match="neither attn_mask nor is_causal"):
        traced(torch.randn(1, 3, IMAGE, IMAGE), attn_mask=torch.zeros(5, 5))
