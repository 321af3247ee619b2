"""``auto``: the anchor-mix backend measured once per call shape, the way cudnn.benchmark and
Triton's autotuner decide.

The first time the dispatcher meets a key -- (B, h, n, dh, m), the dtypes of the tokens and of the
anchors, the device type, and train (grad enabled and an input requiring grad: timed forward +
backward) or eval (forward) -- it times every candidate that can run there on the call's own
inputs (detached: nothing reaches the model's graph, no random number is drawn), keeps the fastest
and never measures that key again in the process. The candidates take turns, round after round,
and each keeps its least time (load only ever adds time); the rounds stop at ``BUDGET_S`` per key.
A backend's first call in the process (Triton compiling its kernels) may add to that, once.

Candidates: ``triton`` where it can run (CUDA, or TRITON_INTERPRET=1), ``sdpa`` and ``torch``.
``compile`` is not one: it compiles per new shape, 5-34 s on the CPU and about 15 s on an H200
(docs/benchmarks.md), far over a key's budget, and where it pays -- a compiled model,
``train.compile`` -- the compiler fuses the PyTorch path into the model's graph anyway. It remains a
backend to force.

Nothing is timed where timing would be wrong or harmful: for meta tensors, while torch.jit traces or
a CUDA graph captures (those calls take the key's decision if there is one), and under a dispatch
mode (FlopCounterMode, fake tensors). Without a decision, and always under a dispatch mode, a call
takes the fixed rule of :func:`untimed_choice`, which is also what a graph that torch.compile
traces takes: so FlopCounterMode counts the maths' FLOPs whatever auto decided.

The decisions are plain data (:func:`decisions`): one JSON-able dict per key with each candidate's
milliseconds and the choice. :func:`pin` sets decisions from such a table (rank 0's, broadcast by
the engine; a checkpoint's, on resume), so that every process takes the same path; :func:`measure`
decides a key from shapes alone, before any real call.
"""
import logging
import time
from typing import Iterable, Mapping, Optional, Sequence

import torch

from anchorformer.kernels import backends

__all__ = ["CANDIDATES", "BUDGET_S", "choose", "untimed_choice", "measure", "decisions", "pin", "reset",
           "format_table"]

logger = logging.getLogger(__name__)

CANDIDATES = ("triton", "sdpa", "torch")
BUDGET_S = 2.0
"""Seconds of timed rounds per key at most."""
_ROUNDS = 10  # timed calls per candidate at most: a stable least time, and little time on tiny shapes
_KEY_FIELDS = ("batch", "heads", "tokens", "head_dim", "anchors", "dtype", "anchor_dtype", "device", "train")
_DTYPE_FIELDS = ("dtype", "anchor_dtype")

# key: (B, h, n, dh, m, dtype, anchor dtype, device type, train), with torch dtypes: cheap to build per call
_choices: dict[tuple, str] = {}
_records: dict[tuple, dict] = {}


def _key(qk: torch.Tensor, anchors: torch.Tensor, v: torch.Tensor) -> tuple:
    batch, heads, tokens, head_dim = qk.shape
    train = torch.is_grad_enabled() and (qk.requires_grad or anchors.requires_grad or v.requires_grad)
    return batch, heads, tokens, head_dim, anchors.shape[0], qk.dtype, anchors.dtype, qk.device.type, train


def _key_fields(key: tuple) -> dict:
    """The key as JSON-able fields (dtypes by name)."""
    fields = dict(zip(_KEY_FIELDS, key))
    for name in _DTYPE_FIELDS:
        fields[name] = str(fields[name]).removeprefix("torch.")
    return fields


def _describe(record: Mapping) -> str:
    anchor_dtype = "" if record["anchor_dtype"] == record["dtype"] else f" (anchors {record['anchor_dtype']})"
    return (f"B={record['batch']} h={record['heads']} n={record['tokens']} dh={record['head_dim']} "
            f"m={record['anchors']} {record['dtype']}{anchor_dtype} {record['device']} "
            f"{'train' if record['train'] else 'eval'}")


def untimed_choice(qk: torch.Tensor, anchors: torch.Tensor, v: torch.Tensor) -> str:
    """The fixed rule where nothing is timed: ``triton`` for CUDA tensors the kernels take, else ``torch``."""
    if qk.is_cuda and backends.inputs_reason("triton", qk.device, qk, anchors, v) is None:
        return "triton"
    return "torch"


