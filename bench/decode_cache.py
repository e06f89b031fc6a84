"""Time loading a CelebA-sized domain with and without the on-disk decode cache.

    python bench/decode_cache.py [--images 10000] [--resize 128] [--crop 178]

Writes ``--images`` JPEGs of 178x218 (the aligned CelebA size) with face-like
smooth content, then times, on the same files: decoding every image (what
each trial would do without the cache), the first cached load (decode and
write the cache entry) and a second cached load (what every later trial and
worker of a study does). Prints the seconds of each and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mbu.data.cache import CACHE_ENV  # noqa: E402
from mbu.data.images import DATASET_FILE, load_domain  # noqa: E402


def write_images(folder: Path, count: int, seed: int = 0) -> None:
    """JPEGs of 178x218: a smooth random field upsampled, so they compress like photos, not noise."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in tqdm(range(count), desc="write jpegs", unit="img"):
        coarse = rng.integers(0, 255, (14, 12, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((178, 218), Image.Resampling.BICUBIC)
        image.save(folder / f"{i:06d}.jpg", quality=90)


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000, help="images to write and load (default: %(default)s)")
    parser.add_argument("--resize", type=int, default=128, help="training resolution (default: %(default)s)")
    parser.add_argument("--crop", type=int, default=178, help="centre crop before resizing (default: %(default)s)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        write_images(root / "trainA", args.images)
        (root / DATASET_FILE).write_text(json.dumps({"crop": args.crop}))
        os.environ[CACHE_ENV] = str(Path(tmp) / "cache")

        def load(use_cache: bool):
            return load_domain(root, "trainA", args.resize, progress=False, use_cache=use_cache)

        no_cache, reference = timed(lambda: load(False))
        first, _ = timed(lambda: load(True))
        second, cached = timed(lambda: load(True))
        assert (cached.images == reference.images).all()
        size = sum(p.stat().st_size for p in (Path(tmp) / "cache").iterdir()) / 2**20
        print(f"{args.images} JPEGs of 178x218 -> {args.resize}px (crop {args.crop}), {os.cpu_count()} CPUs")
        print(f"decode, no cache        : {no_cache:8.2f} s")
        print(f"first load (fills cache): {first:8.2f} s")
        print(f"cached load             : {second:8.2f} s  ({size:.0f} MiB on disk)")
        print(f"speed-up, cached vs decode: {no_cache / second:.1f}x")


if __name__ == "__main__":
    main()
