"""In-process Trainer runs without shards, shared by tests/test_engine.py and
tests/test_engine_distributed.py (imported explicitly).

The data is an in-memory synthetic set split so that the samples of global optimizer step k are
the same whatever the world size and accumulation: rank r's micro-batch a of step k is slice
``a * world + r`` of global batch k. The anchorformer imports are inside the functions: a launched
worker imports this module before its process group (and DeepSpeed's accelerator) is set up.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch

STEPS = 4
"""train.max_steps of :func:`synthetic_config`."""
GLOBAL_BATCH = 8
"""train.global_batch_size of :func:`synthetic_config` (64 samples: 8 steps per epoch)."""


class SyntheticStream:
    """Deterministic in-memory training stream implementing the TrainStream contract."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, rank: int, world: int,
                 micro: int, seed: int):
        self.images, self.labels = images, labels
        self.rank, self.world, self.micro, self.seed = rank, world, micro, seed
        self.steps_per_epoch = len(labels) // (micro * world)
        self._epoch, self._batches = 0, 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.labels), generator=torch.Generator().manual_seed(self.seed + self._epoch))
        while self._batches < self.steps_per_epoch:
            slot = self._batches * self.world + self.rank  # global micro-batch index
            index = order[slot * self.micro:(slot + 1) * self.micro]
            self._batches += 1
            yield self.images[index], self.labels[index]

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "batches": self._batches}

    def load_state_dict(self, state: dict) -> None:
        self._epoch, self._batches = state["epoch"], state["batches"]

    def skip_counts(self) -> dict[str, int]:
        return {"corrupt": 0}


def synthetic_task_class():
    """A ClassificationTask subclass whose data is the synthetic split above instead of shards."""
    from anchorformer.tasks.classification import ClassificationTask

    class SyntheticTask(ClassificationTask):
        """Classification with the synthetic split above instead of shards."""

        def build_data(self) -> dict[str, Any]:
            generator = torch.Generator().manual_seed(1234)
            size = self.cfg.model.img_size
            images = torch.randn(64, 3, size, size, generator=generator)
            labels = torch.randint(0, self.cfg.model.num_classes, (64,), generator=generator)
            env = self.runtime.env
            train = SyntheticStream(images, labels, env.rank, env.world_size,
                                    self.cfg.train.micro_batch_size, self.cfg.train.seed)
            val = [(images[i:i + 5], labels[i:i + 5]) for i in range(env.rank * 5, 32, 5 * env.world_size)]
            return {"train": train, "val": val}

    return SyntheticTask


def synthetic_config(out: Path, name: str, stage: int, micro: int, persistence: int = 0, **train: Any):
    """A tiny fp32 CPU AnchorFormer run of STEPS steps in ``out/name`` under ZeRO ``stage``, a log
    every step, no checkpoint before the end; ``train`` replaces keys of the train section."""
    from anchorformer import config

    return config.from_dict({
        "model": {"name": "anchorformer_tiny_patch16_224", "num_classes": 10, "img_size": 16,
                  "drop_path_rate": 0.0, "patch_size": 4, "depth": 2, "embed_dim": 48, "num_heads": 2,
                  "num_anchors": 8},
        "data": {"source": "embedded", "image_size": 16},
        "optim": {"lr": 1e-3, "lr_reference_batch": 0},
        "schedule": {"epochs": 2, "warmup_epochs": 0.5},
        "train": {"global_batch_size": GLOBAL_BATCH, "micro_batch_size": micro, "precision": "fp32",
                  "device": "cpu", "max_steps": STEPS, "resume": "none", **train},
        "deepspeed": {"zero_stage": stage, "stage3_param_persistence_threshold": persistence},
        "checkpoint": {"every_steps": 0, "at_epoch_end": False},
        "logging": {"output_dir": str(out), "run_name": name, "every_steps": 1, "progress_bar": False},
    })


def cpu_runtime(env):
    """The fp32 CPU Runtime of this rank, for building a task outside the Trainer."""
    from anchorformer.tasks import Runtime

    return Runtime(env=env, device=torch.device("cpu"), dtype=torch.float32)


def logged_scalars(run_dir: Path, tag: str) -> list[float]:
    """Values of ``tag`` in the run's TensorBoard events, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from anchorformer.run_folder import RunFolder

    events = EventAccumulator(str(RunFolder(run_dir).tensorboard))
    events.Reload()
    return [e.value for e in sorted(events.Scalars(tag), key=lambda event: event.step)]


def logged_texts(log_dir: Path) -> dict[str, str]:
    """The last text of every text tag (``config``, ``anchor_mix``, ...) in a TensorBoard folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    events.Reload()
    suffix = "/text_summary"
    return {tag[:-len(suffix)]: events.Tensors(tag)[-1].tensor_proto.string_val[0].decode()
            for tag in events.Tags()["tensors"] if tag.endswith(suffix)}
