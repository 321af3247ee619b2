"""AnchorFormer: DeiT backbones whose attention is anchor attention.

Paper: "Differentiable Anchor Attention for Efficient Vision Transformer", arXiv 2505.16463.
Reference code: github.com/hyzhang98/AnchorFormer (model/AnchorDeiT.py).

The backbone is timm's ``VisionTransformer`` (and DeiT's ``VisionTransformerDistilled``) with
every block's attention replaced by :class:`AnchorAttention`; everything else (patch embedding,
cls/dist tokens, pos_embed, pre-norm blocks with LayerNorm eps 1e-6, MLP ratio 4, heads) is timm's,
so the whole timm model contract holds: ``forward_features``, ``forward_head``,
``reset_classifier``, ``set_grad_checkpointing``, ``group_matcher``, ``no_weight_decay``,
``forward_intermediates``, ``prune_intermediate_layers``, ``features_only``, dynamic image size.

    import anchorformer.models, timm
    model = timm.create_model("anchorformer_tiny_patch16_224", num_classes=10)
"""
import os
import re
from functools import partial
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Type, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerScale, Mlp, resample_abs_pos_embed, resample_patch_embed
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

from .anchor_attention import AnchorAttention
from .errors import require

__all__ = ["AnchorBlock", "AnchorFormer", "AnchorFormerDistilled", "checkpoint_filter_fn", "default_weights_file",
           "weights_dir"]


class AnchorBlock(nn.Module):
    """Pre-norm transformer block (timm ``Block`` layout and parameter names) with anchor attention.

    Accepts every argument timm's ``VisionTransformer`` passes to its ``block_fn``; the attention
    options anchor attention lacks are validated by :class:`AnchorAttention`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_anchors: int = 30,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_attn_norm: bool = False,
        scale_mlp_norm: bool = False,
        proj_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values: Optional[float] = None,
        drop_path: float = 0.0,
        act_layer: Type[nn.Module] = nn.GELU,
        norm_layer: Type[nn.Module] = nn.LayerNorm,
        mlp_layer: Type[nn.Module] = Mlp,
        attn_layer: Any = None,
        depth: int = 0,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        del attn_layer, depth  # the attention is always AnchorAttention
        factory = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        self.norm1 = norm_layer(dim, **factory)
        self.attn = AnchorAttention(
            dim, num_heads=num_heads, num_anchors=num_anchors, proj_drop=proj_drop, qkv_bias=qkv_bias,
            qk_norm=qk_norm, scale_norm=scale_attn_norm, proj_bias=proj_bias, attn_drop=attn_drop, **factory)
        self.ls1 = LayerScale(dim, init_values=init_values, **factory) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim, **factory)
        mlp_norm = {"norm_layer": norm_layer} if scale_mlp_norm else {}
        self.mlp = mlp_layer(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer,
                             bias=proj_bias, drop=proj_drop, **mlp_norm, **factory)
        self.ls2 = LayerScale(dim, init_values=init_values, **factory) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
                ) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def _as_pair(size: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def _anchor_backbone_kwargs(num_anchors: int, block_init: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Check the backbone's arguments (the attention checks its own: num_anchors, heads, width) and
    route ``num_anchors`` into every block.

    Raises:
        ModelArgumentError: naming the argument.
    """
    depth = kwargs.get("depth", 12)
    require(isinstance(depth, int) and depth >= 1, "depth", f"depth must be an integer >= 1 (blocks), got depth={depth!r}")
    img_size, patch_size = _as_pair(kwargs.get("img_size", 224)), _as_pair(kwargs.get("patch_size", 16))
    require(bool(kwargs.get("dynamic_img_size")) or not any(i % p for i, p in zip(img_size, patch_size)), "img_size",
            f"img_size={img_size} is not divisible by patch_size={patch_size}; pick a multiple of the patch size, "
            "or set dynamic_img_size=True and dynamic_img_pad=True")
    require(kwargs.get("block_fn") in (None, AnchorBlock), "block_fn", "AnchorFormer always uses AnchorBlock; do not "
                                                                      "pass block_fn")
    require(block_init in BLOCK_INITS, "block_init", f"block_init must be one of {list(BLOCK_INITS)}, got {block_init!r}")
    kwargs.setdefault("norm_layer", partial(nn.LayerNorm, eps=1e-6))
    return dict(kwargs, block_fn=partial(AnchorBlock, num_anchors=num_anchors))


