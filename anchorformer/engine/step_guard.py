"""Whether an optimizer step is applied, decided on the device, and the step's outcome read by the
host one step later.

A step is skipped on every rank when the loss was NaN/inf on any rank, or, with the loss-spike guard
on (``train.spike_threshold``), when the mean loss exceeds that multiple of the median loss of the
last ``train.spike_window`` applied steps (Lightning's ``SpikeDetection`` compares with a running
mean; a median is not dragged up by the spike it should catch). The decision is a device tensor
that the fused optimizer and the EMA read, so the host never waits for it. The loss, the decision
and the agreed stop flag travel to the host in a copy that is queued without waiting and read once
the next step has been queued (by then it has long arrived), or at a log, checkpoint or end point,
where the host waits for the device anyway. :class:`StepGuard` counts the skipped steps and ends
the run when they go on in a row for longer than their patience.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from anchorformer.config import TrainConfig
from anchorformer.dist.zero import local_values

__all__ = ["TrainingDiverged", "StepOutcome", "PendingOutcome", "StepGuard", "nonfinite_weights"]

logger = logging.getLogger(__name__)


def nonfinite_weights(module: nn.Module) -> torch.Tensor:
    """How many of this rank's weight values are NaN/inf (a 0-dim float on the weights' device).

    A finite loss whose gradient is not finite passes the step's guard and spoils the weights; the
    trainer checks them with this before it writes a checkpoint."""
    return torch.stack([(~torch.isfinite(local_values(p))).sum() for p in module.parameters()]).sum().float()


class TrainingDiverged(RuntimeError):
    """The loss was NaN/inf (``train.nonfinite_patience``) or a spike (``train.spike_patience``) for
    that many optimizer steps in a row.

    Attributes:
        first_step: the first step of the streak (1-based optimizer step).
        last_step: the step at which the patience ran out.
    """

    def __init__(self, message: str, first_step: int, last_step: int):
        super().__init__(message)
        self.first_step, self.last_step = first_step, last_step


@dataclass(frozen=True)
class StepOutcome:
    """One optimizer step as the host learns of it."""

    step: int
    """Optimizer steps done, this one included."""
    wall_s: float
    """Host wall-clock of the step (data waits, queuing its forward/backward and update)."""
    loss: float
    """Mean loss over the step's micro-batches and ranks; NaN when the update was skipped."""
    nonfinite: bool
    """Some rank's loss was NaN/inf: the update was skipped."""
    spike: bool
    """The loss was a spike: the update was skipped."""
    stop: bool
    """Some rank had been asked to stop when the step ended."""

    @property
    def skipped(self) -> bool:
        """Whether the optimizer left weights and moments as they were."""
        return self.nonfinite or self.spike


class PendingOutcome:
    """A step's outcome on its way to the host: on a GPU, a copy into pinned memory queued behind
    the step's collective and an event to wait on; on the CPU the values themselves.

    Args:
        step: optimizer steps done, this one included.
        wall_s: host wall-clock of the step.
        values: ``[mean loss, non-finite?, spike?, stop?]`` on the device (see :meth:`StepGuard.decide`).
    """

    def __init__(self, step: int, wall_s: float, values: torch.Tensor):
        self.step, self.wall_s = step, wall_s
        self._ready: Optional[torch.cuda.Event] = None
        if values.is_cuda:
            values = values.to("cpu", non_blocking=True)  # pinned: the copy does not wait
            self._ready = torch.cuda.Event()
            self._ready.record()
        self._values = values

    def read(self) -> StepOutcome:
        """The outcome (waits only for this step's values, not for work queued after them)."""
        if self._ready is not None:
            self._ready.synchronize()
        loss, nonfinite, spike, stop = self._values.tolist()
        skipped = nonfinite > 0 or spike > 0
        return StepOutcome(self.step, self.wall_s, float("nan") if skipped else loss, nonfinite > 0, spike > 0,
                           stop > 0)


