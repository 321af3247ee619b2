"""Anchor attention's mixing op: the PyTorch reference ``anchor_mix`` (the maths), the fused
Triton kernels, the two-attention-call form ``anchor_mix_sdpa``, and the dispatcher
``anchor_mix_fast`` that picks between them (``auto``: measured once per shape, ``autotune``).

``anchor_mix_fast`` has ``anchor_mix``'s signature and maths; importing this package does not
import triton (the kernels load on first use)."""
from anchorformer.kernels import autotune
from anchorformer.kernels.backends import unavailable_reason
from anchorformer.kernels.dispatch import (BACKENDS, anchor_mix_fast, backend_calls, requested_backend, select_backend,
                                          set_backend)
from anchorformer.kernels.reference import anchor_mix
from anchorformer.kernels.sdpa import anchor_mix_sdpa

__all__ = ["BACKENDS", "anchor_mix", "anchor_mix_fast", "anchor_mix_sdpa", "autotune", "backend_calls",
           "requested_backend", "select_backend", "set_backend", "unavailable_reason"]
