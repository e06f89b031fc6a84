"""``mbu data folders``: check a trainA/ trainB/ testA/ testB/ tree and write its list files.

What the reference's ``preprocess.py --folders`` meant to do (it crashed on every
call). Every image is opened and decoded once here, so a bad file is found now,
not hours into training; with ``skip_bad`` it is left out of the lists instead.
"""

from __future__ import annotations

import json
from pathlib import Path

from mbu.data.files import check_destination
from mbu.data.images import DATASET_FILE, IMAGE_SUFFIXES, MASK_FOLDER_SUFFIX, DataError, decode_images

SPLITS = ("trainA", "trainB", "testA", "testB")
CHECK_SIZE = 64  # decode at a small size: the check is whether the file reads, not how it looks


def prepare_folders(root: Path, dest: Path, skip_bad: bool = False, progress: bool = True) -> dict[str, int]:
    """Write ``dest/trainA.txt`` ... (absolute paths, sorted); returns the count per split."""
    root, dest = Path(root).resolve(), Path(dest)
    check_destination(dest, DATASET_FILE, {"source": "folders", "root": str(root), "crop": None})
    counts, skipped, lists = {}, [], {}
    for name in SPLITS:
        folder = root / name
        if not folder.is_dir():
            raise DataError(f"{folder} is not a folder (expected {', '.join(s + '/' for s in SPLITS)} in {root})")
        paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise DataError(f"{folder} holds no images (looked for {sorted(IMAGE_SUFFIXES)})")
        _, kept, bad = decode_images(paths, CHECK_SIZE, f"check {name}", progress, skip_bad=skip_bad)
        if not kept:
            raise DataError(f"no readable image in {folder}")
        lists[name], counts[name] = kept, len(kept)
        skipped += bad
    dest.mkdir(parents=True, exist_ok=True)
    for name, kept in lists.items():
        (dest / f"{name}.txt").write_text("".join(f"{p}\n" for p in kept))
    masks = root / f"testA{MASK_FOLDER_SUFFIX}"
    link = dest / masks.name
    if masks.is_dir() and dest.resolve() != root and not link.exists():
        link.symlink_to(masks, target_is_directory=True)  # mbu eval finds the masks beside the lists
    if skipped:
        (dest / "skipped_images.txt").write_text("".join(f"{line}\n" for line in skipped))
    meta = {"source": "folders", "root": str(root), "crop": None, "counts": counts}
    (dest / DATASET_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return counts
