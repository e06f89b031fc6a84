"""Atomic file writes: a reader (or a crash) never sees half a file.

Shared by checkpoints, reports and the decode cache; the disk a folder uses, in words.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


class WriteError(OSError):
    """A file could not be written (disk full, over a file-size limit, ...); the previous one is intact."""


def check_writable(path: Path, what: str) -> None:
    """Refuse, before anything is written, a path that cannot become a writable folder."""
    path = Path(path).absolute()
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(f"{what} {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} {path}: no permission to write in {ancestor}")


def check_destination(dest: Path, marker: str, spec: dict[str, Any] | None = None) -> None:
    """Refuse to write a data set into ``dest`` unless it is new, empty, or this command's own.

    ``marker`` is the file the command leaves in a folder it wrote; with ``spec``, a folder
    written for another spec (the marker's JSON, less its ``counts``) is refused too.
    """
    dest = Path(dest)
    check_writable(dest, "destination")
    if not dest.is_dir() or not any(dest.iterdir()):
        return
    marker_path = dest / marker
    if not marker_path.is_file():
        raise FileExistsError(f"{dest} already holds files that mbu did not write there; give an empty or new folder")
    if spec is not None:
        stored = json.loads(marker_path.read_text())
        stored.pop("counts", None)
        wanted = json.loads(json.dumps(spec, default=str))
        if stored != wanted:
            changed = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
            raise FileExistsError(
                f"{dest} holds a data set prepared with other settings ({', '.join(changed)} differ); "
                "give a new folder, or delete this one to replace it"
            )


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
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        # torch.save reports a full disk as a RuntimeError; both name the file and the free space here.
        if isinstance(err, (OSError, RuntimeError)) and not isinstance(err, WriteError):
            free = shutil.disk_usage(path.parent).free // 2**20
            raise WriteError(f"cannot write {path} ({free} MiB free on its disk): {err}") from err
        raise


def disk_used(folder: Path) -> int:
    """Bytes of the files under ``folder`` (0 when it does not exist)."""
    if not folder.is_dir():
        return 0
    total = 0
    for path in folder.rglob("*"):
        try:
            total += path.stat().st_size if path.is_file() and not path.is_symlink() else 0
        except FileNotFoundError:  # another worker's temporary file, renamed away meanwhile
            continue
    return total


def human_bytes(count: int) -> str:
    """``123.4 MB`` style, in powers of 1000 as disks are sold."""
    if count < 1000:
        return f"{count} B"
    exponent = min(4, int(math.log10(count) // 3))
    return f"{count / 1000**exponent:.1f} {' kMGT'[exponent]}B"
