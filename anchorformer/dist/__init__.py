"""Distributed plumbing: launcher detection, this rank's device, process group lifetime and the
collectives the trainer needs. Nothing outside this package calls torch.distributed directly."""
from anchorformer.dist.collectives import (
    all_gather_objects, all_gather_tensor, barrier, broadcast_object, in_lockstep, is_distributed, rank, rng_state,
    seed_everything, seed_for_step, set_rng_state, sum_across_ranks, world_size,
)
from anchorformer.dist.device import resolve_device, uses_cuda
from anchorformer.dist.env import (
    DistEnv, detect, init, launch_attempt, shutdown, slurm_first_host, slurm_port,
)

__all__ = [
    "DistEnv", "detect", "init", "launch_attempt", "shutdown", "slurm_first_host", "slurm_port", "uses_cuda",
    "resolve_device",
    "is_distributed", "rank", "world_size", "sum_across_ranks", "barrier", "all_gather_objects", "all_gather_tensor",
    "broadcast_object", "in_lockstep", "seed_everything", "seed_for_step", "rng_state", "set_rng_state",
]
