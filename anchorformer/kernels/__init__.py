"""Anchor attention's mixing op: the PyTorch reference ``anchor_mix`` (the maths), the fused
Triton kernels, and the dispatcher ``anchor_mix_fast`` that picks between them.

``anchor_mix_fast`` has ``anchor_mix``'s signature and maths; importing this package does not
import triton (the kernels load on first use)."""
from anchorformer.kernels.dispatch import (BACKENDS, anchor_mix_fast, backend_calls, requested_backend, select_backend,
                                          set_backend)
from anchorformer.kernels.reference import anchor_mix

__all__ = ["BACKENDS", "anchor_mix", "anchor_mix_fast", "backend_calls", "requested_backend", "select_backend",
           "set_backend"]
