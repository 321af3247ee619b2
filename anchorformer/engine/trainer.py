"""The DeepSpeed training loop: build -> (resume) -> train epoch by epoch -> evaluate -> checkpoint.

One optimizer step reads: set lr, then per micro-batch forward / backward / engine.step; at the
accumulation boundary all ranks sum (non-finite losses, loss sum, stop requested) in one
all-reduce and the device decides from it whether the update is applied (engine/step_guard.py):
a NaN or spiking step is skipped on every rank without the host waiting for the device. The host
takes in each step's outcome one step later, or at once on log and checkpoint steps, where it
waits anyway; a stop request ends every rank after the same step. No checkpoint is written while
skipped steps run in a row.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Literal, Optional

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from anchorformer import dist
from anchorformer.atomic import atomic_write_bytes
from anchorformer.config import RootConfig, check_world_size, to_dict, to_yaml
from anchorformer.engine import anchor_mix, deepspeed_config
from anchorformer.engine.checkpoint import (
    Checkpointer, Resumed, RngState, find_resume_point, model_signature, run_meta,
)
from anchorformer.engine.ema import ShardedEma
from anchorformer.engine.anchor_monitor import AnchorMonitor
from anchorformer.engine.baseline import report_beside, run_baseline
from anchorformer.engine.metrics import (
    TensorBoardLogger, Throughput, measure_forward_flops, peak_memory_gb, skip_scalars,
)
from anchorformer.engine.optim import LrSchedule, build_optimizer, peak_lr, set_lr, skip_step_where
from anchorformer.engine.preflight import RunPlan
from anchorformer.engine.reshard import optimizer_param_names
from anchorformer.engine.failures import FailureLedger
from anchorformer.engine.step_guard import PendingOutcome, StepGuard, TrainingDiverged, nonfinite_weights
from anchorformer.engine.stragglers import StragglerMonitor
from anchorformer.engine.watchdog import Watchdog
from anchorformer.kernels import autotune
from anchorformer.run_folder import RunFolder
from anchorformer.tasks import Runtime, Task, build_task
from anchorformer.tasks.linear_baseline import LinearBaseline

__all__ = ["FitResult", "StepInfo", "TrainingDiverged", "Trainer"]

logger = logging.getLogger(__name__)

_WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "bf16-mixed": torch.float32, "fp16": torch.float16}


@dataclass
class FitResult:
    """How :meth:`Trainer.fit` ended."""

    status: Literal["completed", "stopped", "diverged"]
    """'completed' (all epochs or train.max_steps), 'stopped' (request_stop, checkpoint written) or
    'diverged' (in summary.json only: fit() raised TrainingDiverged)."""
    epoch: int
    """Epochs fully done."""
    step: int
    """Optimizer steps done (skipped non-finite steps included)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Last evaluation (``eval/top1``, ``eval_ema/top1``, ...) and run totals."""


@dataclass(frozen=True)
class StepInfo:
    """One optimizer step, as :meth:`Trainer.add_step_callback` callbacks get it once the host has
    its outcome: right after it on log and checkpoint steps and at the end, otherwise after the
    next step."""

    step: int
    """Optimizer steps done, this one included (1 after the first step of a fresh run)."""
    wall_s: float
    """Host wall-clock of the step: its data waits, forward/backward passes and update (on GPUs
    the step's kernels may still be running)."""
    loss: float
    """Mean training loss over the step's micro-batches and ranks; NaN when the update was skipped."""


StepCallback = Callable[["Trainer", StepInfo], None]


class Trainer:
    """Trains ``cfg`` on this rank; every rank of the job builds one.

    Args:
        cfg: validated configuration.
        env: this process's place in the job (the process group must be up, see ``dist.init``).
        task: the task to train; default ``tasks.build_task(cfg, ...)``.
        plan: the pre-flight's findings (``engine.preflight.check_run``), the checkpoint to resume
            among them; default: :meth:`resume` looks for ``train.resume`` itself.
    """

    def __init__(self, cfg: RootConfig, env: dist.DistEnv, task: Optional[Task] = None,
                 plan: Optional[RunPlan] = None):
        # Order: checks, device, run folder, seed, task + model, engine, EMA, data, checkpointer, loggers.
        # Nothing is loaded here: fit() resumes first (resume()).
        self.cfg, self.env = cfg, env
        self.accumulation = check_world_size(cfg, env.world_size)
        self.device = dist.resolve_device(cfg.train.device, env)
        self.dtype = _WEIGHT_DTYPES[cfg.train.precision]
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.train.tf32
        else:
            cfg.check_compile_device(self.device.type)  # train.device=auto on a machine without CUDA
        self.folder = RunFolder.of(cfg)
        self._plan = plan
        self._stop_requested = False
        self._stopped = False  # all ranks agreed on a stop at a step boundary
        self._start_time = time.perf_counter()
        if env.is_main:
            self.folder.root.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.folder.config, to_yaml(cfg).encode())
        dist.barrier()

        anchor_mix.select(cfg)  # auto's decisions are agreed in fit(), before the first step
        dist.seed_everything(cfg.train.seed)  # identical initial weights on every rank
        runtime = Runtime(env=env, device=self.device, dtype=self.dtype)
        self.task = task if task is not None else build_task(cfg, runtime)
        model = self.task.build_model()
        if cfg.train.activation_checkpointing:
            if not hasattr(model, "set_grad_checkpointing"):
                raise ValueError(f"train.activation_checkpointing=true but {type(model).__name__} has "
                                 f"no set_grad_checkpointing(); turn it off for this model")
            model.set_grad_checkpointing(True)
        model.to(self.device)  # fp32: DeepSpeed makes the bf16/fp16 copies from these masters
        self.flops_per_sample = measure_forward_flops(model, self.task.example_input().float())
        self.run_meta = run_meta(model_signature(model, cfg.model.name), cfg, env.world_size)

        import deepspeed  # after dist.init chose DeepSpeed's accelerator

        # the basic optimizer, wrapped per ZeRO stage: fused, so the device can skip its step
        self.optimizer = build_optimizer(model, cfg.optim)
        self._optimizer_device = torch.device("cpu") if cfg.deepspeed.offload_optimizer == "cpu" else self.device
        optimizer_params = optimizer_param_names(model, self.optimizer)  # before ZeRO regroups them
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=self.optimizer, dist_init_required=False,
            config=deepspeed_config.build(cfg, env.world_size))
        if cfg.train.compile != "off":  # torch.compile of engine.module in place, under DeepSpeed's hooks
            self.engine.compile(compile_kwargs={} if cfg.train.compile == "default" else {"mode": cfg.train.compile})
        self.ema = ShardedEma.for_engine(self.engine, cfg.train.ema.decay) if cfg.train.ema.enabled else None
        if env.world_size == 1 and cfg.deepspeed.zero_stage in (1, 2) and cfg.deepspeed.offload_optimizer == "none":
            logger.info("ZeRO stage %d on one process partitions nothing but still copies and norms every "
                        "parameter on the host each step; deepspeed.zero_stage=0 skips that (docs/training.md)",
                        cfg.deepspeed.zero_stage)

        data = self.task.build_data()
        self.train_stream, self.val_stream = data["train"], data["val"]
        self.steps_per_epoch = self.train_stream.steps_per_epoch // self.accumulation
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"one epoch has {self.train_stream.steps_per_epoch} micro-batches per rank, fewer than "
                f"the {self.accumulation} accumulated per step; lower train.global_batch_size")
        epochs_steps = cfg.schedule.epochs * self.steps_per_epoch
        self.total_steps = min(epochs_steps, cfg.train.max_steps) if cfg.train.max_steps else epochs_steps
        self.schedule = LrSchedule.from_config(cfg.schedule, peak_lr(cfg), self.steps_per_epoch,
                                               epochs_steps)

        self.epoch, self.step = 0, 0
        self.best_metric: Optional[float] = None
        self.guard = StepGuard(cfg.train, self.device)
        self._pending: deque[PendingOutcome] = deque()  # steps whose outcome the host has not read yet
        self._unlogged_losses: list[float] = []  # settled steps since the last train log
        self._last_loss = float("nan")  # of the newest settled applied step (progress bar)
        self._grad_norm: Optional[torch.Tensor] = None
        self._step_callbacks: list[StepCallback] = []
        # everything that survives a stop; a checkpoint of another layout resumes resharded
        self.checkpointer = Checkpointer(self.folder.checkpoints, cfg.checkpoint, env.is_main)
        self.checkpointer.register_engine(self.engine, self.optimizer, optimizer_params)
        self.checkpointer.register(shared={"trainer": self, "guard": self.guard},
                                   per_rank={"data": self.train_stream, "rng": RngState(), "ema": self.ema})
        self.resumed: Optional[Resumed] = None
        self.baseline: Optional[LinearBaseline] = None  # fit() fits it on the main rank
        self._resume_done = False

        self.tensorboard = TensorBoardLogger(self.folder.tensorboard, env.is_main and cfg.logging.tensorboard,
                                             main_metric=self.task.main_metric)
        self.anchors = AnchorMonitor(cfg, self.engine.module, self.val_stream, self.tensorboard, env.is_main)
        self.throughput = Throughput(cfg.train.global_batch_size, self.flops_per_sample,
                                     env.world_size, cfg.logging.peak_tflops)
        self.stragglers = StragglerMonitor(cfg.health, self.engine, self.accumulation, self.device, self.tensorboard,
                                           env.is_main)
        self.watchdog = Watchdog(cfg.health, env, self.folder)  # runs during fit(); run_training may give it a hook
        logger.info("%s: %.2f M parameters, %.3f GFLOPs/sample forward, %d steps/epoch, %d steps, "
                    "ZeRO %d, %s, %d x %d x %d accumulation", cfg.model.name,
                    self.run_meta.num_params / 1e6, self.flops_per_sample / 1e9,
                    self.steps_per_epoch, self.total_steps, cfg.deepspeed.zero_stage,
                    cfg.train.precision, cfg.train.micro_batch_size, env.world_size, self.accumulation)

    # ------------------------------------------------------------------ public API
    def request_stop(self) -> None:
        """Ask the run to checkpoint and return at the next step boundary (async-signal-safe); asked
        during start-up or an evaluation, it stops after the next step."""
        self._stop_requested = True

    def add_step_callback(self, callback: StepCallback) -> None:
        """Call ``callback(trainer, info)`` with a :class:`StepInfo` after every optimizer step of
        :meth:`fit` on this rank (benchmarks time steps with it)."""
        self._step_callbacks.append(callback)

    def resume(self) -> Optional[Resumed]:
        """Load the checkpoint to continue into the engine and every registered component (a
        collective), once: the pre-flight's, else the one ``train.resume`` names (found and checked
        here). :meth:`fit` calls it first unless it ran.

        Returns:
            Where and how the run resumed; None for a fresh start.

        Raises:
            CheckpointError: when the checkpoint cannot be continued by this run.
        """
        assert not self._resume_done, "Trainer.resume() runs once, before fit() trains"
        self._resume_done = True
        point = (self._plan.resume if self._plan is not None
                 else find_resume_point(self.cfg.train.resume, self.folder.checkpoints, self.run_meta))
        if point is not None:
            self.resumed = self.checkpointer.load(point, self.run_meta)
        return self.resumed

    def fit(self) -> FitResult:
        """Resume (unless :meth:`resume` ran), then train until all epochs (or ``train.max_steps``)
        are done, or a stop is requested.

        Returns:
            How it ended, with the last evaluation.

        Raises:
            TrainingDiverged: after ``train.nonfinite_patience`` non-finite (or
                ``train.spike_patience`` spike) steps in a row, or when a checkpoint is due and
                the weights are NaN/inf; no checkpoint was written during them, so ``latest``
                names the newest one from before; summary.json says ``diverged``.
        """
        if not self._resume_done:
            self.resume()
        self.tensorboard.text("config", "```yaml\n" + to_yaml(self.cfg) + "\n```", self.step)
        table = anchor_mix.agree(self.engine.module, self.cfg, self.device, self.env.is_main,
                                 self.resumed.anchor_mix if self.resumed else (), self.anchors.probe_batches)
        if table:
            self.tensorboard.text("anchor_mix", "```\n" + autotune.format_table(table) + "\n```", self.step)
        self.baseline = run_baseline(self.cfg) if self.env.is_main else None  # small runs: a linear classifier
        self.anchors.watch_inputs(self.engine.module, self.step)
        bar = self.env.is_main and self.cfg.logging.progress_bar
        with self.watchdog, logging_redirect_tqdm() if bar else nullcontext():
            try:
                status, metrics = self._train()
            except TrainingDiverged as diverged:
                if self._unlogged_losses:
                    self._log_train()  # the streak's skipped steps, logged on every rank alike
                logger.error("%s; stopping at step %d. latest checkpoint: %s (written before the streak began at "
                             "step %d)", diverged, self.step, self._latest_checkpoint() or "none", diverged.first_step)
                self._write_summary(FitResult("diverged", self.epoch, self.step, self._totals()), diverged)
                raise
        result = FitResult(status, self.epoch, self.step, {**metrics, **self._totals()})
        self._write_summary(result)
        return result

    def close(self) -> None:
        """Release the TensorBoard writer and the engine's hooks (the process group stays up)."""
        self.tensorboard.close()
        destroy = getattr(self.engine, "destroy", None)
        if destroy is not None:
            destroy()

    def evaluate(self) -> dict[str, float]:
        """Evaluate the model (and its EMA) on the validation stream; log and return the metrics."""
        validation = self.anchors.watching(self.val_stream)  # the anchor probe batch taken as it passes, once
        metrics = {f"eval/{k}": v for k, v in self.task.evaluate(self.engine, validation).items()}
        if self.ema is not None:
            with self.ema.swapped_in():
                ema = self.task.evaluate(self.engine, self.val_stream)
            metrics.update({f"eval_ema/{k}": v for k, v in ema.items()})
        if hasattr(self.val_stream, "skip_counts"):
            skipped = self._summed_over_ranks(self.val_stream.skip_counts())
            metrics.update(skip_scalars("val", skipped))
        main = metrics[f"eval/{self.task.main_metric}"]
        if self.best_metric is None or main > self.best_metric:
            self.best_metric = main
        metrics[f"eval/best_{self.task.main_metric}"] = self.best_metric
        if self.baseline is not None:
            metrics["eval/linear_baseline_top1"] = self.baseline.top1
        self.tensorboard.scalars(metrics, self.step)
        self.anchors.at_evaluation(self.engine.module, self.step)
        self.tensorboard.flush()
        logger.info("epoch %d step %d: %s", self.epoch, self.step,
                    ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k.startswith("eval")))
        if self.baseline is not None:
            report_beside(metrics["eval/top1"], self.baseline)
        return metrics

    # ------------------------------------------------------------------ loop
    def _train(self) -> tuple[Literal["completed", "stopped"], dict[str, float]]:
        metrics: dict[str, float] = {}
        epochs = self.cfg.schedule.epochs
        while self.epoch < epochs and self.step < self.total_steps:
            if not self._train_epoch():
                break
            self.epoch += 1
            if self.epoch % self.cfg.train.eval_every_epochs == 0 or self.epoch == epochs:
                with self.watchdog.excused("evaluation"):
                    metrics = self.evaluate()
            if self.cfg.checkpoint.at_epoch_end:
                self._save_unless_in_streak()
        if self._unlogged_losses:
            self._log_train()  # the run (or its last stretch) was shorter than logging.every_steps
        if self._stopped:  # not the local flag: a signal after the last step changes nothing
            self._save_unless_in_streak()
            logger.info("stopped at step %d on request; checkpoint in %s", self.step,
                        self.checkpointer.folder.path)
            return "stopped", metrics
        if not metrics or self.step % self.steps_per_epoch:
            with self.watchdog.excused("evaluation"):
                metrics = self.evaluate()  # ended mid-epoch by train.max_steps, or resumed at the end
        if not (self.cfg.checkpoint.at_epoch_end and self.step % self.steps_per_epoch == 0):
            self._save_unless_in_streak()
        return "completed", metrics

    def _train_epoch(self) -> bool:
        """Run the rest of the current epoch; False when a stop or max_steps interrupted it."""
        self.train_stream.set_epoch(self.epoch)
        done = self.step - self.epoch * self.steps_per_epoch
        remaining = min(self.steps_per_epoch - done, self.total_steps - self.step)
        batches = iter(self.train_stream)
        bar = tqdm(total=self.steps_per_epoch, initial=done, desc=f"epoch {self.epoch}",
                   disable=not (self.env.is_main and self.cfg.logging.progress_bar),
                   dynamic_ncols=True, leave=False)
        try:
            for left in reversed(range(remaining)):
                self._train_step(batches)
                log, save = self.step % self.cfg.logging.every_steps == 0, self.checkpointer.due(self.step)
                # the host waits for the device only where it needs this step's outcome
                self._settle(everything=log or save or left == 0)
                bar.update(1)
                bar.set_postfix(loss=f"{self._last_loss:.4f}", lr=f"{self.optimizer.param_groups[0]['lr']:.3g}")
                if log:
                    self._log_train()
                if self.anchors.due(self.step):
                    self.anchors.log(self.engine.module, self.step, maps=False)
                if self._stopped:
                    return False
                if save:
                    self._save_unless_in_streak()
        finally:
            bar.close()
        return self.step - self.epoch * self.steps_per_epoch == self.steps_per_epoch

    def _train_step(self, batches: Iterator[Any]) -> None:
        """One optimizer step over ``accumulation`` micro-batches, queued without waiting for the
        device: the device decides whether the update is applied (:class:`StepGuard`), and the
        step's outcome waits in ``self._pending`` for :meth:`_settle`."""
        started = time.perf_counter()
        set_lr(self.optimizer, self.schedule(self.step))
        self.engine.train()
        nonfinite = torch.zeros((), device=self.device)
        loss_sum = torch.zeros((), device=self.device)
        data_wait = 0.0
        for micro in range(self.accumulation):
            start = time.perf_counter()
            batch = next(batches)
            data_wait += time.perf_counter() - start
            # After next(): starting loader workers draws from the same generator.
            dist.seed_for_step(self.cfg.train.seed, self.step * self.accumulation + micro)
            loss, _ = self.task.training_loss(self.engine, batch)
            finite = torch.isfinite(loss.detach())
            nonfinite += (~finite).float()
            loss_sum += torch.where(finite, loss.detach().float(), torch.zeros_like(loss_sum))
            self.engine.backward(loss)
            if micro == self.accumulation - 1:
                # One all-reduce: non-finite losses on any rank, the loss sum, stop requests. torch.full,
                # not torch.tensor: copying a Python number to the device would wait for the device.
                stop = torch.full((), float(self._stop_requested), device=self.device)
                agreed = dist.sum_across_ranks(torch.stack([nonfinite, loss_sum, stop]))
                skip, outcome = self.guard.decide(agreed, self.accumulation * self.env.world_size)
                skip_step_where(self.optimizer, skip, self._optimizer_device)
                self._grad_norm = self._unclipped_grad_norm()
            self.engine.step()
        self.step += 1
        if self.ema is not None and self.step % self.cfg.train.ema.every_steps == 0:
            self.ema.update(keep=1.0 - skip)  # a skipped step leaves the average as it is
        self.throughput.add_step(data_wait)
        self._pending.append(PendingOutcome(self.step, time.perf_counter() - started, outcome))

    def _settle(self, everything: bool) -> None:
        """Take in the outcomes of the steps done: all of them (the host waits for the device), or
        all but the newest, whose values are still on their way (no wait). Counts skipped steps,
        notes an agreed stop, calls the step callbacks.

        Raises:
            TrainingDiverged: when skipped steps in a row reach their patience.
        """
        while len(self._pending) > (0 if everything else 1):
            outcome = self._pending.popleft().read()
            self.watchdog.beat(outcome.step)
            self._stopped = self._stopped or outcome.stop
            self._unlogged_losses.append(outcome.loss)
            if not outcome.skipped:
                self._last_loss = outcome.loss
            for callback in self._step_callbacks:
                callback(self, StepInfo(outcome.step, outcome.wall_s, outcome.loss))
            self.guard.account(outcome)

    def _save_unless_in_streak(self) -> None:
        """Checkpoint now, unless the newest steps were skipped (non-finite or spike): then
        ``latest`` keeps naming the checkpoint from before the streak, which a run that diverges
        leaves for its resume.

        Raises:
            TrainingDiverged: when the weights are no longer finite although the loss was (a
                non-finite gradient): no training can follow, and no checkpoint is written.
        """
        self._settle(everything=True)
        if self.guard.in_streak:
            logger.warning("step %d: no checkpoint while skipped steps run in a row (since step %d); latest "
                           "stays %s", self.step, self.guard.streak_start, self._latest_checkpoint() or "none")
            return
        spoiled = int(dist.sum_across_ranks(nonfinite_weights(self.engine.module)).item())
        if spoiled:
            raise TrainingDiverged(
                f"step {self.step}: {spoiled} weight values are NaN/inf although the loss was finite (a non-finite "
                "gradient); no checkpoint written. Lower optim.lr, or find the operation with "
                "torch.autograd.set_detect_anomaly(True)", self.step, self.step)
        self._save()

    def _latest_checkpoint(self) -> Optional[str]:
        """The checkpoint this run's ``latest`` names, if any."""
        latest = self.checkpointer.latest()
        return None if latest is None else str(latest.path)

    def _unclipped_grad_norm(self) -> Optional[torch.Tensor]:
        """Gradient norm where DeepSpeed keeps none (ZeRO-0 in fp32 without clipping): the
        module's gradients are whole and already averaged over ranks at the boundary. Only
        computed on log steps."""
        if (self.cfg.deepspeed.zero_stage != 0 or self.cfg.train.grad_clip > 0
                or self.dtype != torch.float32 or (self.step + 1) % self.cfg.logging.every_steps):
            return None
        grads = [p.grad.detach().float() for p in self.engine.module.parameters() if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))

    def _summed_over_ranks(self, counts: dict[str, int]) -> dict[str, float]:
        """Per-rank counters summed over all ranks (a collective: every rank calls it)."""
        keys = sorted(counts)
        if not keys:
            return {}
        totals = dist.sum_across_ranks(torch.tensor([float(counts[k]) for k in keys], device=self.device))
        return dict(zip(keys, totals.tolist()))

    def _log_train(self) -> None:
        """TensorBoard scalars and a log line for the settled steps since the last log (a
        collective: every rank calls it at the same step)."""
        finite = [x for x in self._unlogged_losses if x == x]
        self._unlogged_losses = []
        values = {
            "train/loss": sum(finite) / len(finite) if finite else float("nan"),
            "train/lr": self.optimizer.param_groups[0]["lr"] / self.optimizer.param_groups[0].get("lr_scale", 1.0),
            "train/epoch": self.epoch + (self.step - self.epoch * self.steps_per_epoch) / self.steps_per_epoch,
            "train/nonfinite_steps": float(self.guard.nonfinite_steps),
            "memory/peak_gb": peak_memory_gb(self.device),
            **self.throughput.summary(),
        }
        values.update(self.stragglers.summary(values["perf/data_wait_s"], self.step))  # a collective
        if self.cfg.train.spike_threshold > 0:
            values["train/spike_steps"] = float(self.guard.spike_steps)
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = self._grad_norm if grad_norm is None else grad_norm
        if grad_norm is not None:
            values["train/grad_norm"] = float(grad_norm)
        skips = self._summed_over_ranks(self.train_stream.skip_counts())
        values.update(skip_scalars("train", skips))
        self.tensorboard.scalars(values, self.step)
        if self.env.is_main:
            logger.info("step %d/%d loss %.4f lr %.3g %.0f samples/s %.2f TFLOP/s/device data wait %.3fs",
                        self.step, self.total_steps, values["train/loss"], values["train/lr"],
                        values["perf/samples_per_s"], values["perf/tflops_per_device"],
                        values["perf/data_wait_s"])

    # ------------------------------------------------------------------ checkpoints
    def _save(self) -> None:
        meta = dataclasses.replace(self.run_meta, step=self.step, epoch=self.epoch,
                                   anchor_mix=tuple(autotune.decisions()))
        with self.watchdog.excused("checkpoint"):
            self.checkpointer.save(meta, client_state={"config": to_dict(self.cfg)})

    def state_dict(self) -> dict[str, Any]:
        """The trainer's own counters, for the checkpoint (shared by all ranks)."""
        return {"epoch": self.epoch, "step": self.step, "best_metric": self.best_metric}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the counters of a checkpoint."""
        self.epoch, self.step, self.best_metric = int(state["epoch"]), int(state["step"]), state["best_metric"]

    # ------------------------------------------------------------------ summary
    def _totals(self) -> dict[str, float]:
        totals = {"run/nonfinite_steps": float(self.guard.nonfinite_steps),
                  "run/elapsed_s": time.perf_counter() - self._start_time,
                  "run/flops_per_sample": self.flops_per_sample}
        if self.cfg.train.spike_threshold > 0:
            totals["run/spike_steps"] = float(self.guard.spike_steps)
        if self.best_metric is not None:
            totals[f"run/best_{self.task.main_metric}"] = self.best_metric
        skips = self._summed_over_ranks(self.train_stream.skip_counts())
        totals.update(skip_scalars("train", skips))
        return totals

    def _write_summary(self, result: FitResult, diverged: Optional[TrainingDiverged] = None) -> None:
        if not self.env.is_main:
            return
        summary = {**asdict(result), "run_dir": str(self.folder.root),
                   "tensorboard": str(self.folder.tensorboard),
                   "checkpoints": str(self.checkpointer.folder.path),
                   "latest_checkpoint": self._latest_checkpoint(),
                   "resumed_from": str(self.resumed.tag_dir) if self.resumed else None,
                   "anchor_mix": autotune.decisions(),
                   "requeues": FailureLedger(self.folder).history()}
        if diverged is not None:
            summary["diverged"] = {"first_step": diverged.first_step, "last_step": diverged.last_step,
                                   "reason": str(diverged)}
        atomic_write_bytes(self.folder.summary, json.dumps(summary, indent=2).encode())

