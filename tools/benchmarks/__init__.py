"""Benchmarks behind ``tools/benchmark.py``: one module per benchmark, each with
``add_arguments(parser)`` and ``run(args) -> str`` (a markdown section for docs/benchmarks.md)."""
import importlib
from types import ModuleType

BENCHMARKS = {
    "attention": "benchmarks.attention",
    "loader": "benchmarks.loader",
    "anchor-mix": "benchmarks.anchor_mix",
    "model": "benchmarks.model",
    "backbone": "benchmarks.backbone",
    "quality": "benchmarks.quality",
    "diagnostics": "benchmarks.diagnostics",
    "train": "benchmarks.train",
    "profile": "benchmarks.profile",
    "inference": "benchmarks.inference",
}


def load(name: str) -> ModuleType:
    """Import the module of benchmark ``name``; an unknown name lists the valid ones."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {sorted(BENCHMARKS)}")
    return importlib.import_module(BENCHMARKS[name])
