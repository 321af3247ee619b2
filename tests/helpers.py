"""Constants and subprocess helpers shared by the tests (imported explicitly): the repository
root, the interpreter's script folder, the environment of a CPU subprocess of the project, and a
run folder's logged training losses."""
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
"""The repository root."""
BIN = Path(sys.executable).parent
"""The folder of this interpreter's console scripts (deepspeed, torchrun)."""


def cpu_env(**variables: str) -> dict[str, str]:
    """This process's environment for a subprocess on the CPU: DeepSpeed on its CPU accelerator,
    the repository importable, the PyTorch anchor mix (tests compare the losses of separate
    processes to the last bit; ``auto`` could time two close backends apart on a loaded machine),
    plus ``variables`` (e.g. ``OMP_NUM_THREADS="1"``)."""
    return {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "ANCHORFORMER_ANCHOR_MIX": "torch",
            **variables}


def train_losses(run_dir: Path) -> dict[int, float]:
    """train/loss per step from a run folder's TensorBoard files (a resumed run adds a file)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    losses: dict[int, float] = {}
    for events in sorted((run_dir / "tensorboard").glob("events.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        if "train/loss" in accumulator.Tags()["scalars"]:
            losses.update({e.step: e.value for e in accumulator.Scalars("train/loss")})
    return losses
