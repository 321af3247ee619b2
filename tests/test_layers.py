"""The package's shape: every import points down the layers of docs/architecture.md, and no two
modules import each other (directly or through a cycle).

The rule, read from the source with ``ast`` (imports inside functions count too: a lazy upward import
is still an upward dependency):

    layer 5  slurm_job                      (the job object that launch/submit.py hands to submitit)
    layer 4  engine
    layer 3  tasks, convert
    layer 2  models
    layer 1  kernels, data, run_folder
    layer 0  config, dist, atomic

A module may import modules of a lower layer and modules of its own package; two packages of the same
layer never import each other. ``anchorformer/__init__.py`` imports nothing of the package (so that
``import anchorformer.config`` stays light).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from helpers import REPO

PACKAGE = REPO / "anchorformer"

LAYERS = {
    "config": 0, "dist": 0, "atomic": 0,
    "kernels": 1, "data": 1, "run_folder": 1,
    "models": 2,
    "tasks": 3, "convert": 3,
    "engine": 4,
    "slurm_job": 5,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str) -> str | None:
    """The longest known module that ``name`` starts with (a name imported from a package may be a
    submodule or an attribute of the package)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, source: str, is_package: bool) -> set[str]:
    """Every anchorformer module that ``module`` (with this source) imports, anywhere in its file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names = [f"{prefix}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            target = _resolve(name) if name.startswith("anchorformer") else None
            if target is not None and target != module:
                found.add(target)
    return found


GRAPH = {module: _imports(module, path.read_text(), path.name == "__init__.py")
         for module, path in MODULES.items()}


def _top(module: str) -> str | None:
    """The top-level package (layer name) of a module; None for the facade ``anchorformer``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_package_has_a_layer():
    tops = {_top(m) for m in MODULES} - {None}
    assert tops <= set(LAYERS), f"packages without a layer in this test and docs/architecture.md: {tops - set(LAYERS)}"


def _upward(module: str, targets: set[str]) -> list[str]:
    """The imports of ``module`` that break the rule: the facade, the same layer or a higher one."""
    top = _top(module)
    return sorted(target for target in targets
                  if _top(target) is None or (_top(target) != top and LAYERS[_top(target)] >= LAYERS[top]))


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _top(m) is not None))
def test_imports_point_down(module):
    top = _top(module)
    upward = _upward(module, GRAPH[module])
    assert not upward, (f"{module} (layer {LAYERS[top]}, {top}) imports {upward}: imports must point to a "
                        f"lower layer (docs/architecture.md)")


def test_no_import_cycle():
    """Depth-first search over the module graph; a back edge is a cycle."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(GRAPH[module]):
            if _top(target) is None:
                continue  # the facade is reached only from outside the rule (checked above)
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(MODULES):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_rule_sees_upward_and_same_layer_imports():
    """The checker itself, on made-up sources: absolute, relative and lazy imports are all seen."""
    source = ("from anchorformer.engine.trainer import Trainer\n"
              "from ..data import shards\n"
              "def later():\n    import anchorformer.kernels\n")
    targets = _imports("anchorformer.kernels.made_up", source, is_package=False)
    assert targets == {"anchorformer.engine.trainer", "anchorformer.data.shards", "anchorformer.kernels"}
    assert _upward("anchorformer.kernels.made_up", targets) == ["anchorformer.data.shards", "anchorformer.engine.trainer"]
    assert _upward("anchorformer.engine.made_up", targets - {"anchorformer.engine.trainer"}) == []
