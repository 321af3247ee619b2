"""Constants and subprocess helpers shared by the tests (imported explicitly): the repository
root, the interpreter's script folder, and the environment of a CPU subprocess of the project."""
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
"""The repository root."""
BIN = Path(sys.executable).parent
"""The folder of this interpreter's console scripts (deepspeed, torchrun)."""


def cpu_env(**variables: str) -> dict[str, str]:
    """This process's environment for a subprocess on the CPU: DeepSpeed on its CPU accelerator,
    the repository importable, plus ``variables`` (e.g. ``OMP_NUM_THREADS="1"``)."""
    return dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO), **variables)
