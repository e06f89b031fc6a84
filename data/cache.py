"""The decoded, resized uint8 data set on disk: one decode per data set, shared by every trial.

An entry is keyed by what decoding depends on: every source file's path, size
and modification time, the resolution, the crop and whether unreadable files
were skipped. A changed folder therefore gets a new key and is decoded again;
a stale entry is never served. Entries are two files written atomically
(temporary name, then rename): ``<key>.npy`` (the images, read back without
pickle) and ``<key>.json`` (the kept and skipped files, the shape). Several
workers may write the same entry at once; the last rename wins and both
copies are identical.

The folder is ``$MBU_CACHE_DIR`` when set, else ``~/.cache/mbu/decoded``.
Deleting it is always safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mbu.base.files import atomic_write

CACHE_ENV = "MBU_CACHE_DIR"
FORMAT_VERSION = 1  # bump when the decoding itself changes, so old entries are not reused


def cache_dir() -> Path:
    configured = os.environ.get(CACHE_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "mbu" / "decoded"


@dataclass
class CachedDomain:
    images: np.ndarray  # (N, 3, S, S) uint8
    paths: list[Path]  # the files kept, in order
    skipped: list[str]  # "path: reason" for each file left out with skip_bad


def cache_key(paths: list[Path], resize: int, crop: int | None, skip_bad: bool) -> str:
    """A digest of the file list (path, size, mtime), resolution, crop and skip mode."""
    digest = hashlib.sha256()
    digest.update(json.dumps([FORMAT_VERSION, resize, crop, skip_bad]).encode())
    for path in paths:
        stat = path.stat()
        digest.update(f"\n{path.resolve()}\t{stat.st_size}\t{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:32]


def load(key: str) -> CachedDomain | None:
    """The entry for ``key``, or None when absent or unreadable (then it is decoded again)."""
    folder = cache_dir()
    array_file, meta_file = folder / f"{key}.npy", folder / f"{key}.json"
    if not (array_file.is_file() and meta_file.is_file()):
        return None
    try:
        meta = json.loads(meta_file.read_text())
        images = np.load(array_file, allow_pickle=False)
        if list(images.shape) != meta["shape"] or images.dtype != np.uint8:
            raise ValueError(f"shape {images.shape} {images.dtype}, expected {meta['shape']} uint8")
    except (OSError, ValueError, KeyError) as err:
        warnings.warn(f"ignoring unreadable decode cache entry {array_file}: {err}", stacklevel=2)
        return None
    return CachedDomain(images, [Path(p) for p in meta["paths"]], list(meta["skipped"]))


def cached_count(key: str) -> int | None:
    """How many images the entry for ``key`` holds, from its small JSON record alone; None when absent."""
    folder = cache_dir()
    array_file, meta_file = folder / f"{key}.npy", folder / f"{key}.json"
    if not (array_file.is_file() and meta_file.is_file()):
        return None
    try:
        return int(json.loads(meta_file.read_text())["shape"][0])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None  # unreadable: decoded again, as :func:`load` would


def store(key: str, entry: CachedDomain) -> None:
    """Write the entry atomically; a failure to write (disk full, read-only) only warns."""
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"shape": list(entry.images.shape), "paths": [str(p) for p in entry.paths], "skipped": entry.skipped}
        atomic_write(folder / f"{key}.npy", lambda tmp: _save_array(tmp, entry.images))
        atomic_write(folder / f"{key}.json", lambda tmp: tmp.write_text(json.dumps(meta)))
    except OSError as err:
        warnings.warn(f"could not write the decode cache in {folder}: {err}", stacklevel=2)


def _save_array(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would add ".npy" to the temporary name
        np.save(f, array, allow_pickle=False)
