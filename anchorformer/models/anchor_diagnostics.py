"""What the anchors of an AnchorFormer do, measured on a fixed probe batch of images.

For every anchor-attention layer, with ``A`` the (B, h, n, m) token -> anchor assignment
(softmax over anchors of ``qk @ U^T * dh**-0.5``, docs/architecture.md) and ``Lambda = A`` summed
over the n tokens (the anchor degrees; they sum to n, so a fair share is n / m):

- relative degrees ``Lambda / (n / m)`` of every image, head and anchor (a histogram; 1 = fair share);
- dead anchors: an anchor whose degree, averaged over the probe images and the heads, is below
  ``DEAD_FRACTION`` of its fair share;
- the mean normalised assignment entropy ``H(A_i) / log m`` over tokens, heads and images, in
  [0, 1] (0: each token picks one anchor; 1: uniform over all of them);
- the anchors' norms and their pairwise cosine similarity (max and mean over pairs);

and for the first, middle and last layers, per image: each patch's strongest anchor (argmax of
the head-averaged ``A``) and the cls token's row of ``S = A diag(1/Lambda) A^T`` (head-averaged)
over the patch grid.

The layer code and the training step are untouched: forward hooks read each layer's ``qk``
(its ``qk_v`` projection's output) while ``forward_features`` runs in eval mode without
gradients; the modules' modes are restored afterwards. The weights must be whole: under ZeRO-3
every rank enters ``anchorformer.dist.zero.whole_parameters(model)`` and rank 0 alone probes.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch import nn

from .anchor_attention import AnchorAttention

__all__ = ["DEAD_FRACTION", "AnchorProbe", "LayerDiagnostics", "AnchorMaps", "AnchorDiagnostics",
           "anchor_diagnostics", "assignment", "cls_similarity_row", "map_layers"]

DEAD_FRACTION = 0.01
"""An anchor is dead when its mean degree is below this fraction of the fair share n / m. It then
carries under 1 % of an average anchor's share of the mixing (a token reads anchor j with weight
A_ij, and these weights sum to Lambda_j), and the gradient reaching its weight, proportional to its
assignments, is as small: it does not come back. A trained, healthy model keeps every anchor far
above it (docs/tensorboard.md gives the demo's spread)."""


@dataclass(frozen=True)
class AnchorProbe:
    """A fixed batch of images, normalised exactly as the model receives them, kept on the CPU.

    Args:
        images: (k, C, H, W) float tensor.
    """

    images: torch.Tensor

    @classmethod
    def from_batch(cls, images: torch.Tensor, count: int = 16) -> "AnchorProbe":
        """The first ``count`` images of a batch (e.g. the first validation batch), copied."""
        if images.ndim != 4 or images.shape[0] < 1:
            raise ValueError(f"a probe needs a (B, C, H, W) batch of at least one image, got {tuple(images.shape)}")
        if count < 1:
            raise ValueError(f"a probe needs count >= 1 images, got {count}")
        return cls(images[:count].detach().to("cpu", torch.float32, copy=True))


@dataclass
class LayerDiagnostics:
    """One anchor-attention layer on the probe batch."""

    layer: int
    relative_degree: torch.Tensor
    """(B * h * m,) every image's, head's and anchor's degree over its fair share n / m."""
    anchor_degree: torch.Tensor
    """(m,) each anchor's relative degree averaged over images and heads."""
    dead: int
    """Anchors whose ``anchor_degree`` is below ``DEAD_FRACTION``."""
    entropy: float
    """Mean normalised assignment entropy in [0, 1] (0 when m = 1: a single anchor is certain)."""
    anchor_norm: torch.Tensor
    """(m,) L2 norm of each anchor."""
    cosine_max: Optional[float]
    """Largest cosine similarity of two different anchors (None when m = 1)."""
    cosine_mean: Optional[float]
    """Mean cosine similarity over the pairs of different anchors (None when m = 1)."""


@dataclass
class AnchorMaps:
    """Per-image maps over the patch grid of one layer."""

    layer: int
    assignment: torch.Tensor
    """(B, gh, gw) int64: each patch's strongest anchor (argmax of the head-averaged assignment)."""
    cls_similarity: Optional[torch.Tensor]
    """(B, gh, gw): the cls token's row of S on the patches, head-averaged (None without cls token)."""


@dataclass
class AnchorDiagnostics:
    """The diagnostics of every layer and the maps of the first, middle and last layers."""

    num_tokens: int
    num_anchors: int
    grid: tuple[int, int]
    layers: list[LayerDiagnostics]
    maps: list[AnchorMaps]

    def scalars(self) -> dict[str, float]:
        """TensorBoard scalars: ``anchors/<metric>/layer_<i>`` and ``anchors/dead_total``."""
        values: dict[str, float] = {"anchors/dead_total": float(sum(layer.dead for layer in self.layers))}
        for layer in self.layers:
            name = f"layer_{layer.layer:02d}"
            values[f"anchors/dead/{name}"] = float(layer.dead)
            values[f"anchors/degree_min/{name}"] = float(layer.anchor_degree.min())
            values[f"anchors/entropy/{name}"] = layer.entropy
            values[f"anchors/norm_mean/{name}"] = float(layer.anchor_norm.mean())
            if layer.cosine_max is not None:
                values[f"anchors/cosine_max/{name}"] = layer.cosine_max
                values[f"anchors/cosine_mean/{name}"] = float(layer.cosine_mean)
        return values

    def histograms(self) -> dict[str, torch.Tensor]:
        """TensorBoard histograms: relative degrees and anchor norms per layer."""
        values: dict[str, torch.Tensor] = {}
        for layer in self.layers:
            values[f"anchors/degree/layer_{layer.layer:02d}"] = layer.relative_degree
            values[f"anchors/norm/layer_{layer.layer:02d}"] = layer.anchor_norm
        return values

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain numbers and lists (for JSON)."""
        return {
            "num_tokens": self.num_tokens, "num_anchors": self.num_anchors, "grid": list(self.grid),
            "dead_fraction": DEAD_FRACTION,
            "layers": [{"layer": layer.layer, "dead": layer.dead, "entropy": layer.entropy,
                        "anchor_degree": layer.anchor_degree.tolist(), "anchor_norm": layer.anchor_norm.tolist(),
                        "cosine_max": layer.cosine_max, "cosine_mean": layer.cosine_mean}
                       for layer in self.layers],
            "maps": [{"layer": maps.layer, "assignment": maps.assignment.tolist(),
                      "cls_similarity": None if maps.cls_similarity is None else maps.cls_similarity.tolist()}
                     for maps in self.maps],
        }


def assignment(qk: torch.Tensor, anchors: torch.Tensor, scale: float) -> torch.Tensor:
    """``A = softmax over anchors of (qk @ U^T * scale)`` in float32 (float64 stays float64).

    Args:
        qk: (B, h, n, dh) tokens.
        anchors: (m, dh) anchor weight.
        scale: the layer's logit scale.

    Returns:
        (B, h, n, m) row-stochastic assignment.
    """
    dtype = torch.promote_types(qk.dtype, torch.float32)
    return torch.softmax(torch.matmul(qk.to(dtype) * scale, anchors.to(dtype).t()), dim=-1)


def cls_similarity_row(assign: torch.Tensor, token: int = 0) -> torch.Tensor:
    """Row ``token`` of ``S = A diag(1/Lambda) A^T`` (1/0 -> 0, as in the layer), averaged over heads.

    Args:
        assign: (B, h, n, m) assignment.
        token: the row (0: the cls token).

    Returns:
        (B, n) rows; each sums to 1.
    """
    degree = assign.sum(dim=-2, keepdim=True)  # (B, h, 1, m)
    inv_degree = torch.where(degree > 0, 1.0 / degree.clamp_min(torch.finfo(degree.dtype).tiny),
                             torch.zeros_like(degree))
    weights = assign[:, :, token : token + 1, :] * inv_degree  # (B, h, 1, m)
    return torch.matmul(weights, assign.transpose(-2, -1)).squeeze(-2).mean(dim=1)


def map_layers(depth: int) -> list[int]:
    """The first, middle and last layer (fewer when the model is shallower)."""
    return sorted({0, depth // 2, depth - 1})


def _layer_statistics(layer: int, assign: torch.Tensor, anchors: torch.Tensor) -> LayerDiagnostics:
    batch, heads, tokens, num_anchors = assign.shape
    relative = assign.sum(dim=-2) * (num_anchors / tokens)  # (B, h, m); fair share = 1
    anchor_degree = relative.mean(dim=(0, 1))
    if num_anchors > 1:
        entropy = float((-torch.special.xlogy(assign, assign).sum(-1) / math.log(num_anchors)).mean())
    else:
        entropy = 0.0
    weight = anchors.float()
    norms = weight.norm(dim=-1)
    cosine_max = cosine_mean = None
    if num_anchors > 1:
        unit = weight / norms.clamp_min(1e-12).unsqueeze(-1)
        pairs = torch.triu_indices(num_anchors, num_anchors, offset=1)
        cosines = (unit @ unit.t())[pairs[0], pairs[1]]
        cosine_max, cosine_mean = float(cosines.max()), float(cosines.mean())
    return LayerDiagnostics(layer=layer, relative_degree=relative.flatten().cpu(), anchor_degree=anchor_degree.cpu(),
                            dead=int((anchor_degree < DEAD_FRACTION).sum()), entropy=min(max(entropy, 0.0), 1.0),
                            anchor_norm=norms.cpu(), cosine_max=cosine_max, cosine_mean=cosine_mean)


def _layer_maps(layer: int, assign: torch.Tensor, prefix: int, grid: tuple[int, int], has_cls: bool) -> AnchorMaps:
    batch = assign.shape[0]
    patches = assign[:, :, prefix:, :].mean(dim=1)  # (B, n_patches, m)
    strongest = patches.argmax(dim=-1).reshape(batch, *grid).cpu()
    cls_row = cls_similarity_row(assign)[:, prefix:].reshape(batch, *grid).cpu() if has_cls else None
    return AnchorMaps(layer=layer, assignment=strongest, cls_similarity=cls_row)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside; each module's own mode restored after (a frozen part stays frozen)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _qk(attn: AnchorAttention, projection: torch.Tensor) -> torch.Tensor:
    """``qk`` (B, h, n, dh) from the layer's ``qk_v`` output (B, n, 2 D), split as
    ``AnchorAttention.forward`` splits it (its test checks the two stay in step)."""
    batch, tokens, _ = projection.shape
    return projection.reshape(batch, tokens, 2, attn.num_heads, attn.head_dim)[:, :, 0].transpose(1, 2)


@torch.no_grad()
def anchor_diagnostics(model: nn.Module, probe: AnchorProbe, with_maps: bool = True) -> AnchorDiagnostics:
    """Run the probe through ``model.forward_features`` and measure every anchor-attention layer.

    Args:
        model: an AnchorFormer (plain or distilled, any m and h), not compiled (hooks see the eager
            layers); its modes are restored and its weights untouched.
        probe: the images.
        with_maps: also compute the per-image maps of the first, middle and last layers.

    Returns:
        The diagnostics, on the CPU.

    Raises:
        ValueError: when the model has no anchor-attention layer.
    """
    layers = [module for module in model.modules() if isinstance(module, AnchorAttention)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no AnchorAttention layer; anchor diagnostics need an "
                         "AnchorFormer")
    # read before the forward: the layer uses its anchor weight without calling that module, so a
    # ZeRO-3 hook could release it before ours runs
    anchors = [attn.anchors.weight.detach().clone() for attn in layers]
    parameter = next(model.parameters())
    images = probe.images.to(parameter.device, parameter.dtype)
    prefix = int(getattr(model, "num_prefix_tokens", 0))
    grid = tuple(model.patch_embed.dynamic_feat_size(images.shape[-2:]))
    has_cls = bool(getattr(model, "has_class_token", prefix > 0))
    wanted_maps = set(map_layers(len(layers))) if with_maps else set()
    projections: dict[int, torch.Tensor] = {}
    statistics: list[LayerDiagnostics] = []
    maps: list[AnchorMaps] = []

    def keep_projection(index: int):
        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            projections[index] = output
        return hook

    def measure(index: int):
        def hook(attn: AnchorAttention, _inputs: Any, _output: torch.Tensor) -> None:
            assign = assignment(_qk(attn, projections.pop(index)), anchors[index], attn.scale)
            statistics.append(_layer_statistics(index, assign, anchors[index]))
            if index in wanted_maps:
                maps.append(_layer_maps(index, assign, prefix, grid, has_cls))
        return hook

    handles = []
    try:
        for index, attn in enumerate(layers):
            handles.append(attn.qk_v.register_forward_hook(keep_projection(index)))
            handles.append(attn.register_forward_hook(measure(index)))
        with _eval_mode(model):
            tokens = model.forward_features(images).shape[1]
    finally:
        for handle in handles:
            handle.remove()
    if len(statistics) != len(layers):
        raise ValueError(f"forward_features ran {len(statistics)} of the {len(layers)} anchor-attention layers; "
                         "diagnostics need every block to run (no pruned or skipped blocks)")
    return AnchorDiagnostics(num_tokens=tokens, num_anchors=layers[0].num_anchors, grid=grid,
                             layers=statistics, maps=maps)
