"""Fast paths for anchor attention: fused Triton kernels and the dispatcher that picks them.

``anchor_mix_fast`` has ``anchor_mix``'s signature and maths; importing this package does not
import triton (the kernels load on first use)."""
from anchorformer.kernels.dispatch import (BACKENDS, anchor_mix_fast, backend_calls, requested_backend, select_backend,
                                          set_backend)

__all__ = ["BACKENDS", "anchor_mix_fast", "backend_calls", "requested_backend", "select_backend", "set_backend"]
