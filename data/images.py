"""Images in, uint8 tensors out: the two on-disk layouts and decode-once loading.

A data root is either the folder layout (``trainA/ trainB/ testA/ testB/``)
or the reference's list-file layout (``trainA.txt`` ... with one image path a
line, absolute or relative to the root). Each image is decoded, converted to
RGB, resized so its shorter side is ``resize`` and centre-cropped to a square,
once; training then indexes the uint8 tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
MASK_FOLDER_SUFFIX = "_masks"


class DataError(ValueError):
    """Bad input data: the message names the file or folder and the problem."""


@dataclass
class DomainImages:
    """One split of one domain, decoded: (N, 3, S, S) uint8 and the source paths."""

    images: torch.Tensor
    paths: list[Path]

    def __len__(self) -> int:
        return len(self.paths)


def list_images(root: Path, name: str) -> list[Path]:
    """Paths of ``root/name`` (a folder) or ``root/name.txt`` (a list file), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root {root} is not a folder")
    folder, list_file = root / name, root / f"{name}.txt"
    if folder.is_dir():
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        source = folder
    elif list_file.is_file():
        lines = [line.strip() for line in list_file.read_text().splitlines()]
        paths = [(root / line) if not Path(line).is_absolute() else Path(line) for line in lines if line]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            shown = ", ".join(str(p) for p in missing[:3])
            raise DataError(f"{list_file} lists {len(missing)} missing file(s), e.g. {shown}")
        source = list_file
    else:
        raise DataError(f"{root} has neither a {name}/ folder nor a {name}.txt list file")
    if not paths:
        raise DataError(f"{source} holds no images (looked for {sorted(IMAGE_SUFFIXES)})")
    return paths


def _square(image: Image.Image, resize: int, resample: Image.Resampling) -> Image.Image:
    """Shorter side to ``resize``, then a centre crop to ``resize x resize``."""
    w, h = image.size
    scale = resize / min(w, h)
    new_w, new_h = max(resize, round(w * scale)), max(resize, round(h * scale))
    image = image.resize((new_w, new_h), resample)
    left, top = (new_w - resize) // 2, (new_h - resize) // 2
    return image.crop((left, top, left + resize, top + resize))


def decode_image(path: Path, resize: int) -> np.ndarray:
    """(S, S, 3) uint8 RGB; any mode (grey, palette, RGBA, 16-bit) is converted."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16-bit greyscale: scale to 8 bits before the RGB conversion clips it.
                image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).astype(np.uint8))
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(f"cannot read image {path}: {err}") from err
    return np.array(_square(rgb, resize, Image.Resampling.BICUBIC))


def decode_mask(path: Path, resize: int) -> np.ndarray:
    """(S, S) bool, resized with nearest neighbour so it stays binary."""
    try:
        with Image.open(path) as image:
            image.load()
            grey = image.convert("L")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(f"cannot read mask {path}: {err}") from err
    return np.array(_square(grey, resize, Image.Resampling.NEAREST)) > 127


def decode_images(paths: list[Path], resize: int, desc: str = "decode", progress: bool = False) -> torch.Tensor:
    """(N, 3, S, S) uint8: every image of ``paths`` decoded with :func:`decode_image`."""
    out = torch.empty((len(paths), 3, resize, resize), dtype=torch.uint8)
    for i, path in enumerate(tqdm(paths, desc=desc, disable=not progress, unit="img")):
        out[i] = torch.from_numpy(decode_image(path, resize)).permute(2, 0, 1)
    return out


def load_domain(root: Path, name: str, resize: int, progress: bool = True) -> DomainImages:
    """Decode every image of ``root/name`` once into a uint8 tensor."""
    paths = list_images(root, name)
    return DomainImages(decode_images(paths, resize, f"decode {name}", progress), paths)


@dataclass
class AnnotatedImages:
    """Test A images that have a ground-truth mask: (N, 3, S, S) uint8 and (N, S, S) bool."""

    images: torch.Tensor
    masks: torch.Tensor
    names: list[str]


def load_annotated(root: Path, resize: int, split: str = "test", progress: bool = True) -> AnnotatedImages:
    """``{split}A`` images paired by file stem with masks in ``{split}A_masks/``.

    Images without a mask are left out of scoring; a mask without an image, or
    no mask at all, is an error.
    """
    root = Path(root)
    mask_dir = root / f"{split}A{MASK_FOLDER_SUFFIX}"
    if not mask_dir.is_dir():
        raise DataError(f"no ground-truth masks: {mask_dir} does not exist")
    masks = {p.stem: p for p in mask_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    paths = [p for p in list_images(root, f"{split}A") if p.stem in masks]
    stems = {p.stem for p in paths}
    orphans = sorted(set(masks) - stems)
    if orphans:
        raise DataError(f"{mask_dir} has masks with no {split}A image, e.g. {orphans[:3]}")
    if not paths:
        raise DataError(f"none of the {split}A images has a mask in {mask_dir}")
    images = torch.empty((len(paths), 3, resize, resize), dtype=torch.uint8)
    truth = torch.empty((len(paths), resize, resize), dtype=torch.bool)
    for i, path in enumerate(tqdm(paths, desc=f"decode {split}A + masks", disable=not progress, unit="img")):
        images[i] = torch.from_numpy(decode_image(path, resize)).permute(2, 0, 1)
        truth[i] = torch.from_numpy(decode_mask(masks[path.stem], resize))
    return AnnotatedImages(images, truth, [p.name for p in paths])


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] → float [-1, 1], on the tensor's device."""
    return images.float().div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] → uint8 [0, 255]."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# Decoded domains kept for the life of the process, so the trials of a study
# run by one worker decode each image once. Keyed by every file's path, size
# and modification time: a changed folder is decoded again, never served stale.
_DECODED: dict[tuple, DomainImages] = {}
_DECODED_MAX = 4  # a train A and B pair at two resolutions, at most


def _listing_key(paths: list[Path], resize: int) -> tuple:
    stats = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
    return (resize, stats)


def load_domain_cached(root: Path, name: str, resize: int, progress: bool = True) -> DomainImages:
    """:func:`load_domain`, reusing this process's earlier decode of the same files."""
    key = _listing_key(list_images(root, name), resize)
    if key not in _DECODED:
        if len(_DECODED) >= _DECODED_MAX:
            _DECODED.pop(next(iter(_DECODED)))
        _DECODED[key] = load_domain(root, name, resize, progress)
    return _DECODED[key]


def load_display_images(root: Path, resize: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` images of each domain for grids: test split if present, else train."""
    out = []
    for domain in ("A", "B"):
        try:
            paths = list_images(root, f"test{domain}")
        except DataError:
            paths = list_images(root, f"train{domain}")
        out.append(decode_images(paths[:count], resize))
    return out[0], out[1]
