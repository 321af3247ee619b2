"""What every task's pre-flight is made of (``Task.preflight``): the network built on the meta device
by its real constructor, its refusals named by config key, and checks of the files a task reads.
``engine.preflight.check_run`` calls the task's pre-flight once per start, before any work.
"""
from __future__ import annotations

import difflib
import inspect
from pathlib import Path
from typing import Callable

import timm
import torch
from torch import nn

from anchorformer.config import ConfigError, ModelConfig
from anchorformer.config.schema import ARCHITECTURE_ARGUMENTS
from anchorformer.models import ModelArgumentError

__all__ = ["meta_network", "constructor_arguments", "check_registered", "check_exists"]

_TYPED_ARGUMENTS = ("num_classes", "drop_rate", "drop_path_rate", *ARCHITECTURE_ARGUMENTS)
"""Constructor arguments with a ``model.<name>`` key of their own (img_size's key is the task's)."""


def meta_network(model: ModelConfig, build: Callable[[], nn.Module], size_key: str) -> nn.Module:
    """``build()`` on the meta device (shapes, no memory: ~0.1 s for a base model), its refusal
    named by the config key that sets the refused argument; the model is registered and its
    initial weights (``model.pretrained_checkpoint``) exist.

    Args:
        model: the ``model`` section whose arguments ``build`` passes to timm.
        build: the task's own network constructor.
        size_key: the key that sets the encoder's ``img_size`` in this task.

    Raises:
        ConfigError: naming the key (an unknown argument also names the closest valid one).
    """
    check_registered(model.name, "model.name")
    if model.pretrained_checkpoint:  # a folder: a ViT/DeiT to convert (timm folder, run), see engine/warm_start.py
        check_exists(model.pretrained_checkpoint, "model.pretrained_checkpoint", "file or folder")
    try:
        with torch.device("meta"):
            return build()
    except ConfigError:
        raise
    except ModelArgumentError as err:
        key = _key_of(model, err.argument, size_key)
        raise ConfigError(key, f"{model.name} refuses it: {' '.join(str(err).split())}; change {key}") from None
    except TypeError as err:  # Python's own refusal of an argument the constructor lacks
        raise _unknown_argument(model, err) from None
    except Exception as err:  # another model's own refusal, in whatever type it raises
        key = "model.kwargs" if model.kwargs else "model.name"
        raise ConfigError(key, f"{model.name} refuses it: {' '.join(str(err).split())}; change {key}") from None


def _key_of(model: ModelConfig, argument: str, size_key: str) -> str:
    """The config key that sets constructor argument ``argument``."""
    if argument == "img_size":
        return size_key
    if argument in _TYPED_ARGUMENTS:
        return f"model.{argument}"
    if argument in model.kwargs:
        return f"model.kwargs.{argument}"
    return "model.name"  # the variant's own value is refused: another variant fits


def _unknown_argument(model: ModelConfig, err: TypeError) -> ConfigError:
    """The argument the user set that the model's constructor does not take, with the closest one."""
    accepted = constructor_arguments(model.name)
    given = {**{name: f"model.{name}" for name in ARCHITECTURE_ARGUMENTS if getattr(model, name) is not None},
             **{name: f"model.kwargs.{name}" for name in model.kwargs}}
    unknown = [name for name in given if name not in accepted]
    if not accepted or not unknown:
        key = "model.kwargs" if model.kwargs else "model.name"
        return ConfigError(key, f"{model.name} refuses it: {' '.join(str(err).split())}; change {key}")
    argument = unknown[0]
    close = difflib.get_close_matches(argument, accepted, n=1, cutoff=0.6)
    if close:
        fix = f"did you mean 'model.{close[0]}'?" if close[0] in _TYPED_ARGUMENTS or close[0] == "img_size" \
            else f"did you mean 'model.kwargs.{close[0]}'?"
    else:
        fix = f"valid arguments: {', '.join(accepted)}"
    return ConfigError(given[argument], f"{model.name} has no argument {argument!r}; {fix}")


def constructor_arguments(model_name: str) -> list[str]:
    """The keyword arguments the model's class accepts, its bases' included where it forwards
    ``**kwargs`` to them; [] for a model that cannot be built with its defaults."""
    try:
        with torch.device("meta"):
            model_class = type(timm.create_model(model_name))
    except Exception:  # nothing to suggest from
        return []
    names: list[str] = []
    for klass in model_class.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = list(inspect.signature(klass.__init__).parameters.values())[1:]
        names += [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return list(dict.fromkeys(names))


def check_registered(model_name: str, key: str) -> None:
    """Refuse a model name timm does not know, with the closest registered ones."""
    if ":" in model_name or timm.is_model(model_name):  # hf-hub: / local-dir: name their source
        return
    close = difflib.get_close_matches(model_name, timm.list_models(), n=3, cutoff=0.6)
    fix = (f"did you mean {', '.join(map(repr, close))}?" if close
           else f"use a registered name, e.g. {', '.join(timm.list_models('anchorformer_*')[:3])}")
    raise ConfigError(key, f"{model_name!r} is not a registered timm model; {fix}")


def check_exists(path: str, key: str, kind: str) -> None:
    """Refuse ``path`` unless it is an existing ``kind`` ('file', 'folder' or 'file or folder')."""
    target = Path(path).expanduser()
    if not {"file": target.is_file(), "folder": target.is_dir(), "file or folder": target.exists()}[kind]:
        raise ConfigError(key, f"{path!r} is not an existing {kind}; point {key} at one")
