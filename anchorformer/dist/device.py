"""The device a rank trains on, from the ``train.device`` choice (``auto``, ``cuda`` or ``cpu``)."""
from __future__ import annotations

import torch

from anchorformer.dist.env import DistEnv

__all__ = ["uses_cuda", "resolve_device"]


def uses_cuda(device: str) -> bool:
    """Whether a run trains on GPUs: ``device`` is cuda, or auto with CUDA visible.

    Args:
        device: the ``train.device`` choice.

    Raises:
        ValueError: for cuda without a visible CUDA device.
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def resolve_device(device: str, env: DistEnv) -> torch.device:
    """The device of this rank: its local GPU when the run uses CUDA, else the CPU.

    Args:
        device: the ``train.device`` choice.
        env: this process's place in the job.

    Raises:
        ValueError: when the process group's backend does not fit the device (nccl needs GPUs).
    """
    cuda = uses_cuda(device)
    if cuda != (env.backend == "nccl"):
        raise ValueError(f"train.device={device} trains on {'GPU' if cuda else 'CPU'} but the "
                         f"process group uses {env.backend}; detect the environment with "
                         f"dist.detect(cuda_available=dist.uses_cuda(cfg.train.device))")
    return torch.device("cuda", env.local_rank) if cuda else torch.device("cpu")
