"""Atomic file writes: a reader (or a crash) never sees half a file.

Shared by checkpoints, reports and the decode cache.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


class WriteError(OSError):
    """A file could not be written (disk full, over a file-size limit, ...); the previous one is intact."""


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)``, then rename over ``path``: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        # torch.save reports a full disk as a RuntimeError; both name the file and the free space here.
        if isinstance(err, (OSError, RuntimeError)) and not isinstance(err, WriteError):
            free = shutil.disk_usage(path.parent).free // 2**20
            raise WriteError(f"cannot write {path} ({free} MiB free on its disk): {err}") from err
        raise
