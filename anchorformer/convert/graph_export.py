"""Graph exports of a classifier for serving without this package: ONNX (dynamic batch, opset >= 17,
run here by onnxruntime) and torch.export programs (``.pt2``, ``torch.export.load(path).module()``).
Each export is staged, run on real images at two batch sizes and compared with the eager model, and
moved into place only when the largest logit difference is within the tolerance. Under
torch.export the anchor mix is the PyTorch reference (standard ops only, see
``anchorformer.kernels.anchor_mix_fast``)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from anchorformer.convert.staging import staged_outputs

__all__ = ["GraphFormat", "FORMATS", "MIN_OPSET", "GraphExport", "export_graph"]

logger = logging.getLogger(__name__)

GraphFormat = Literal["onnx", "pt2"]
FORMATS: tuple[GraphFormat, ...] = ("onnx", "pt2")
MIN_OPSET = 17


@dataclass(frozen=True)
class GraphExport:
    """A written graph export and how closely it reproduces the eager model."""

    path: Path
    format: GraphFormat
    max_difference: float
    """Largest |logit difference| against the eager model over the parity batches."""
    batch_sizes: tuple[int, ...]
    """Batch sizes the export was run at (it was traced at another one: the batch is dynamic)."""


@torch.no_grad()
def export_graph(model: nn.Module, kind: GraphFormat, output: str | Path, images: torch.Tensor,
                 opset: int = 18, tolerance: float = 1e-4) -> GraphExport:
    """Export ``model`` (fp32, CPU) and check it.

    Args:
        model: the classifier (put in eval mode here).
        kind: ``onnx`` or ``pt2``.
        output: the file to write (``.onnx`` / ``.pt2``).
        images: preprocessed real images (N, 3, H, W), N >= 2: the export is traced at batch 2 and
            compared with the eager model on all N at once and on the first one alone.
        opset: ONNX opset (>= 17).
        tolerance: the largest |logit difference| accepted.

    Returns:
        The export and its measured difference.

    Raises:
        ValueError: for a bad format, opset or image batch, or an export outside the tolerance
            (nothing is written then).
    """
    if kind not in FORMATS:
        raise ValueError(f"unknown export format {kind!r}; choose from {list(FORMATS)}")
    if kind == "onnx" and opset < MIN_OPSET:
        raise ValueError(f"--opset {opset} is too old: the exporter needs opset >= {MIN_OPSET}")
    if images.ndim != 4 or len(images) < 2:
        raise ValueError(f"parity needs a batch of at least 2 images (N, 3, H, W), got shape {tuple(images.shape)}")
    model = model.eval().float().cpu()
    images = images.float().cpu()
    batches = (images, images[:1])
    dynamic_batch = ({0: torch.export.Dim("batch", min=1, max=4096)},)
    output = Path(output)
    with staged_outputs([output]) as (staged,):
        if kind == "onnx":
            torch.onnx.export(model, (images[:2],), str(staged), dynamo=True, opset_version=opset,
                              dynamic_shapes=dynamic_batch, input_names=["images"], output_names=["logits"],
                              external_data=False, verbose=False)
            run = _onnxruntime_runner(staged)
        else:
            torch.export.save(torch.export.export(model, (images[:2],), dynamic_shapes=dynamic_batch), str(staged))
            run = torch.export.load(str(staged)).module()
        difference = max(float((run(batch) - model(batch)).abs().max()) for batch in batches)
        if not difference <= tolerance:
            raise ValueError(f"the {kind} export differs from the eager model by up to {difference:.3g} in the "
                             f"logits (tolerance {tolerance:g}); nothing was written")
    logger.info("wrote %s (%s, max |logit difference| %.3g)", output, kind, difference)
    return GraphExport(output, kind, difference, tuple(len(batch) for batch in batches))


def _onnxruntime_runner(path: Path):
    """The ONNX model as a tensor -> tensor callable on onnxruntime's CPU provider."""
    import onnxruntime  # imported here: only ONNX exports need it (pip install -e ".[export]")

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda batch: torch.from_numpy(session.run(None, {name: batch.numpy()})[0])
