"""ViT/DeiT -> AnchorFormer: start an AnchorFormer from a pre-trained ViT of the same width, depth
and patch size instead of from scratch.

Everything but the attention's input projection is carried over unchanged: patch and position
embeddings, cls/dist tokens, every norm, the MLPs, the heads and the attention's output
projection. The ViT's value projection becomes the second half of ``attn.qk_v``; its bias (anchor
attention's projection has none) is folded exactly into the output projection's bias, since the
anchor mixing ``S = A diag(1/Lambda) A^T`` is row-stochastic (``S 1 = 1``), so
``proj(S (x W_v^T + 1 b_v^T)) = proj(S x W_v^T) + W_o b_v``.

Anchor attention has ONE projection serving as query and key (``qk``), so the ViT's q and k must be
merged (:data:`QK_RULES`). The default, ``sym``, keeps per head the best approximation of the
ViT's attention logits ``q_i . k_j = x_i^T Wq^T Wk x_j`` that a single projection can express:
``qk_i . qk_j = x_i^T W^T W x_j`` is a symmetric positive semi-definite form of rank <= dh, and the
closest such form (Frobenius norm) to ``Wq^T Wk`` is the top-dh positive eigen-part of its
symmetric part ``(Wq^T Wk + Wk^T Wq) / 2`` (its antisymmetric part cannot be expressed by any
symmetric form). ``W = sqrt(Lambda+) V^T``. The ViT's q and k biases are dropped (anchor attention
has none); the report gives each layer's relative error of the kept form.
Measured on the digits (docs/training.md, "Start from a pre-trained ViT/DeiT"): with k-means
anchors alone ``sym`` and ``mean`` tie within the noise of 297 validation images (about 25 % top-1
right after conversion, about 94 % after a fifth of a from-scratch run's epochs), ``q`` and ``k`` are
clearly worse right after (16-19 %). ``sym`` is the default because it is the provably closest form
(lowest logit error on every layer) and reproduces a source whose attention logits are symmetric
exactly, where ``mean`` does not. What recovers most is fitting qk and the anchors to the ViT's
attention output on the user's images (:func:`init_from_data`): 45 % right after, 96 % after the
short fine-tune.

Anchors come from data (:func:`init_from_data`): per layer, k-means of the converted ``qk``
vectors (each head's dh-vector of each token, after the layer norm) of a few batches of the user's
images, layer by layer through the converted model (layer l sees what the converted layers before it
produce); then the layer's qk and anchors are fitted to the ViT's attention output on those tokens.

    model = timm.create_model("anchorformer_tiny_patch16_224", num_classes=10)
    state, report = convert_vit_state_dict(vit_state_dict, model)
    model.load_state_dict(state)
    report["anchors"] = init_from_data(model, image_batches, vit=vit_state_dict)
"""
from __future__ import annotations

import re
import time
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["QK_RULES", "DEFAULT_QK_RULE", "ATTENTION_FIT_STEPS", "ATTENTION_FIT_TOKENS", "is_vit_state_dict", "vit_architecture", "check_same_shape", "merge_qk",
           "convert_vit_state_dict", "kmeans", "init_from_data"]

QK_RULES = ("sym", "mean", "q", "k")
"""How the ViT's query and key weights become the one ``qk`` projection (per head): ``sym`` the
rank-dh PSD part of ``sym(Wq^T Wk)`` (the logits' best single-projection form), ``mean``
``(Wq + Wk) / 2``, ``q`` the query weights, ``k`` the key weights."""
DEFAULT_QK_RULE = "sym"
ATTENTION_FIT_STEPS = 100
"""Adam steps per layer fitting qk and anchors to the ViT's attention (300 did no better on the digits)."""
ATTENTION_FIT_TOKENS = 2176
"""Tokens per fit step (128 images of the demo's 17 tokens; 11 images at 224 px): a step costs the
same at every resolution (about 0.2 s on the shared 2-core machine)."""

_QKV = re.compile(r"blocks\.(\d+)\.attn\.qkv\.weight")


def is_vit_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """Whether ``state_dict`` holds a timm ViT/DeiT (blocks with a fused ``attn.qkv``)."""
    return any(_QKV.fullmatch(key) for key in state_dict)