def _may_time(qk: torch.Tensor) -> bool:
    if qk.device.type == "meta" or torch.jit.is_tracing():
        return False
    return not (qk.is_cuda and torch.cuda.is_current_stream_capturing())


def choose(qk: torch.Tensor, anchors: torch.Tensor, v: torch.Tensor) -> str:
    """``auto``'s backend for these inputs: the key's decision, measured now if it has none.

    Args:
        qk: (B, h, n, dh) tokens; anchors: (m, dh); v: (B, h, n, dh).
    """
    if torch._C._len_torch_dispatch_stack() > 0:
        # FlopCounterMode, fake tensors: the fixed rule, whose FLOPs are the maths' (the kernels'
        # custom op carries them; the CPU's fused attention has no FLOP formula)
        return untimed_choice(qk, anchors, v)
    key = _key(qk, anchors, v)
    choice = _choices.get(key)
    if choice is not None:
        return choice
    if not _may_time(qk):
        return untimed_choice(qk, anchors, v)
    return _decide(key, qk, anchors, v)["choice"]


def _unpacked(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _time(candidates: Sequence[str], qk: torch.Tensor, anchors: torch.Tensor, v: torch.Tensor,
          train: bool) -> dict[str, Optional[float]]:
    """Least milliseconds per call of each candidate (None where it failed), forward + backward
    when ``train``; one warm-up call each, then turns until ``_ROUNDS`` or the budget."""
    leaves = [t.detach().requires_grad_(train and t.requires_grad) for t in (qk, anchors, v)]
    wanted = [t for t in leaves if t.requires_grad]
    scale = qk.shape[-1] ** -0.5
    times: dict[str, list[float]] = {name: [] for name in candidates}
    failed: set[str] = set()

    def timed_call(name: str) -> Optional[float]:
        try:
            if qk.is_cuda:
                torch.cuda.synchronize(qk.device)
            start = time.perf_counter()
            out = backends.run(name, *leaves, scale)
            if train:
                torch.autograd.grad(out, wanted, torch.ones_like(out))
            if qk.is_cuda:
                torch.cuda.synchronize(qk.device)
            return time.perf_counter() - start
        except Exception as error:  # e.g. out of memory: this backend is left out, training goes on
            logger.warning("anchor-mix backend %s failed while auto timed it, left out: %s", name, error)
            failed.add(name)
            return None

    deadline = time.perf_counter() + BUDGET_S
    # own saved-tensor hooks: inside an activation-checkpointed block, the checkpoint's hooks must
    # neither see these tensors nor recompute the block to unpack them
    with torch.autograd.graph.saved_tensors_hooks(_unpacked, _unpacked), torch.set_grad_enabled(train):
        for name in candidates:  # warm-up: kernels compiled, caches filled
            timed_call(name)
        for _ in range(_ROUNDS):
            for name in candidates:
                if name not in failed:
                    seconds = timed_call(name)
                    if seconds is not None:
                        times[name].append(seconds)
            if time.perf_counter() > deadline:
                break
    return {name: round(min(times[name]) * 1e3, 4) if times[name] else None for name in candidates}


def _decide(key: tuple, qk: torch.Tensor, anchors: torch.Tensor, v: torch.Tensor) -> dict:
    """Time the candidates that can run these inputs, record the fastest for ``key``; the record."""
    candidates = [name for name in CANDIDATES if backends.inputs_reason(name, qk.device, qk, anchors, v) is None]
    fields = _key_fields(key)
    start = time.perf_counter()
    ms = _time(candidates, qk, anchors, v, train=fields["train"])
    timed = {name: value for name, value in ms.items() if value is not None}
    if not timed:
        raise RuntimeError(f"no anchor-mix backend ran for {_describe(fields)} (see the warnings above)")
    choice = min(timed, key=timed.get)
    record = {**fields, "ms": ms, "choice": choice, "source": "measured"}
    _choices[key], _records[key] = choice, record
    logger.info("anchor-mix auto, %s: %s -> %s (timed in %.2f s)", _describe(record),
                ", ".join(f"{name} {value} ms" for name, value in ms.items()), choice, time.perf_counter() - start)
    return record


def measure(batch: int, heads: int, tokens: int, head_dim: int, num_anchors: int, dtype: torch.dtype,
            device: torch.device | str, train: bool, anchor_dtype: Optional[torch.dtype] = None) -> dict:
    """Decide a key before any real call, on synthetic tensors laid out as the layer makes them (a
    key decided already is not measured again). A 16-bit ``dtype`` with another ``anchor_dtype``
    is timed under autocast, as a model with fp32 weights under bf16 autocast runs.

    Args:
        batch, heads, tokens, head_dim, num_anchors: B, h, n, dh, m of the anchor layers.
        dtype: dtype of the tokens; anchor_dtype: of the anchor weight (default: ``dtype``).
        device: the device to time on (its type is the key's).
        train: forward + backward (training) or forward only.

    Returns:
        The key's decision, as one entry of :func:`decisions`.
    """
    device = torch.device(device)
    anchor_dtype = anchor_dtype or dtype
    key = (batch, heads, tokens, head_dim, num_anchors, dtype, anchor_dtype, device.type, train)
    if key in _records:
        return dict(_records[key])
    generator = torch.Generator(device).manual_seed(0)  # the global random stream stays untouched
    qk_v = torch.randn(batch, tokens, 2, heads, head_dim, generator=generator, device=device, dtype=dtype)
    qk, v = qk_v.requires_grad_(train).permute(2, 0, 3, 1, 4).unbind(0)  # views of one projection
    anchors = torch.randn(num_anchors, head_dim, generator=generator, device=device, dtype=anchor_dtype)
    autocast = anchor_dtype != dtype and dtype in (torch.bfloat16, torch.float16)
    with torch.set_grad_enabled(train), torch.autocast(device.type, dtype=dtype, enabled=autocast):
        return dict(_decide(key, qk, anchors.requires_grad_(train), v))


def decisions() -> list[dict]:
    """Every decision of this process, in the order made: JSON-able dicts with the key's fields
    (batch, heads, tokens, head_dim, anchors, dtype, anchor_dtype, device, train), ``ms`` (each
    candidate's least milliseconds per call, None where it failed; empty when pinned without
    them), ``choice`` and ``source`` (``measured`` or ``pinned``)."""
    return [{**record, "ms": dict(record["ms"])} for record in _records.values()]


def _key_of(entry: Mapping) -> tuple:
    missing = [name for name in (*_KEY_FIELDS, "choice") if name not in entry]
    if missing:
        raise ValueError(f"anchor-mix decision {dict(entry)} lacks {missing}")
    dtypes = {name: getattr(torch, str(entry[name]), None) for name in _DTYPE_FIELDS}
    unknown = [entry[name] for name, dtype in dtypes.items() if not isinstance(dtype, torch.dtype)]
    if unknown:
        raise ValueError(f"anchor-mix decision {_describe(entry)}: unknown dtype {unknown}")
    return tuple(dtypes.get(name, entry[name]) for name in _KEY_FIELDS)


def pin(table: Iterable[Mapping]) -> None:
    """Take these decisions as made (entries as :func:`decisions` gives them; ``ms`` optional):
    their keys are never measured in this process, and a key's earlier decision is replaced. All or
    nothing: a ValueError names the first entry whose choice is unknown or cannot run here.

    Args:
        table: rank 0's decisions broadcast to every rank, or those recorded in a checkpoint.
    """
    pinned = {}
    for entry in table:
        key, choice = _key_of(entry), entry["choice"]
        fields = _key_fields(key)
        if choice not in backends.NAMES:
            raise ValueError(f"anchor-mix decision {_describe(fields)}: unknown backend {choice!r}; "
                             f"choose from {list(backends.NAMES)}")
        _, _, _, head_dim, num_anchors, dtype, anchor_dtype, device, _ = key
        reason = backends.unavailable_reason(choice, device, dtype, head_dim, num_anchors, anchor_dtype)
        if reason is not None:
            raise ValueError(f"anchor-mix decision {_describe(fields)} -> {choice!r} cannot run here: {reason}")
        pinned[key] = {**fields, "ms": dict(entry.get("ms") or {}), "choice": choice, "source": "pinned"}
    for key, record in pinned.items():
        _choices[key], _records[key] = record["choice"], record


def reset() -> None:
    """Forget every decision of this process, measured or pinned: the next call of each key measures
    it again, as in a fresh process (the ``model`` benchmark times auto's first meeting this way)."""
    _choices.clear()
    _records.clear()


def format_table(table: Iterable[Mapping]) -> str:
    """The decisions as text lines, one per key, for a log."""
    lines = []
    for record in table:
        ms = ", ".join(f"{name} {'failed' if value is None else f'{value:.3f} ms'}"
                       for name, value in record["ms"].items())
        lines.append(f"{_describe(record)}: {ms or 'not timed here'} -> {record['choice']} ({record['source']})")
    return "\n".join(lines)
