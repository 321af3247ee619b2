"""Exports that appear only once they are proven: every file of an export is first written under its
final name in a hidden staging folder beside the destination, checked there (loaded the way users
load it, compared with the source model), and only then moved into place, each file atomically; a
failed write or check leaves the destinations as they were and removes the staging folder."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Sequence

from anchorformer.atomic import atomic_output

__all__ = ["staged_outputs"]


@contextlib.contextmanager
def staged_outputs(outputs: Sequence[Path], root: Optional[Path] = None) -> Iterator[list[Path]]:
    """Staging paths for ``outputs``: the same layout relative to ``root`` inside one staging folder.

    Args:
        outputs: the destinations; their folders are created when the checks have passed.
        root: the folder that holds the staging folder (default: the first output's folder,
            created if missing). An export folder stages whole with its parent as ``root``:
            ``FOLDER/config.json`` stages as ``STAGING/FOLDER/config.json``, so the staged
            folder loads like the final one.

    Yields:
        One staging path per output, in order, not yet created. When the block ends without an
        error each staged file is moved over its output; otherwise nothing is moved.
    """
    outputs = [Path(output).resolve() for output in outputs]
    root = Path(root).resolve() if root is not None else outputs[0].parent
    root.mkdir(parents=True, exist_ok=True)
    relative = [output.relative_to(root) for output in outputs]
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{relative[0].parts[0]}.staging-"))
    try:
        staged = [staging / path for path in relative]
        for path in staged:
            path.parent.mkdir(parents=True, exist_ok=True)
        yield staged
        for path, output in zip(staged, outputs):
            output.parent.mkdir(parents=True, exist_ok=True)
            path.chmod(0o644)  # safetensors writes owner-only files; exports are read by other users' jobs
            with atomic_output(output) as tmp:
                os.replace(path, tmp)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
