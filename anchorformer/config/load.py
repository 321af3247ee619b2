"""Build the read-only :class:`RootConfig`: schema defaults <- recipe YAML (and the base YAMLs it
names) <- ``key=value`` overrides, merged once with OmegaConf and then type-checked here.

Every rejection raises :class:`ConfigError` naming the dotted key; an unknown key also names the
closest valid one.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
import types
import typing
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from anchorformer.config.schema import ARCHITECTURE_ARGUMENTS, ConfigError, RootConfig

__all__ = ["load", "from_dict", "to_yaml", "to_dict", "check_world_size", "field_help",
           "describe", "BASE_KEY"]


BASE_KEY = "base"
"""Top-level YAML key naming another recipe (path relative to this file) whose values this one
overrides."""


def load(path: str | Path, overrides: Sequence[str] = ()) -> RootConfig:
    """Read a recipe, apply command-line overrides and validate everything.

    Args:
        path: recipe YAML; it may name a base recipe with ``base: other.yaml``.
        overrides: ``section.key=value`` strings (YAML syntax for values), applied last.

    Returns:
        The validated, read-only configuration.

    Raises:
        ConfigError: for a missing file, bad YAML, an unknown key, a wrong type or a bad value.
    """
    recipe = _read_recipe(Path(path), chain=())
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "a command-line override must look like section.key=value")
    try:
        merged = OmegaConf.merge(recipe, OmegaConf.from_dotlist(list(overrides)))
        data = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(getattr(err, "full_key", "") or "<overrides>", str(err).splitlines()[0]) from err
    if isinstance(data, dict) and (data.get("logging") or {}).get("run_name") is None:
        data.setdefault("logging", {})["run_name"] = Path(path).stem
    return from_dict(data)


def from_dict(data: dict[str, Any]) -> RootConfig:
    """Validate a plain nested dict (missing keys take schema defaults) into a RootConfig."""
    if not isinstance(data, dict):
        raise ConfigError("<root>", f"a recipe must be a mapping of sections, got {type(data).__name__}")
    cfg = _build(RootConfig, _with_architecture_keys(data), prefix="")
    cfg.validate()
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain nested dict of ``cfg`` (tuples as lists), suitable for YAML / JSON."""
    return _plain(dataclasses.asdict(cfg))


def to_yaml(cfg: RootConfig) -> str:
    """The resolved configuration as YAML; :func:`load` of this text gives an equal config."""
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))


def check_world_size(cfg: RootConfig, world_size: int) -> int:
    """Check the batch split against the number of processes.

    Args:
        cfg: validated configuration.
        world_size: number of data-parallel processes.

    Returns:
        Gradient-accumulation steps (global batch / (micro batch x world size)).

    Raises:
        ConfigError: when the global batch cannot be split evenly over ``world_size`` ranks.
    """
    train = cfg.train
    per_step = train.micro_batch_size * world_size
    if train.global_batch_size % per_step != 0:
        raise ConfigError(
            "train.global_batch_size",
            f"{train.global_batch_size} is not divisible by train.micro_batch_size x world size = "
            f"{train.micro_batch_size} x {world_size} = {per_step}; change train.micro_batch_size "
            f"or the number of processes")
    return train.global_batch_size // per_step


def _with_architecture_keys(data: dict[str, Any]) -> dict[str, Any]:
    """Recipes and recorded configs written before the architecture options had keys of their own
    (``model.kwargs.num_anchors``, ``depth``, ...): each moves to its ``model.`` key, unless that is
    set too (then the schema refuses the duplicate)."""
    model = data.get("model")
    kwargs = model.get("kwargs") if isinstance(model, dict) else None
    if not isinstance(kwargs, dict):
        return data
    moved = {k: v for k, v in kwargs.items() if k in ARCHITECTURE_ARGUMENTS and model.get(k) is None}
    if not moved:
        return data
    rest = {k: v for k, v in kwargs.items() if k not in moved}
    return {**data, "model": {**model, **moved, "kwargs": rest}}


def _read_recipe(path: Path, chain: tuple[Path, ...]) -> Any:
    """Load one YAML and, recursively, the base it names (base values first)."""
    if not path.is_file():
        raise ConfigError("<file>", f"recipe {str(path)!r} does not exist")
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        raise ConfigError(BASE_KEY, f"recipes name each other in a cycle: {cycle}")
    try:
        node = OmegaConf.load(path)
    except Exception as err:  # yaml.YAMLError and OmegaConf errors; both mean "bad YAML here"
        raise ConfigError("<file>", f"cannot parse {str(path)!r}: {err}") from err
    if not OmegaConf.is_dict(node):
        raise ConfigError("<file>", f"{str(path)!r} must hold a mapping of sections")
    base = node.pop(BASE_KEY, None)
    if base is None:
        return node
    parent = _read_recipe(path.parent / str(base), chain=(*chain, resolved))
    return OmegaConf.merge(parent, node)


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from ``data``, checking keys, types and values."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(dotted, _unknown_key_message(key, list(fields), prefix))
        kwargs[key] = _coerce(hints[key], value, dotted)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise err.under(prefix) from None


def _unknown_key_message(key: str, valid: list[str], prefix: str) -> str:
    section = f"section '{prefix}'" if prefix else "the top level"
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{(prefix + '.') if prefix else ''}{close[0]}'?" if close else ""
    return f"unknown key in {section}{hint} (valid keys: {', '.join(valid)})"


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """Convert ``value`` to the annotated type ``hint`` or raise ConfigError."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(key, f"is a section; expected a mapping, got {value!r}")
        return _build(hint, value, key)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(key, "must not be null")
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key)
    if value is None:
        raise ConfigError(key, f"must not be null (expected {_type_name(hint)})")
    if origin is Literal:
        allowed = typing.get_args(hint)
        if isinstance(value, bool) or value not in allowed:
            raise ConfigError(key, f"must be one of {', '.join(map(repr, allowed))}; got {value!r}")
        return value
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"must be a list ({_type_name(hint)}), got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(key, f"must have {len(args)} entries, got {len(value)}: {list(value)}")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"must be a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(key, f"must be a string, got {value!r}")
        return str(value)
    raise TypeError(f"schema type {hint!r} of {key} is not supported by the config loader")


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


@lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@lru_cache(maxsize=None)
def field_help(cls: type) -> dict[str, str]:
    """The help text of every field of a config dataclass (the string literal under the field)."""
    source = textwrap.dedent(inspect.getsource(cls))
    body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
    helps: dict[str, str] = {}
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            helps[node.target.id] = " ".join(following.value.value.split())
    return helps


def describe(cls: type = RootConfig, prefix: str = "", defaults: Optional[Any] = None) -> list[str]:
    """One line per option: ``dotted.key (type, default): help``, sections expanded."""
    defaults = defaults if defaults is not None else cls()
    lines = []
    helps = field_help(cls)
    for f in dataclasses.fields(cls):
        dotted = f"{prefix}{f.name}"
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            lines.append(f"[{dotted}] {helps.get(f.name, '')}")
            lines.extend(describe(type(value), dotted + ".", value))
        else:
            hint = _type_name(_hints(cls)[f.name])
            lines.append(f"{dotted} ({hint}, default {_plain(value)!r}): {helps.get(f.name, '')}")
    return lines
