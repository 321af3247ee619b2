"""The machine-readable twin of docs/benchmarks.md: every benchmark records its numbers here while it
builds its table, and tools/benchmark.py writes them to docs/benchmarks.json in the same run, one row
per (section, device, model, metric) with the value, the target and whether it was met."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

from anchorformer.atomic import atomic_write_bytes

__all__ = ["Result", "record", "verdict", "take", "write_json"]


@dataclass(frozen=True)
class Result:
    """One measured number."""

    model: str
    """what was measured: a model, a kernel or a configuration (e.g. 'base 224 px', 'tiny n=197')"""
    metric: str
    """what the value is, with its unit or as a ratio (e.g. 'img/s', 'AF / DeiT img/s')"""
    value: float
    target: Optional[float] = None
    """the goal the value is judged against; None when the number has no target"""
    goal: Optional[Literal["at_least", "at_most"]] = None
    """which side of the target meets it"""
    met: Optional[bool] = None


_recorded: list[Result] = []


def record(model: str, metric: str, value: float, target: Optional[float] = None,
           goal: Optional[Literal["at_least", "at_most"]] = None) -> Optional[bool]:
    """Record a number for docs/benchmarks.json; returns whether it met ``target`` (None without one)."""
    if (target is None) != (goal is None):
        raise ValueError(f"{model} {metric}: give both target and goal, or neither")
    met = None if target is None else (value >= target if goal == "at_least" else value <= target)
    _recorded.append(Result(model, metric, float(value), target, goal, met))
    return met


def verdict(met: Optional[bool], target: Optional[float], goal: Optional[str] = None) -> str:
    """The table cell for a target: '>= 1.1x (met)', '<= 0.5x (missed)', or '-' without one."""
    if target is None:
        return "-"
    side = ">=" if goal == "at_least" else "<="
    return f"{side} {target}x ({'met' if met else 'missed'})"


def take() -> list[Result]:
    """The results recorded since the last call (and forget them)."""
    results = list(_recorded)
    _recorded.clear()
    return results


def write_json(path: Path, section: str, device: str, machine: str, results: list[Result]) -> None:
    """Replace the rows of ``section`` in the JSON file at ``path`` (other sections are kept); atomic."""
    rows = json.loads(path.read_text(encoding="utf-8")) if path.exists() else []
    rows = [row for row in rows if row["section"] != section]
    rows += [{"section": section, "device": device, "machine": machine, **asdict(result)} for result in results]
    rows.sort(key=lambda row: row["section"])
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(rows, indent=1) + "\n").encode("utf-8"))
