"""Translate our typed config into DeepSpeed's JSON config (the only place that knows its keys)."""
from __future__ import annotations

import logging
from typing import Any

from anchorformer.config import RootConfig, check_world_size

__all__ = ["build"]

logger = logging.getLogger(__name__)


def build(cfg: RootConfig, world_size: int) -> dict[str, Any]:
    """DeepSpeed config for ``cfg`` on ``world_size`` data-parallel ranks.

    The learning-rate schedule is not in it: the trainer sets the lr of every parameter group
    each step (layer-wise decay needs per-group scales).

    Args:
        cfg: validated configuration.
        world_size: number of data-parallel processes.

    Returns:
        A dict for ``deepspeed.initialize(config=...)``.
    """
    accumulation = check_world_size(cfg, world_size)
    ds = cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update(overlap_comm=ds.overlap_comm, contiguous_gradients=ds.contiguous_gradients,
                    reduce_bucket_size=ds.reduce_bucket_size)
    if ds.zero_stage in (1, 2):
        zero["allgather_bucket_size"] = ds.allgather_bucket_size
    if ds.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=ds.stage3_prefetch_bucket_size,
                    stage3_param_persistence_threshold=ds.stage3_param_persistence_threshold,
                    stage3_max_live_parameters=ds.stage3_max_live_parameters,
                    stage3_gather_16bit_weights_on_model_save=False)
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": ds.offload_optimizer, "pin_memory": True}
    if ds.offload_param != "none":
        zero["offload_param"] = {"device": ds.offload_param, "pin_memory": True}

    config: dict[str, Any] = {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": zero,
        # Our torch optimizer runs on offloaded CPU partitions too (no compiled CPU-Adam op needed).
        "zero_force_ds_cpu_optimizer": False,
        # DeepSpeed knows optimizers by exact class; ours subclass torch's AdamW / SGD (skippable step).
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        # bf16-mixed: the weights stay fp32 and torch.autocast runs the engine's forward in bf16
        "torch_autocast": {"enabled": cfg.train.precision == "bf16-mixed", "dtype": "bfloat16"},
        "fp16": {"enabled": cfg.train.precision == "fp16",
                 "loss_scale": 0,
                 "initial_scale_power": ds.fp16_initial_scale_power,
                 "loss_scale_window": ds.fp16_loss_scale_window},
        "wall_clock_breakdown": ds.wall_clock_breakdown,
        # DeepSpeed's own progress prints would interleave with ours.
        "steps_per_print": 2**62,
    }
    if ds.communication_data_type is not None:
        config["communication_data_type"] = ds.communication_data_type
    logger.debug("DeepSpeed config: %s", config)
    return config
