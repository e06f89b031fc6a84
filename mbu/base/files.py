"""Atomic file writes: a reader (or a crash) never sees half a file. Checkpoints, reports, JSON records
and the decode cache are all written this way."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mbu.base.command import UserError


class WriteError(UserError, OSError):
    """A file could not be written (disk full, over a file-size limit, ...); the previous one is intact."""


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)``, then rename over ``path``: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:  # its message would name the temporary file, which the user never sees
        raise WriteError(f"cannot write {path}: no file can be created in {path.parent} ({err.strerror})") from err
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes it private; a file as any other tool writes it
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        # torch.save reports a full disk as a RuntimeError; both name the file and the free space here.
        if isinstance(err, (OSError, RuntimeError)) and not isinstance(err, WriteError):
            free = shutil.disk_usage(path.parent).free // 2**20
            raise WriteError(f"cannot write {path} ({free} MiB free on its disk): {err}") from err
        raise


def _process_umask() -> int:
    """The process's umask. Reading it means setting it, which no other thread should see: read once, at import."""
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


UMASK = _process_umask()


def write_json(path: Path, data: Any) -> None:
    """``data`` as sorted, indented JSON, written atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))
