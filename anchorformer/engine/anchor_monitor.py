"""What the anchors do, in TensorBoard, off the training step: the diagnostics of
``models.anchor_diagnostics`` on a fixed probe batch every ``logging.anchor_every_steps`` steps and
at each evaluation, the anchor maps at every ``logging.images_every_evals``-th evaluation, and
once the training images exactly as the model receives them (``logging.input_images``).

Rank 0 computes and writes; every rank enters the probe (under ZeRO-3 the weights are gathered
once per probe, a collective). The probe batch is the first ``logging.anchor_probe_images`` images
of rank 0's validation stream, taken once: from the first evaluation as it passes (:meth:`watching`),
or, when a probe is due before any evaluation, by reading the stream's first batch. The input grid
comes from a forward pre-hook that removes itself after the first training forward, so the step
itself is untouched.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable, Iterator, Optional

import torch
from torch import nn

from anchorformer.config import RootConfig
from anchorformer.dist.zero import whole_parameters
from anchorformer.engine.metrics import TensorBoardLogger
from anchorformer.models import AnchorAttention
from anchorformer.models.anchor_diagnostics import DEAD_FRACTION, AnchorProbe, anchor_diagnostics
from anchorformer.models.anchor_pictures import anchor_pictures, input_grid

__all__ = ["AnchorMonitor"]

logger = logging.getLogger(__name__)


class AnchorMonitor:
    """The anchor diagnostics and pictures of one run.

    Args:
        cfg: the run's configuration (``logging.*`` intervals, ``data.augment`` mean/std).
        model: the network (``engine.module``); diagnostics need an AnchorFormer classifier.
        val_images: the validation batches (their images first); the probe is taken from them once.
        tensorboard: the run's writer.
        is_main: whether this rank computes and writes (rank 0).
    """

    def __init__(self, cfg: RootConfig, model: nn.Module, val_images: Iterable[Any], tensorboard: TensorBoardLogger,
                 is_main: bool):
        self.cfg, self.tensorboard, self.is_main = cfg.logging, tensorboard, is_main
        self.mean, self.std = cfg.data.augment.mean, cfg.data.augment.std
        self.enabled = cfg.task == "classification" and any(isinstance(m, AnchorAttention) for m in model.modules())
        self._micro_batch = cfg.train.micro_batch_size
        self._val = val_images
        self._probe: Optional[AnchorProbe] = None
        self._evaluations = 0

    @property
    def probe_batches(self) -> tuple[int, ...]:
        """Images per probe forward, when probes run (the kernels' autotuner measures the shape up front)."""
        probing = self.enabled and (self.cfg.anchor_every_steps or self.cfg.images_every_evals)
        return (min(self.cfg.anchor_probe_images, self._micro_batch),) if probing else ()

    def watch_inputs(self, model: nn.Module, step: int) -> None:
        """Log the first training forward's images, as the model receives them, once."""
        if not (self.is_main and self.enabled and self.cfg.input_images):
            return

        def capture(_module: nn.Module, args: tuple) -> None:
            handle.remove()
            images = args[0].detach()[: self.cfg.input_images].float()
            self.tensorboard.images({"inputs/train_batch": input_grid(images, self.mean, self.std,
                                                                       max_images=self.cfg.input_images)}, step)

        handle = model.register_forward_pre_hook(capture)

    def watching(self, batches: Iterable[Any]) -> Iterable[Any]:
        """An evaluation's ``batches``, the probe taken from the first as it passes (main rank, once);
        ``batches`` themselves where there is nothing to take."""
        if self._probe is not None or not (self.is_main and self.enabled):
            return batches
        return self._taking_probe(batches)

    def _taking_probe(self, batches: Iterable[Any]) -> Iterator[Any]:
        for batch in batches:
            if self._probe is None:
                self._probe = AnchorProbe.from_batch(batch[0], count=self.cfg.anchor_probe_images)
            yield batch

    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` asks for a probe (the same answer on every rank)."""
        return self.enabled and self.cfg.anchor_every_steps > 0 and step % self.cfg.anchor_every_steps == 0

    def at_evaluation(self, model: nn.Module, step: int) -> None:
        """The diagnostics of an evaluation, with the maps at every ``images_every_evals``-th one."""
        if not self.enabled or not (self.cfg.anchor_every_steps or self.cfg.images_every_evals):
            return
        self._evaluations += 1
        every = self.cfg.images_every_evals
        self.log(model, step, maps=bool(every) and self._evaluations % every == 0)

    def log(self, model: nn.Module, step: int, maps: bool) -> None:
        """Probe ``model`` and write the diagnostics (and the maps) at ``step`` (a collective)."""
        with whole_parameters(model), torch.no_grad():
            if not self.is_main:
                return
            probe = self._probe_batch()
            result = anchor_diagnostics(model, probe, with_maps=maps)
            self.tensorboard.anchor_diagnostics(result, step)
            if maps:
                self.tensorboard.images(anchor_pictures(result, probe.images, self.mean, self.std), step)
            dead = {layer.layer: layer.dead for layer in result.layers if layer.dead}
            if dead:
                logger.warning("step %d: dead anchors (degree below %g of the fair share n/m) in layers %s", step,
                               DEAD_FRACTION, dead)

    def _probe_batch(self) -> AnchorProbe:
        if self._probe is None:
            images = next(iter(self._val))[0]
            self._probe = AnchorProbe.from_batch(images, count=self.cfg.anchor_probe_images)
        return self._probe
