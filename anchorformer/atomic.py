"""Files that appear whole or not at all: each is written under a temporary name in its own folder,
flushed to disk (fsync) and renamed over the destination, which ``os.replace`` does atomically on
one file system. A reader (another rank, a resumed run, a crash's survivor) sees the old file or the
new one, never a torn one. The bottom layer: imports only the standard library (torch on demand).
"""
from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Any, Iterator

__all__ = ["atomic_output", "atomic_write_bytes", "atomic_torch_save"]


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for the caller to write; when the block ends without an
    error it is fsynced and renamed over ``path``, else removed (``path`` is left as it was).

    Args:
        path: the destination; its folder must exist.

    Yields:
        The temporary path (hidden, ``.{name}.{pid}.{random}.tmp``), not yet created.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        descriptor = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(descriptor)  # the data reaches the disk before the rename can
        finally:
            os.close(descriptor)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` atomically (see :func:`atomic_output`)."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(payload)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj)`` to ``path`` atomically (see :func:`atomic_output`)."""
    import torch  # on demand: the rest of this module needs only the standard library

    with atomic_output(path) as tmp:
        torch.save(obj, tmp)