def vit_architecture(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, int]:
    """Width, depth and patch size of a timm ViT/DeiT state dict, read from its tensors.

    Raises:
        ValueError: when the state dict is not a timm ViT/DeiT.
    """
    if not is_vit_state_dict(state_dict) or "patch_embed.proj.weight" not in state_dict:
        raise ValueError("not a timm ViT/DeiT state dict: expected keys blocks.N.attn.qkv.weight and "
                         f"patch_embed.proj.weight, got e.g. {sorted(state_dict)[:6]}")
    proj = state_dict["patch_embed.proj.weight"]
    depth = 1 + max(int(_QKV.fullmatch(key).group(1)) for key in state_dict if _QKV.fullmatch(key))
    return {"embed_dim": int(proj.shape[0]), "depth": depth, "patch_size": int(proj.shape[-1])}


def check_same_shape(source: Dict[str, int], model: nn.Module, source_heads: Optional[int]) -> None:
    """Refuse a ViT (``vit_architecture``, and its heads when known) of another width, depth, patch
    size or heads than the AnchorFormer ``model``, naming each mismatch (ValueError)."""
    target = {"embed_dim": int(model.embed_dim), "depth": len(model.blocks),
              "patch_size": int(model.patch_embed.proj.weight.shape[-1])}
    wrong = [f"{key} {source[key]} (source) vs {target[key]} (target)" for key in target if source[key] != target[key]]
    heads = model.blocks[0].attn.num_heads
    if source_heads is not None and source_heads != heads:
        wrong.append(f"num_heads {source_heads} (source) vs {heads} (target)")
    if wrong:
        raise ValueError(f"the ViT does not fit {type(model).__name__}: {'; '.join(wrong)}. Convert to an "
                         "AnchorFormer of the source's width, depth, patch size and heads (pass them as model "
                         "arguments, e.g. --model-args '{\"embed_dim\": ..., \"depth\": ..., \"num_heads\": ...}')")


def _logit_error(w_q: torch.Tensor, w_k: torch.Tensor, w: torch.Tensor) -> float:
    """``||Wq^T Wk - W^T W||_F / ||Wq^T Wk||_F`` from dh x dh products only (the D x D matrices of a
    base model, formed per head, made its conversion take minutes):
    ``||Wq^T Wk||^2 = <Wq Wq^T, Wk Wk^T>``, ``<Wq^T Wk, W^T W> = <Wq W^T, Wk W^T>``, ``||W^T W||^2 = ||W W^T||^2``."""
    w_q, w_k, w = w_q.double(), w_k.double(), w.double()
    logits = ((w_q @ w_q.T) * (w_k @ w_k.T)).sum()
    cross = ((w_q @ w.T) * (w_k @ w.T)).sum()
    kept = (w @ w.T).pow(2).sum()
    return float((logits - 2 * cross + kept).clamp(min=0).sqrt() / logits.clamp(min=1e-60).sqrt())


def _sym_psd_factor(w_q: torch.Tensor, w_k: torch.Tensor) -> torch.Tensor:
    """``W`` (dh, D) with ``W^T W`` the best rank-dh PSD approximation of ``(Wq^T Wk + Wk^T Wq) / 2``.

    The symmetric part is ``B^T C B`` with ``B = [Wq; Wk]`` and ``C = [[0, I], [I, 0]] / 2``; with
    ``B^T = Q R`` its eigen-pairs are those of the small ``R C R^T`` (2dh x 2dh), rotated by Q, so
    no D x D eigenproblem is solved."""
    dh = w_q.shape[0]
    q_mat, r_mat = torch.linalg.qr(torch.cat([w_q, w_k]).double().T)   # (D, r), (r, 2dh)
    swap = torch.zeros(2 * dh, 2 * dh, dtype=torch.float64)
    swap[:dh, dh:] = swap[dh:, :dh] = 0.5 * torch.eye(dh, dtype=torch.float64)
    values, vectors = torch.linalg.eigh(r_mat @ swap @ r_mat.T)      # ascending
    keep = min(dh, values.numel())
    values, vectors = values[-keep:].clamp(min=0), vectors[:, -keep:]
    factor = torch.zeros(dh, w_q.shape[1], dtype=torch.float64)
    factor[:keep] = values.sqrt()[:, None] * (q_mat @ vectors).T
    return factor.to(w_q.dtype)


