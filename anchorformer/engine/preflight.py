"""The pre-flight: every check of a run's config that needs more than the config itself (the
model's constructor, the files it names, the launch's world size), done before any work: no
process group, no run folder, no model weights. ``launch/train.py`` and ``launch/submit.py`` call
:func:`check_run` right after ``config.load``, and ``run_training`` calls it again, so every entry
is covered; each refusal is a :class:`ConfigError` naming the key.

The networks are built on the meta device (shapes, no memory, ~0.1 s for a base model), so the
model's real constructor judges ``model.*`` and the checkpoint signature of ``train.resume`` is
computed without weights.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import re
import tempfile
from pathlib import Path
from typing import Optional

import timm
import torch
from torch import nn

from anchorformer.config import ConfigError, RootConfig, check_world_size, run_directory
from anchorformer.data.index import ShardSpec, resolve_shards
from anchorformer.dist import DistEnv
from anchorformer.engine.checkpoint import CheckpointError, Checkpointer, model_signature, resume_meta
from anchorformer.tasks import Runtime, task_class
from anchorformer.tasks.classification import create_classifier

__all__ = ["check_run"]

_UNKNOWN_ARGUMENT = re.compile(r"unexpected keyword argument '(\w+)'")
_LEADING_NAME = re.compile(r"\w+")
_WORD = re.compile(r"\b\w+\b")
_MODEL_FIELDS = ("num_classes", "img_size", "drop_rate", "drop_path_rate")
"""Constructor arguments that come from ``model.<field>`` rather than ``model.kwargs``."""
_ENCODER_SIZE_KEYS = {"classification": "model.img_size", "detection": "detection.image_size",
                      "segmentation": "segmentation.crop_size"}
"""The key that sets the encoder's ``img_size`` in each task."""


def check_run(cfg: RootConfig, world_size: int) -> None:
    """Refuse a run that would fail after start-up, before anything is started or written.

    Args:
        cfg: the loaded configuration.
        world_size: the number of training processes the launch will start (the launcher's
            ``dist.detect().world_size``; ``launch/submit.py``: nodes x tasks per node).

    Raises:
        ConfigError: naming the key to change and how.
    """
    check_world_size(cfg, world_size)
    network = _meta_network(cfg)
    if cfg.loss.distillation != "none":
        _check_teacher(cfg)
    _check_inputs(cfg, world_size)
    _check_writable(run_directory(cfg), "logging.output_dir")
    _check_resume(cfg, network, world_size)


def _meta_network(cfg: RootConfig) -> nn.Module:
    """The network the task trains, built on the meta device by its real constructor."""
    _check_registered(cfg.model.name, "model.name")
    if cfg.model.pretrained_checkpoint:
        _check_exists(cfg.model.pretrained_checkpoint, "model.pretrained_checkpoint", "file")
    weightless = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained_checkpoint=None))
    try:
        with torch.device("meta"):
            if cfg.task == "classification":
                return create_classifier(weightless.model, cfg.loss.distillation)
            # The dense tasks build their network from the config alone (their teacher-free
            # constructors read no file); the runtime only says where tensors live.
            placement = DistEnv(0, 1, 0, 1, "127.0.0.1", 0, "single", "gloo")
            runtime = Runtime(env=placement, device=torch.device("meta"), dtype=torch.float32)
            return task_class(cfg.task)(weightless, runtime).build_model()
    except ConfigError:
        raise
    except Exception as err:  # the constructor's own refusal, whatever its type
        raise _constructor_refusal(cfg, err) from None


def _constructor_refusal(cfg: RootConfig, err: Exception) -> ConfigError:
    """The config key behind a model constructor's error, with its message."""
    name, detail = cfg.model.name, " ".join(str(err).split())
    arguments = _constructor_arguments(name)
    unknown = _UNKNOWN_ARGUMENT.search(detail)
    if isinstance(err, TypeError) and unknown:
        argument = unknown.group(1)
        close = difflib.get_close_matches(argument, arguments, n=1, cutoff=0.6)
        fix = f"did you mean 'model.kwargs.{close[0]}'?" if close else f"valid arguments: {', '.join(arguments)}"
        return ConfigError(f"model.kwargs.{argument}", f"{name} has no argument {argument!r}; {fix}")
    first = _LEADING_NAME.match(detail)
    argument = first.group(0) if first else ""
    mentioned = [word for word in _WORD.findall(detail) if word in cfg.model.kwargs]
    if argument in _MODEL_FIELDS:
        key = _ENCODER_SIZE_KEYS[cfg.task] if argument == "img_size" else f"model.{argument}"
    elif argument in cfg.model.kwargs or argument in arguments:
        key = f"model.kwargs.{argument}"
    elif mentioned:  # the message names an argument the user set, not in first place
        key = f"model.kwargs.{mentioned[0]}"
    else:
        key = "model.kwargs" if cfg.model.kwargs else "model.name"
    return ConfigError(key, f"{name} refuses it: {detail}; change {key}")


