"""Choose how anchor attention mixes its tokens: the fused Triton kernels, torch.compile of the
PyTorch path, two scaled-dot-product attention calls, or the PyTorch path itself
(``anchorformer.kernels.reference.anchor_mix``); ``kernels.backends`` runs each of them.

``auto`` (the default) measures: the first call of each shape, dtype, device and train/eval times
the backends that can run there and keeps the fastest for the rest of the process
(``kernels.autotune``, which also holds the decisions as a table to log, record and pin). Force a
backend with :func:`set_backend` or the environment variable ``ANCHORFORMER_ANCHOR_MIX``
(``auto``, ``triton``, ``compile``, ``sdpa``, ``torch``); the function wins over the variable, and
a forced backend that cannot run the inputs is refused with the reason
(``kernels.unavailable_reason`` asks the same before any work).

Why measure rather than a rule (docs/benchmarks.md has every table):
- No rule held across devices and shapes. On an H200 the Triton kernels beat eager PyTorch by
  1.37x / 1.07x / 1.54x at n = 197 / 785 / 4097 (B=32, h=12, ``anchor-mix-cuda``) while the mixing
  op stayed launch-bound at n=197, where one FlashAttention / cuDNN call per direction (``sdpa``) may
  win; on the CPU, eager PyTorch beat torch.compile at n=197 (6.1 vs 7.0 ms) and lost at 785
  (27.4 vs 26.7 ms) (``anchor-mix-cpu``), and the two attention calls took 2.5-3x its time on the
  shared build machine (B=8, h=3, n=197 and 785, fp32, fwd+bwd, 1 thread, a first look under load).
  Timing a few calls costs at most 2 s per key, once per process.
- ``compile`` is never auto's pick: compiling costs 5-34 s per new shape on the CPU and about 15 s on
  an H200, more than a key's budget, and a compiled model (``train.compile``) fuses the PyTorch path
  into its own graph anyway.
- Inside a graph that torch.compile traces nothing is timed: ``auto`` puts the kernels in as custom
  ops for CUDA tensors (AnchorFormer-B at 224 px: 3409 img/s against 3364 img/s with the compiler
  fusing the PyTorch path, ``model-224-compiled*-cuda``) and lets the compiler trace the PyTorch path
  elsewhere. Under torch.export (ONNX, .pt2) the graph holds standard ops only: the PyTorch path, or
  the two attention calls where ``sdpa`` is forced.
"""
import collections
import os
from typing import Optional

import torch

from anchorformer.kernels import autotune, backends, triton_ops
from anchorformer.kernels.reference import anchor_mix
from anchorformer.kernels.sdpa import anchor_mix_sdpa

__all__ = ["BACKENDS", "ENV_VAR", "set_backend", "requested_backend", "select_backend", "anchor_mix_fast", "backend_calls"]

BACKENDS = ("auto", *backends.NAMES)
ENV_VAR = "ANCHORFORMER_ANCHOR_MIX"
_forced_backend: Optional[str] = None
_calls_per_backend: collections.Counter = collections.Counter()


def _check_backend(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown anchor-mix backend {name!r} from {source}; choose from {list(BACKENDS)}")
    return name


def set_backend(name: Optional[str]) -> None:
    """Force the backend of :func:`anchor_mix_fast` for this process; None returns to the
    environment variable (or ``auto``).

    Args:
        name: one of ``BACKENDS`` or None.
    """
    global _forced_backend
    _forced_backend = None if name is None else _check_backend(name, "set_backend()")


def requested_backend() -> str:
    """The backend asked for: :func:`set_backend`'s, else ``$ANCHORFORMER_ANCHOR_MIX``, else ``auto``."""
    if _forced_backend is not None:
        return _forced_backend
    return _check_backend(os.environ.get(ENV_VAR, "auto"), f"${ENV_VAR}")


def backend_calls() -> dict[str, int]:
    """How many times :func:`anchor_mix_fast` ran each backend in this process (benchmarks and
    logs use it to show which path a model really took)."""
    return dict(_calls_per_backend)


def select_backend(qk: torch.Tensor, anchors: torch.Tensor, v: torch.Tensor) -> str:
    """The backend that :func:`anchor_mix_fast` uses for these inputs (``triton``, ``compile``,
    ``sdpa`` or ``torch``); ``auto`` measures the inputs' key the first time it meets it.

    Args:
        qk: (B, h, n, dh) tokens; anchors: (m, dh); v: (B, h, n, dh).

    Returns:
        The backend name. A forced backend that cannot run these inputs raises ValueError naming
        the reason.
    """
    requested = requested_backend()
    if requested == "auto":
        return autotune.choose(qk, anchors, v)
    reason = backends.inputs_reason(requested, qk.device, qk, anchors, v)
    if reason is not None:
        raise ValueError(f"anchor-mix backend {requested!r} cannot run: {reason}; set {ENV_VAR}=auto to let the "
                         "dispatcher measure and choose")
    return requested


def _traced(qk: torch.Tensor, anchors: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """The anchor mix inside a graph being traced, where nothing is timed (see the module docstring)."""
    requested = requested_backend()
    if torch.compiler.is_exporting():  # standard ops only, so that the exported graph runs anywhere
        return anchor_mix_sdpa(qk, anchors, v, scale) if requested == "sdpa" else anchor_mix(qk, anchors, v, scale)
    choice = autotune.untimed_choice(qk, anchors, v) if requested == "auto" else requested
    if choice == "triton" and triton_ops.unsupported_reason(qk.device, qk, anchors, v) is None:
        return triton_ops.custom_op_forward(qk, anchors, v, scale)  # one opaque node in the graph
    if choice == "sdpa":
        return anchor_mix_sdpa(qk, anchors, v, scale)
    return anchor_mix(qk, anchors, v, scale)  # the compiler traces and fuses it


@torch.jit.unused
def _dispatched(qk: torch.Tensor, anchors: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    if torch.compiler.is_compiling():  # also true under torch.export
        return _traced(qk, anchors, v, scale)
    backend = select_backend(qk, anchors, v)
    _calls_per_backend[backend] += 1
    return backends.run(backend, qk, anchors, v, scale)


def anchor_mix_fast(qk: torch.Tensor, anchors: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """:func:`~anchorformer.kernels.reference.anchor_mix` (same arguments, same result) through the
    backend :func:`select_backend` picks. Inside a graph that torch.compile traces or torch.export
    exports, the fixed choices of the module docstring; TorchScript (a scripted model, or the FX
    graph of one that calls this function) compiles the PyTorch path.
    """
    if torch.jit.is_scripting():
        return anchor_mix(qk, anchors, v, scale)
    return _dispatched(qk, anchors, v, scale)