class StepGuard:
    """Decides on the device whether each optimizer step is applied, then counts the skipped ones on
    the host and raises :class:`TrainingDiverged` when a streak outlasts its patience.

    Args:
        train: the train section (patiences and the spike guard's threshold and window).
        device: where the decision is made (the training device).
    """

    def __init__(self, train: TrainConfig, device: torch.device):
        self.nonfinite_patience = train.nonfinite_patience
        self.spike_patience = train.spike_patience
        self.spike_threshold = train.spike_threshold
        self.nonfinite_steps = 0
        self.spike_steps = 0
        self.nonfinite_in_a_row = 0
        self.spikes_in_a_row = 0
        self.streak_start: Optional[int] = None
        # the losses of the last `spike_window` applied steps, a ring; `recorded` counts them all
        self._window = torch.zeros(train.spike_window, device=device)
        self._recorded = torch.zeros((), dtype=torch.long, device=device)

    # ------------------------------------------------------------------ device side
    def decide(self, agreed: torch.Tensor, micro_batches: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The skip decision of one step, without a host synchronisation.

        Args:
            agreed: ``[non-finite micro-batches, sum of the finite losses, stop requests]`` summed
                over all ranks (the same tensor on every rank, so every rank decides alike).
            micro_batches: micro-batches summed in ``agreed`` (accumulation x ranks).

        Returns:
            ``(skip, values)``: a 0-dim float (1.0 skips the update) and the step's outcome
            ``[mean loss, non-finite?, spike?, stop?]`` for :class:`PendingOutcome`.
        """
        loss = agreed[1] / micro_batches
        nonfinite = agreed[0] > 0
        if self.spike_threshold > 0:
            full = self._recorded >= self._window.numel()  # judged once the window holds applied steps only
            spike = full & ~nonfinite & (loss > self.spike_threshold * self._window.median())
            applied = ~(nonfinite | spike)
            slot = (self._recorded % self._window.numel()).view(1)
            self._window.index_copy_(0, slot, torch.where(applied, loss, self._window[slot]))
            self._recorded += applied.long()
        else:
            spike = torch.zeros_like(nonfinite)
        skip = (nonfinite | spike).float()
        return skip, torch.stack([loss, nonfinite.float(), spike.float(), (agreed[2] > 0).float()])

    # ------------------------------------------------------------------ host side
    @property
    def in_streak(self) -> bool:
        """Whether the last step the host knows of was skipped (a streak is running)."""
        return self.streak_start is not None

    def account(self, outcome: StepOutcome) -> None:
        """Count ``outcome`` and check the patiences.

        Raises:
            TrainingDiverged: when non-finite or spike steps in a row reach their patience.
        """
        self.nonfinite_in_a_row = self.nonfinite_in_a_row + 1 if outcome.nonfinite else 0
        self.spikes_in_a_row = self.spikes_in_a_row + 1 if outcome.spike else 0
        if not outcome.skipped:
            self.streak_start = None
            return
        if self.streak_start is None:
            self.streak_start = outcome.step
        if outcome.nonfinite:
            self.nonfinite_steps += 1
            logger.warning("step %d: non-finite loss on some rank; update skipped (%d in a row, %d total)",
                           outcome.step, self.nonfinite_in_a_row, self.nonfinite_steps)
            if self.nonfinite_in_a_row >= self.nonfinite_patience:
                raise TrainingDiverged(
                    f"the loss was NaN/inf for {self.nonfinite_in_a_row} steps in a row (steps "
                    f"{outcome.step - self.nonfinite_in_a_row + 1}-{outcome.step}). Lower optim.lr, set "
                    f"train.grad_clip, or raise train.nonfinite_patience", self.streak_start, outcome.step)
        else:
            self.spike_steps += 1
            logger.warning("step %d: loss spike (above %g x the median of the last %d applied steps); update "
                           "skipped (%d in a row, %d total)", outcome.step, self.spike_threshold,
                           self._window.numel(), self.spikes_in_a_row, self.spike_steps)
            if self.spikes_in_a_row >= self.spike_patience:
                raise TrainingDiverged(
                    f"the loss spiked above {self.spike_threshold:g} x its running median for "
                    f"{self.spikes_in_a_row} steps in a row (steps {outcome.step - self.spikes_in_a_row + 1}-"
                    f"{outcome.step}). Lower optim.lr, set train.grad_clip, or raise train.spike_threshold "
                    f"or train.spike_patience", self.streak_start, outcome.step)

    def state_dict(self) -> dict[str, Any]:
        """Counters and the spike window (reads the window from the device)."""
        return {"nonfinite_steps": self.nonfinite_steps, "spike_steps": self.spike_steps,
                "nonfinite_in_a_row": self.nonfinite_in_a_row, "spikes_in_a_row": self.spikes_in_a_row,
                "streak_start": self.streak_start, "window": self._window.tolist(),
                "recorded": int(self._recorded)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a window of another ``train.spike_window`` starts empty."""
        self.nonfinite_steps = int(state["nonfinite_steps"])
        self.spike_steps = int(state.get("spike_steps", 0))
        self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))
        self.spikes_in_a_row = int(state.get("spikes_in_a_row", 0))
        self.streak_start = state.get("streak_start")
        window = state.get("window", [])
        if len(window) == self._window.numel():
            self._window.copy_(torch.tensor(window, dtype=self._window.dtype))
            self._recorded.fill_(int(state["recorded"]))
        elif self.spike_threshold > 0:
            logger.warning("the checkpoint's loss-spike window holds %d steps, train.spike_window=%d: the guard "
                           "starts with an empty window", len(window), self._window.numel())

