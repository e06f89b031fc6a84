"""Folders checked before anything is written to them, and the disk a folder uses, in words.

(Atomic writes, which every layer uses, are in :mod:`mbu.base.files`.)
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


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