def merge_qk(w_q: torch.Tensor, w_k: torch.Tensor, num_heads: int, rule: str = DEFAULT_QK_RULE
             ) -> Tuple[torch.Tensor, float]:
    """The ``qk`` weights (D, D) of anchor attention from a ViT's query and key weights (each (D, D),
    heads stacked by rows as in timm's ``qkv``), head by head.

    Args:
        w_q, w_k: the ViT's query and key weights.
        num_heads: heads h (head dim D / h).
        rule: one of :data:`QK_RULES`.

    Returns:
        The merged weights and the relative error of the logit form they express,
        ``||Wq^T Wk - Wqk^T Wqk||_F / ||Wq^T Wk||_F`` averaged over heads.
    """
    if rule not in QK_RULES:
        raise ValueError(f"qk rule {rule!r} is not one of {list(QK_RULES)}")
    dh = w_q.shape[0] // num_heads
    merged, errors = [], []
    for head in range(num_heads):
        q, k = w_q[head * dh:(head + 1) * dh], w_k[head * dh:(head + 1) * dh]
        factor = _sym_psd_factor(q, k) if rule == "sym" else {"mean": (q + k) / 2, "q": q, "k": k}[rule]
        merged.append(factor)
        errors.append(_logit_error(q, k, factor))
    return torch.cat(merged), sum(errors) / len(errors)


def convert_vit_state_dict(vit: Mapping[str, torch.Tensor], model: nn.Module, qk_rule: str = DEFAULT_QK_RULE,
                           source_heads: Optional[int] = None) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """An AnchorFormer state dict for ``model`` from a timm ViT/DeiT state dict of the same shape.

    Args:
        vit: the ViT's tensors (timm names: ``blocks.{i}.attn.qkv.weight``, ``cls_token``, ...).
        model: the AnchorFormer to fill (its anchors, which the ViT lacks, are taken from it as
            they are: initialise them from data with :func:`init_from_data`).
        qk_rule: how q and k become qk, one of :data:`QK_RULES`.
        source_heads: the ViT's heads, when known (they are not visible in its tensors).

    Returns:
        The state dict (every key of ``model``) and the conversion report (plain data): tensors
        carried over, folded and merged, the qk rule and its per-layer relative error.

    Raises:
        ValueError: for a source that is no ViT, or of another width, depth, patch size or heads;
            for tensors the target lacks or holds in another shape (a classifier of another class
            count is kept as the source's; fine-tuning re-initialises it).
    """
    architecture = vit_architecture(vit)
    check_same_shape(architecture, model, source_heads)
    target = model.state_dict()
    out: Dict[str, torch.Tensor] = {}
    carried, folded, errors = [], [], []
    num_heads, dim = model.blocks[0].attn.num_heads, int(model.embed_dim)
    for i in range(len(model.blocks)):
        prefix = f"blocks.{i}.attn."
        if f"{prefix}q_norm.weight" in vit:
            raise ValueError(f"the ViT normalises q and k ({prefix}q_norm); anchor attention has no qk norm, "
                             "so this source cannot be converted")
        w_q, w_k, w_v = vit[f"{prefix}qkv.weight"].float().split(dim)
        qk, error = merge_qk(w_q, w_k, num_heads, qk_rule)
        out[f"{prefix}qk_v.weight"] = torch.cat([qk, w_v])
        errors.append(round(error, 4))
        proj_bias = vit[f"{prefix}proj.bias"].float()
        if f"{prefix}qkv.bias" in vit:
            v_bias = vit[f"{prefix}qkv.bias"].float()[2 * dim:]
            proj_bias = proj_bias + vit[f"{prefix}proj.weight"].float() @ v_bias
            folded.append(f"{prefix}qkv.bias[v] -> {prefix}proj.bias")
        out[f"{prefix}proj.weight"] = vit[f"{prefix}proj.weight"].float()
        out[f"{prefix}proj.bias"] = proj_bias
        out[f"{prefix}anchors.weight"] = target[f"{prefix}anchors.weight"].clone()
    unexpected = sorted(key for key in vit if ".attn.qkv." not in key and key not in out and key not in target)
    if unexpected:
        raise ValueError(f"the ViT has {unexpected}, which {type(model).__name__} lacks; convert to the variant "
                         "that has them (a distilled source needs a *_distilled_* AnchorFormer)")
    missing = sorted(key for key in target if key not in out and key not in vit)
    if missing:
        raise ValueError(f"the ViT lacks {missing}, which {type(model).__name__} needs; convert to the variant "
                         "without them (a plain source converts to a non-distilled AnchorFormer)")
    for key, value in vit.items():
        if ".attn.qkv." in key or key in out:
            continue
        if value.shape != target[key].shape and not key.startswith(("head.", "head_dist.")):
            raise ValueError(f"{key}: the ViT's {tuple(value.shape)} vs the target's {tuple(target[key].shape)}; "
                             "convert at the source's image size (pos_embed) and layout")
        out[key] = value.float()
        carried.append(key)
    report = {
        "source_architecture": dict(architecture, num_heads=source_heads),
        "carried_over": carried + [f"blocks.{i}.attn.qkv.weight[v] -> blocks.{i}.attn.qk_v.weight[v]"
                                   for i in range(len(model.blocks))],
        "folded": folded,
        "dropped": [f"blocks.{i}.attn.qkv.bias[q,k]" for i in range(len(model.blocks))
                    if f"blocks.{i}.attn.qkv.bias" in vit],
        "qk_rule": qk_rule,
        "qk_relative_error": errors,
        "anchors": "not initialised from data (the target's fresh init)",
    }
    return out, report