def _constructor_arguments(model_name: str) -> list[str]:
    """The keyword arguments the model's class accepts, its bases' included where it forwards
    ``**kwargs`` to them."""
    try:
        with torch.device("meta"):
            model_class = type(timm.create_model(model_name))
    except Exception:  # a model that cannot be built with its defaults: no names to suggest
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


def _check_registered(model_name: str, key: str) -> None:
    """Refuse a model name timm does not know, with the closest registered ones."""
    if ":" in model_name or timm.is_model(model_name):  # hf-hub: / local-dir: name their source
        return
    close = difflib.get_close_matches(model_name, timm.list_models(), n=3, cutoff=0.6)
    fix = (f"did you mean {', '.join(map(repr, close))}?" if close
           else f"use a registered name, e.g. {', '.join(timm.list_models('anchorformer_*')[:3])}")
    raise ConfigError(key, f"{model_name!r} is not a registered timm model; {fix}")


def _check_teacher(cfg: RootConfig) -> None:
    """The distillation teacher: registered, its kwargs accepted, its weights file present."""
    loss = cfg.loss
    _check_registered(str(loss.teacher_model), "loss.teacher_model")
    _check_exists(str(loss.teacher_checkpoint), "loss.teacher_checkpoint", "file")
    try:
        with torch.device("meta"):
            timm.create_model(loss.teacher_model, num_classes=cfg.model.num_classes, **loss.teacher_kwargs)
    except Exception as err:  # the teacher constructor's own refusal
        raise ConfigError("loss.teacher_kwargs", f"{loss.teacher_model} refuses them: "
                                                 f"{' '.join(str(err).split())}; change loss.teacher_kwargs") from None


def _check_inputs(cfg: RootConfig, world_size: int) -> None:
    """The data a task reads exists; the training shards feed every loader reader."""
    if cfg.task == "detection":
        for split in ("train", "val"):
            _check_exists(str(getattr(cfg.detection, f"{split}_annotations")), f"detection.{split}_annotations", "file")
            _check_exists(str(getattr(cfg.detection, f"{split}_images")), f"detection.{split}_images", "folder")
    elif cfg.task == "segmentation":
        _check_exists(str(cfg.segmentation.root), "segmentation.root", "folder")
    elif cfg.data.source == "shards":
        d = cfg.data
        train = _resolve_shards(str(d.train_shards), d.train_index, "data.train_shards", "data.train_index", cfg)
        _resolve_shards(str(d.val_shards), d.val_index, "data.val_shards", "data.val_index", cfg)
        workers = max(1, d.num_workers)
        if len(train) < world_size * workers:
            raise ConfigError("data.num_workers", (
                f"{world_size} process(es) x {workers} loader worker(s) = {world_size * workers} readers, but "
                f"data.train_shards has {len(train)} shard(s) and each reader needs one; lower "
                f"data.num_workers or write more, smaller shards (tools/make_shards.py --max-samples)"))


def _resolve_shards(shards: str, index: Optional[str], key: str, index_key: str, cfg: RootConfig) -> list[ShardSpec]:
    """The shards of one split (every local one must exist), checked against model.num_classes."""
    if index is not None:
        _check_exists(index, index_key, "file")
    try:
        specs, loaded = resolve_shards(shards, index)
    except ValueError as err:
        raise ConfigError(key, " ".join(str(err).split())) from None
    if loaded is not None and loaded.num_classes > cfg.model.num_classes:
        raise ConfigError("model.num_classes", (
            f"{cfg.model.num_classes} is fewer than the {loaded.num_classes} classes of the shards of {key}; "
            f"set model.num_classes={loaded.num_classes}"))
    return specs


def _check_exists(path: str, key: str, kind: str) -> None:
    target = Path(path).expanduser()
    if not (target.is_file() if kind == "file" else target.is_dir()):
        raise ConfigError(key, f"{path!r} is not an existing {kind}; point {key} at one")


def _check_writable(folder: Path, key: str) -> None:
    """Refuse a folder that cannot be created or written, without creating it: a probe folder is
    made and removed in its nearest existing ancestor."""
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(key, f"{existing} is a file, so the run folder {folder} cannot be created there; "
                               f"choose another {key}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".anchorformer-write-probe-", dir=existing))
    except OSError as err:
        raise ConfigError(key, f"the run folder {folder} cannot be created: {existing} is not writable "
                               f"({err.strerror}); choose a writable {key}") from None


def _check_resume(cfg: RootConfig, network: nn.Module, world_size: int) -> None:
    """The checkpoint ``train.resume`` names exists and fits this run's model, precision and global
    batch (it may come from another number of ranks or ZeRO stage)."""
    checkpointer = Checkpointer(run_directory(cfg) / "checkpoints", cfg.checkpoint, is_main=True)
    expected = resume_meta(model_signature(network, cfg.model.name), cfg, world_size)
    try:
        tag_dir = checkpointer.find(cfg.train.resume)
        if tag_dir is not None:
            checkpointer.check(tag_dir, expected)
    except CheckpointError as err:
        raise ConfigError("train.resume", " ".join(str(err).split())) from None