BLOCK_INITS = ("reference", "timm")


def _init_blocks(blocks: nn.Module, block_init: str) -> None:
    """Re-initialise the blocks' linear layers and norms with PyTorch's defaults (``reference``),
    or keep timm's init (``timm``). On the demo digits (3 seeds, 21 epochs) the reference init
    reached 93.2 +- 1.6 % top-1 against 89.0 +- 4.6 % with timm's."""
    if block_init == "reference":
        for module in blocks.modules():
            if isinstance(module, (nn.Linear, nn.LayerNorm)):
                module.reset_parameters()


class AnchorFormer(VisionTransformer):
    """A DeiT/ViT whose blocks use anchor attention with ``num_anchors`` anchors per layer.

    Args:
        num_anchors: anchors m per layer (30 in the paper).
        block_init: ``reference`` (default): the blocks keep PyTorch's default initialisation, as
            in the authors' AnchorDeiT, which builds its blocks after timm's init has run; ``timm``:
            timm's ViT init (trunc-normal 0.02) everywhere. Embeddings, tokens and head get timm's
            init either way.
        **kwargs: timm ``VisionTransformer`` arguments (img_size, patch_size, embed_dim, depth,
            num_heads, num_classes, drop_path_rate, dynamic_img_size, ...).
    """

    def __init__(self, num_anchors: int = 30, block_init: str = "reference", **kwargs: Any) -> None:
        super().__init__(**_anchor_backbone_kwargs(num_anchors, block_init, kwargs))
        self.num_anchors = num_anchors
        _init_blocks(self.blocks, block_init)


class AnchorFormerDistilled(VisionTransformerDistilled):
    """AnchorFormer with DeiT's distillation token and head (logits averaged at inference;
    ``set_distilled_training(True)`` returns both during training)."""

    def __init__(self, num_anchors: int = 30, block_init: str = "reference", **kwargs: Any) -> None:
        super().__init__(**_anchor_backbone_kwargs(num_anchors, block_init, kwargs))
        self.num_anchors = num_anchors
        _init_blocks(self.blocks, block_init)


# Names in the authors' checkpoints (model/AnchorViT.py, AnchorDeiT.py) -> ours.
_AUTHORS_KEYS = ((r"\.attn\.x_to_emb\.", ".attn.qk_v."), (r"\.attn\.dist_anchor_B\.", ".attn.anchors."),
                 (r"\.attn\.to_out\.0\.", ".attn.proj."))
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")


def _unwrap_state_dict(state_dict: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """Strip the containers and prefixes that trainers put around a model's weights
    (``{'model': ...}``, ``{'state_dict': ...}``, DeepSpeed ``{'module': ...}``, DDP ``module.``,
    torch.compile ``_orig_mod.``)."""
    for container in ("model", "state_dict", "module", "model_ema"):
        if isinstance(state_dict.get(container), dict):
            state_dict = state_dict[container]
            break
    for prefix in _WRAPPER_PREFIXES:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def _check_matches(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> None:
    """Fail with the full list of differences instead of a silent partial load. Classifier
    weights may differ in shape: timm's loader drops them when num_classes changes."""
    expected = model.state_dict()
    classifier = tuple(f"{name}." for name in ("head", "head_dist"))
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                        for k, v in state_dict.items()
                        if k in expected and v.shape != expected[k].shape and not k.startswith(classifier))
    if missing or unexpected or mismatched:
        raise ValueError(
            f"checkpoint does not match {type(model).__name__} (embed_dim={model.embed_dim}, "
            f"depth={len(model.blocks)}, num_prefix_tokens={model.num_prefix_tokens}); is it from another "
            f"variant? missing keys: {missing}; unexpected keys: {unexpected}; shape mismatches: {mismatched}")


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: VisionTransformer) -> Dict[str, torch.Tensor]:
    """Adapt a checkpoint to ``model``: unwrap trainer containers, rename the authors' keys,
    resample ``pos_embed`` (and the patch embedding) to the model's grid, then check that every
    key and shape matches (raising a ``ValueError`` that lists the differences).

    Accepts this project's checkpoints (state dicts, safetensors, DeepSpeed ``module`` dicts) and
    the authors' AnchorDeiT checkpoints.
    """
    state_dict = _unwrap_state_dict(state_dict)
    out = {}
    for key, value in state_dict.items():
        for pattern, replacement in _AUTHORS_KEYS:
            key = re.sub(pattern, replacement, key)
        if key == "patch_embed.proj.weight" and value.shape[-2:] != model.patch_embed.proj.weight.shape[-2:]:
            value = resample_patch_embed(value, list(model.patch_embed.proj.weight.shape[-2:]), verbose=True)
        elif key == "pos_embed" and value.shape != model.pos_embed.shape:
            prefix_tokens = 0 if model.no_embed_class else model.num_prefix_tokens
            value = resample_abs_pos_embed(value, new_size=list(model.patch_embed.grid_size),
                                           num_prefix_tokens=prefix_tokens, verbose=True)
        out[key] = value
    _check_matches(out, model)
    return out