def _sq_distances(points: torch.Tensor, norms: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(N, k) squared distances from the points' squared norms (N, 1) and one matrix product
    (``torch.cdist`` is several times slower on CPU)."""
    return (norms - 2 * points @ centroids.T + centroids.pow(2).sum(1)).clamp(min=0)


def kmeans(points: torch.Tensor, k: int, iters: int = 25, seed: int = 0) -> Tuple[torch.Tensor, float]:
    """Lloyd's k-means with k-means++ seeding, deterministic for a given ``seed``.

    Args:
        points: (N, d) vectors, N >= k.
        k: clusters.
        iters: Lloyd iterations (stops early when no assignment changes).
        seed: seed of the k-means++ draws.

    Returns:
        The centroids (k, d) and the mean squared distance of the points to their centroid.
    """
    if points.shape[0] < k:
        raise ValueError(f"k-means of {points.shape[0]} vectors into {k} anchors; give more images")
    generator = torch.Generator().manual_seed(seed)
    points = points.float()
    norms = points.pow(2).sum(1, keepdim=True)
    centroids = points[torch.randint(points.shape[0], (1,), generator=generator)]
    nearest = _sq_distances(points, norms, centroids).squeeze(1)
    for _ in range(1, k):
        pick = torch.multinomial(nearest + 1e-12, 1, generator=generator)
        centroids = torch.cat([centroids, points[pick]])
        nearest = torch.minimum(nearest, _sq_distances(points, norms, points[pick]).squeeze(1))
    assign = None
    for _ in range(iters):
        distances = _sq_distances(points, norms, centroids)
        new_assign = distances.argmin(1)
        if assign is not None and torch.equal(new_assign, assign):
            break
        assign = new_assign
        sums = torch.zeros_like(centroids).index_add_(0, assign, points)
        counts = torch.bincount(assign, minlength=k).to(points.dtype)
        empty = counts == 0
        centroids = torch.where(empty[:, None], centroids, sums / counts.clamp(min=1)[:, None])
        if empty.any():  # an empty cluster restarts at the points farthest from their centroid
            far = distances.gather(1, assign[:, None]).squeeze(1).topk(int(empty.sum())).indices
            centroids[empty] = points[far]
    inertia = float(_sq_distances(points, norms, centroids).min(1).values.mean())
    return centroids, inertia


def _vit_attention(x: torch.Tensor, vit: Mapping[str, torch.Tensor], prefix: str, num_heads: int) -> torch.Tensor:
    """The ViT's attention layer ``prefix`` (softmax attention with its qkv and proj) on normalised tokens."""
    batch, tokens, dim = x.shape
    qkv = F.linear(x, vit[f"{prefix}qkv.weight"].float(), _float_or_none(vit.get(f"{prefix}qkv.bias")))
    q, k, v = qkv.reshape(batch, tokens, 3, num_heads, dim // num_heads).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, dim)
    return F.linear(out, vit[f"{prefix}proj.weight"].float(), _float_or_none(vit.get(f"{prefix}proj.bias")))


def _in_chunks(function: Any, x: torch.Tensor, size: int = 256) -> torch.Tensor:
    """``function(x)`` a few images at a time (a base model's MLP on 2,000 images would need 5 GB at once)."""
    return torch.cat([function(chunk) for chunk in x.split(size)])


def _float_or_none(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if tensor is None else tensor.float()


def _fit_attention(attn: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, steps: int, lr: float,
                   batch_size: int, generator: torch.Generator) -> Tuple[float, float]:
    """Adam on the layer's qk weights and anchors (v and proj stay as carried over) to bring its
    output on ``inputs`` close to the ViT's ``targets``; returns the mean squared error before and after."""
    dim = attn.num_heads * attn.head_dim
    params = [attn.qk_v.weight, attn.anchors.weight]
    optimizer = torch.optim.Adam(params, lr=lr)

    def error(index: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(attn(inputs[index]), targets[index])

    probe = torch.arange(min(len(inputs), batch_size))
    with torch.enable_grad():
        before = float(error(probe).detach())
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=False)
            error(torch.randint(len(inputs), (batch_size,), generator=generator)).backward()
            attn.qk_v.weight.grad[dim:] = 0  # Adam moves nothing whose gradient is always zero: v stays
            optimizer.step()
    for param in attn.parameters():
        param.grad = None
    return before, float(error(probe))


@torch.no_grad()
def init_from_data(model: nn.Module, batches: Iterable[torch.Tensor], vit: Optional[Mapping[str, torch.Tensor]] = None,
                   fit_steps: int = ATTENTION_FIT_STEPS, max_vectors: int = 200_000, iters: int = 25, seed: int = 0,
                   lr: float = 1e-3, fit_tokens: int = ATTENTION_FIT_TOKENS) -> Dict[str, Any]:
    """Initialise every layer's anchors from images, and (given the ViT) fit its qk and anchors to
    the ViT's attention.

    Layer by layer: the images' tokens are run through the embeddings and the converted blocks before
    the layer (already initialised), normalised by the layer's ``norm1``; then
    1. k-means: every head's dh-vector of the ``qk`` projection of every token is one point (the
       anchors are shared by the heads); ``max_vectors`` of them, drawn with ``seed``, are clustered
       into the layer's m anchors;
    2. attention fit (``vit`` given, ``fit_steps`` > 0): Adam on the layer's qk weights and anchors,
       starting there, lowers the mean squared difference between the layer's output and the ViT's
       attention output on the same normalised tokens (v and the output projection stay as carried
       over). Anchor attention cannot express the ViT's attention (it is symmetric, the ViT's is not),
       so this finds the closest it can on the user's images; on the digits it doubled the accuracy
       right after conversion and added 2 points after fine-tuning (docs/training.md).

    Args:
        model: an AnchorFormer converted from ``vit`` (:func:`convert_vit_state_dict`), changed in place.
        batches: image tensors (B, 3, H, W) at the model's input size and normalisation.
        vit: the ViT's state dict, for the attention fit; None: k-means only.
        fit_steps: Adam steps per layer (0: k-means only).
        max_vectors: most points clustered per layer.
        iters: Lloyd iterations per layer.
        seed: seed of the subsampling, k-means++ and the fit's batches.
        lr: the fit's learning rate.
        fit_tokens: tokens per fit step (whole images: at least one).

    Returns:
        The report (plain data): images, vectors per layer, mean squared distance to the anchors and
        the fit's error before/after per layer, wall and CPU seconds (on a shared machine they differ).
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    was_training = model.training
    model.eval()
    tokens = torch.cat([model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images.float()))))
                        for images in batches] or [torch.empty(0)])
    if not len(tokens):
        raise ValueError("no images to initialise the anchors from")
    generator = torch.Generator().manual_seed(seed)
    fit = vit is not None and fit_steps > 0
    batch_size = max(1, fit_tokens // tokens.shape[1])
    inertia, fit_before, fit_after, clustered = [], [], [], 0
    for i, block in enumerate(model.blocks):
        attn = block.attn
        normed = block.norm1(tokens)
        vectors = (normed @ attn.qk_v.weight[: attn.num_heads * attn.head_dim].T).reshape(-1, attn.head_dim)
        if vectors.shape[0] > max_vectors:
            vectors = vectors[torch.randperm(vectors.shape[0], generator=generator)[:max_vectors]]
        clustered = vectors.shape[0]
        centroids, error = kmeans(vectors, attn.num_anchors, iters, seed + i)
        attn.anchors.weight.copy_(centroids.to(attn.anchors.weight.dtype))
        inertia.append(round(error, 4))
        if fit:
            target = _in_chunks(lambda x: _vit_attention(x, vit, f"blocks.{i}.attn.", attn.num_heads), normed)
            before, after = _fit_attention(attn, normed, target, fit_steps, lr, batch_size, generator)
            fit_before.append(float(f"{before:.4g}"))
            fit_after.append(float(f"{after:.4g}"))
        tokens = _in_chunks(block, tokens)
    model.train(was_training)
    return {"method": "kmeans of qk vectors after norm1, per layer, through the converted layers"
                      + (", then qk and anchors fitted to the ViT's attention output" if fit else ""),
            "images": len(tokens), "vectors_per_layer": clustered, "kmeans_iters": iters, "seed": seed,
            "mean_sq_distance": inertia,
            "attention_fit": {"steps": fit_steps, "lr": lr, "batch_images": batch_size, "mse_before": fit_before,
                              "mse_after": fit_after} if fit else None,
            "seconds": round(time.perf_counter() - start, 2), "cpu_seconds": round(time.process_time() - cpu_start, 2)}
