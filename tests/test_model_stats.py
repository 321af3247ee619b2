"""The closed-form counts agree with torch's FlopCounterMode (what tools/model_stats.py relies on)."""
import importlib.util

import pytest
from helpers import REPO

import anchorformer.models  # noqa: F401  (registers the models)
from anchorformer.models.complexity import forward_macs, measure, param_count


def load_tool():
    spec = importlib.util.spec_from_file_location("model_stats", REPO / "tools" / "model_stats.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["anchorformer_tiny_patch16_224", "anchorformer_small_distilled_patch16_224",
                                  "deit_tiny_patch16_224", "deit_base_distilled_patch16_384"])
@pytest.mark.parametrize("img_size", [224, 1024])
def test_closed_form_matches_flop_counter(name, img_size):
    shape, params, macs = measure(name, img_size)
    assert params == param_count(shape, img_size)
    assert macs == forward_macs(shape, img_size)


def test_anchor_attention_mixing_cost_is_linear_in_tokens():
    shape, _, _ = measure("anchorformer_tiny_patch16_224", 224)
    per_token = [forward_macs(shape, size) / ((size // 16) ** 2 + 1) for size in (224, 1024, 2048)]
    assert max(per_token) / min(per_token) < 1.01  # cost per token is constant: O(n), not O(n^2)


def test_tool_pairs_each_variant_with_its_deit_twin():
    tool = load_tool()
    assert tool.deit_twin("anchorformer_base_distilled_patch16_224") == "deit_base_distilled_patch16_224"
    assert tool.deit_twin("anchorformer_base_patch16_384") == "deit_base_patch16_384"