def weights_dir() -> Path:
    """Folder where default pretrained cfgs look for weights: ``$ANCHORFORMER_WEIGHTS`` or
    ``~/.cache/anchorformer/weights`` (``tools/convert_checkpoint.py`` writes files there)."""
    return Path(os.environ.get("ANCHORFORMER_WEIGHTS", Path.home() / ".cache" / "anchorformer" / "weights"))


def default_weights_file(model_name: str, tag: str = "in1k", suffix: str = "") -> Path:
    """Where ``timm.create_model(f"{model_name}.{tag}", pretrained=True)`` looks for weights
    (``suffix`` names other exports of the same weights, e.g. ``-backbone1024``)."""
    return weights_dir() / f"{model_name}.{tag}{suffix}.safetensors"


def _cfg(name: str, **kwargs: Any) -> Dict[str, Any]:
    return {
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": 0.9, "interpolation": "bicubic", "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head", "license": "apache-2.0",
        "paper_ids": "arXiv:2505.16463",
        **kwargs,
    }


_DISTILLED = {"classifier": ("head", "head_dist")}
_AT_384 = {"input_size": (3, 384, 384), "crop_pct": 1.0}
default_cfgs = generate_default_cfgs({
    name: _cfg(name, **extra) for name, extra in {
        "anchorformer_tiny_patch16_224.in1k": {},
        "anchorformer_small_patch16_224.in1k": {},
        "anchorformer_base_patch16_224.in1k": {},
        "anchorformer_base_patch16_224.in21k": {"num_classes": 21841},
        "anchorformer_base_patch16_384.in1k": _AT_384,
        "anchorformer_tiny_distilled_patch16_224.in1k": _DISTILLED,
        "anchorformer_small_distilled_patch16_224.in1k": _DISTILLED,
        "anchorformer_base_distilled_patch16_224.in1k": _DISTILLED,
        "anchorformer_base_distilled_patch16_384.in1k": {**_DISTILLED, **_AT_384},
    }.items()
})


