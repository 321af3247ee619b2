"""Benchmarks behind ``tools/benchmark.py``: one module per benchmark, each with
``add_arguments(parser)`` and ``run(args) -> str`` (a markdown section for docs/benchmarks.md)."""
import importlib
from types import ModuleType

BENCHMARKS = {
    "attention": "anchorformer.benchmarks.attention",
    "loader": "anchorformer.benchmarks.loader",
    "anchor-mix": "anchorformer.benchmarks.anchor_mix",
    "model": "anchorformer.benchmarks.model",
    "backbone": "anchorformer.benchmarks.backbone",
    "quality": "anchorformer.benchmarks.quality",
    "train": "anchorformer.benchmarks.train",
    "profile": "anchorformer.benchmarks.profile",
}


def load(name: str) -> ModuleType:
    """Import the module of benchmark ``name``; an unknown name lists the valid ones."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {sorted(BENCHMARKS)}")
    return importlib.import_module(BENCHMARKS[name])