def _with_default_weights(variant: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The pretrained-cfg overlay, with the default weights file (resolved now, so that
    ``$ANCHORFORMER_WEIGHTS`` set after import counts) unless the caller gave a file or state dict,
    or timm resolved the weights' location (``local-dir:FOLDER``, ``hf-hub:REPO``)."""
    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
    if overlay.get("file") or overlay.get("state_dict") is not None:
        return overlay
    resolved = kwargs.get("pretrained_cfg")
    if isinstance(resolved, dict) and resolved.get("source") in ("local-dir", "hf-hub"):
        return overlay
    tag = kwargs.get("pretrained_cfg") if isinstance(kwargs.get("pretrained_cfg"), str) else "in1k"
    weights = default_weights_file(variant, tag)
    if not weights.is_file():
        raise ValueError(
            f"no weights for {variant}.{tag} at {weights}; convert a training checkpoint with "
            "`python tools/convert_checkpoint.py RUN_DIR --format classification` (it writes there), "
            "set ANCHORFORMER_WEIGHTS, or pass pretrained_cfg_overlay=dict(file=PATH)")
    return dict(overlay, file=str(weights))


def _create_anchorformer(variant: str, pretrained: bool = False, distilled: bool = False,
                         **kwargs: Any) -> VisionTransformer:
    out_indices = kwargs.pop("out_indices", 3)
    if pretrained:
        kwargs["pretrained_cfg_overlay"] = _with_default_weights(variant, kwargs)
    return build_model_with_cfg(
        AnchorFormerDistilled if distilled else AnchorFormer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


_TINY = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
_SMALL = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
_BASE = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)


@register_model
def anchorformer_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> AnchorFormer:
    """AnchorFormer-Ti/16 at 224 px (DeiT-Ti backbone, 30 anchors per layer), arXiv 2505.16463.
    No released weights: ``.in1k`` loads a file converted from your own run."""
    return _create_anchorformer("anchorformer_tiny_patch16_224", pretrained, **dict(_TINY, **kwargs))


@register_model
def anchorformer_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> AnchorFormer:
    """AnchorFormer-S/16 at 224 px (DeiT-S backbone, 30 anchors per layer), arXiv 2505.16463."""
    return _create_anchorformer("anchorformer_small_patch16_224", pretrained, **dict(_SMALL, **kwargs))


@register_model
def anchorformer_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> AnchorFormer:
    """AnchorFormer-B/16 at 224 px (DeiT-B backbone, 30 anchors per layer), arXiv 2505.16463.
    Tags: ``.in1k``, ``.in21k`` (21841 classes, from configs/in21k_base.yaml)."""
    return _create_anchorformer("anchorformer_base_patch16_224", pretrained, **dict(_BASE, **kwargs))


@register_model
def anchorformer_base_patch16_384(pretrained: bool = False, **kwargs: Any) -> AnchorFormer:
    """AnchorFormer-B/16 at 384 px (fine-tuned from 224, configs/ft_in1k_base_384.yaml), arXiv 2505.16463."""
    return _create_anchorformer("anchorformer_base_patch16_384", pretrained, **dict(_BASE, **{"img_size": 384, **kwargs}))


@register_model
def anchorformer_tiny_distilled_patch16_224(pretrained: bool = False, **kwargs: Any) -> AnchorFormerDistilled:
    """AnchorFormer-Ti/16 with DeiT's distillation token, arXiv 2505.16463 (the authors' AnchorDeiT)."""
    return _create_anchorformer("anchorformer_tiny_distilled_patch16_224", pretrained, distilled=True,
                                **dict(_TINY, **kwargs))


@register_model
def anchorformer_small_distilled_patch16_224(pretrained: bool = False, **kwargs: Any) -> AnchorFormerDistilled:
    """AnchorFormer-S/16 with DeiT's distillation token, arXiv 2505.16463."""
    return _create_anchorformer("anchorformer_small_distilled_patch16_224", pretrained, distilled=True,
                                **dict(_SMALL, **kwargs))


@register_model
def anchorformer_base_distilled_patch16_224(pretrained: bool = False, **kwargs: Any) -> AnchorFormerDistilled:
    """AnchorFormer-B/16 with DeiT's distillation token, arXiv 2505.16463."""
    return _create_anchorformer("anchorformer_base_distilled_patch16_224", pretrained, distilled=True,
                                **dict(_BASE, **kwargs))


@register_model
def anchorformer_base_distilled_patch16_384(pretrained: bool = False, **kwargs: Any) -> AnchorFormerDistilled:
    """AnchorFormer-B/16 with DeiT's distillation token at 384 px (fine-tuned from 224 with
    distillation, configs/ft_in1k_base_distilled_384.yaml), arXiv 2505.16463 (the authors'
    anchor_deit_base_distilled_patch16_384)."""
    return _create_anchorformer("anchorformer_base_distilled_patch16_384", pretrained, distilled=True,
                                **dict(_BASE, **{"img_size": 384, **kwargs}))
