"""Images in, uint8 tensors out: the two on-disk layouts and decode-once loading.

A data root is either the folder layout (``trainA/ trainB/ testA/ testB/``)
or the reference's list-file layout (``trainA.txt`` ... with one image path a
line, absolute or relative to the root). Each image is decoded, converted to
RGB, optionally centre-cropped to ``crop`` pixels (a data root's
``mbu_data.json`` says how it was prepared), resized so its shorter side is
``resize`` and centre-cropped to a square, once; training then indexes the
uint8 tensor, and the decoded tensor is kept in the on-disk cache of
:mod:`data.cache`.
"""

from __future__ import annotations

import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from mbu.data import cache

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
MASK_FOLDER_SUFFIX = "_masks"
MIN_ANNOTATED = 2  # annotated test A images a scoring needs: a validation half (choosing the threshold) and a test half
DATASET_FILE = "mbu_data.json"  # written by ``mbu data ...``: how the root was prepared (crop, source)


class DataError(ValueError):
    """Bad input data: the message names the file or folder and the problem."""


@dataclass
class DomainImages:
    """One split of one domain, decoded: (N, 3, S, S) uint8 and the source paths."""

    images: torch.Tensor
    paths: list[Path]
    skipped: list[str] = field(default_factory=list)  # "path: reason" of files left out by skip_bad

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


def read_crop(root: Path) -> int | None:
    """The centre crop recorded in the root's ``mbu_data.json``, if any."""
    meta = Path(root) / DATASET_FILE
    if not meta.is_file():
        return None
    try:
        crop = json.loads(meta.read_text()).get("crop")
    except (ValueError, AttributeError) as err:
        raise DataError(f"cannot read {meta}: {err}") from err
    if crop is not None and (not isinstance(crop, int) or crop <= 0):
        raise DataError(f"{meta}: crop must be a positive number of pixels, got {crop!r}")
    return crop


def _square(image: Image.Image, resize: int, resample: Image.Resampling, crop: float | None = None) -> Image.Image:
    """Optional centre crop of ``crop`` pixels, shorter side to ``resize``, centre crop to a square."""
    if crop:
        w, h = image.size
        cw, ch = min(w, round(crop)), min(h, round(crop))
        left, top = (w - cw) // 2, (h - ch) // 2
        image = image.crop((left, top, left + cw, top + ch))
    w, h = image.size
    scale = resize / min(w, h)
    new_w, new_h = max(resize, round(w * scale)), max(resize, round(h * scale))
    image = image.resize((new_w, new_h), resample)
    left, top = (new_w - resize) // 2, (new_h - resize) // 2
    return image.crop((left, top, left + resize, top + resize))


def decode_image(path: Path | BinaryIO, resize: int, crop: int | None = None) -> np.ndarray:
    """(S, S, 3) uint8 RGB of an image file or open binary file; any mode (grey, palette, RGBA, 16-bit) is converted."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16-bit greyscale: scale to 8 bits before the RGB conversion clips it.
                image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).astype(np.uint8))
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        name = path if isinstance(path, (str, Path)) else "given as bytes"
        raise DataError(f"cannot read image {name}: {err}") from err
    return np.array(_square(rgb, resize, Image.Resampling.BICUBIC, crop))


def decode_image_bytes(data: bytes, resize: int) -> torch.Tensor:
    """(3, S, S) uint8 of an encoded image (PNG, JPEG, ...), resized exactly as :func:`decode_image` does."""
    return torch.from_numpy(decode_image(io.BytesIO(data), resize)).permute(2, 0, 1).contiguous()


def decode_image_array(pixels: np.ndarray, resize: int) -> torch.Tensor:
    """(3, S, S) uint8 of an H x W x 3 uint8 RGB array, resized exactly as :func:`decode_image` does."""
    square = _square(Image.fromarray(np.ascontiguousarray(pixels)), resize, Image.Resampling.BICUBIC)
    return torch.from_numpy(np.array(square)).permute(2, 0, 1).contiguous()


def decode_mask(path: Path, resize: int, crop: float | None = None) -> np.ndarray:
    """(S, S) bool, resized with nearest neighbour so it stays binary."""
    try:
        with Image.open(path) as image:
            image.load()
            grey = image.convert("L")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(f"cannot read mask {path}: {err}") from err
    return np.array(_square(grey, resize, Image.Resampling.NEAREST, crop)) > 127


def _image_size(path: Path, what: str = "image") -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(f"cannot read {what} {path}: {err}") from err


def decode_images(
    paths: list[Path],
    resize: int,
    desc: str = "decode",
    progress: bool = False,
    crop: int | None = None,
    skip_bad: bool = False,
) -> tuple[torch.Tensor, list[Path], list[str]]:
    """(N, 3, S, S) uint8 of every readable image, the paths kept, and "path: reason" per file skipped.

    Without ``skip_bad`` the first unreadable file raises :class:`DataError`.
    """
    out = torch.empty((len(paths), 3, resize, resize), dtype=torch.uint8)
    kept: list[Path] = []
    skipped: list[str] = []
    for path in tqdm(paths, desc=desc, disable=not progress, unit="img"):
        try:
            array = decode_image(path, resize, crop)
        except DataError as err:
            if not skip_bad:
                raise
            skipped.append(f"{path}: {err.__cause__ or err}")
            continue
        out[len(kept)] = torch.from_numpy(array).permute(2, 0, 1)
        kept.append(path)
    return out[: len(kept)], kept, skipped


def load_domain(
    root: Path, name: str, resize: int, progress: bool = True, skip_bad: bool = False, use_cache: bool = True
) -> DomainImages:
    """Every image of ``root/name`` as one uint8 tensor, decoded once and then read from the disk cache."""
    paths = list_images(root, name)
    crop = read_crop(root)
    key = cache.cache_key(paths, resize, crop, skip_bad) if use_cache else ""
    hit = cache.load(key) if use_cache else None
    if hit is not None:
        domain = DomainImages(torch.from_numpy(hit.images), hit.paths, hit.skipped)
    else:
        domain = _decode_domain(root, name, paths, resize, crop, progress, skip_bad)
        if use_cache:
            cache.store(key, cache.CachedDomain(domain.images.numpy(), domain.paths, domain.skipped))
    if domain.skipped:
        shown = "".join(f"\n  {line}" for line in domain.skipped[:10])
        more = f"\n  ... and {len(domain.skipped) - 10} more" if len(domain.skipped) > 10 else ""
        print(f"warning: skipped {len(domain.skipped)} unreadable image(s) in {name}:{shown}{more}", file=sys.stderr)
    return domain


def _decode_domain(
    root: Path, name: str, paths: list[Path], resize: int, crop: int | None, progress: bool, skip_bad: bool
) -> DomainImages:
    images, kept, skipped = decode_images(paths, resize, f"decode {name}", progress, crop, skip_bad)
    if not kept:
        raise DataError(f"no readable image in {root}/{name} ({len(skipped)} skipped)")
    return DomainImages(images, kept, skipped)


@dataclass
class DomainsRead:
    """What :func:`read_domains` found: images per domain, and the decodings not yet in the cache."""

    counts: dict[str, int]  # domain name -> images a training would use
    pending: list[tuple[str, cache.CachedDomain]] = field(default_factory=list)  # (cache key, entry)

    def commit(self) -> None:
        """Put the new decodings in the decode cache, where :func:`load_domain` then finds them."""
        for key, entry in self.pending:
            cache.store(key, entry)
        self.pending = []


def read_domains(
    root: Path, names: tuple[str, ...], resize: int, progress: bool = True, skip_bad: bool = False
) -> DomainsRead:
    """Check that a training can read every domain, and count the images it would use of each.

    A domain already in the decode cache is answered from the cache's record; any other is
    decoded now (an unreadable file raises :class:`DataError` naming it, unless ``skip_bad``).
    Nothing is written: :meth:`DomainsRead.commit` caches the new decodings once the caller has
    accepted them, so a refused run leaves no trace and an accepted one decodes nothing twice.
    """
    result = DomainsRead({})
    for name in names:
        paths = list_images(root, name)
        crop = read_crop(root)
        key = cache.cache_key(paths, resize, crop, skip_bad)
        count = cache.cached_count(key)
        if count is None:
            domain = _decode_domain(root, name, paths, resize, crop, progress, skip_bad)
            result.pending.append((key, cache.CachedDomain(domain.images.numpy(), domain.paths, domain.skipped)))
            count = len(domain)
        result.counts[name] = count
    return result


@dataclass
class AnnotatedImages:
    """Test A images that have a ground-truth mask: (N, 3, S, S) uint8 and (N, S, S) bool."""

    images: torch.Tensor
    masks: torch.Tensor
    names: list[str]
    unannotated: list[str] = field(default_factory=list)  # images of the split with no mask, left out


def count_annotated(root: Path, split: str = "test", masks_dir: Path | None = None) -> int | None:
    """How many ``{split}A`` images have a mask (by file stem), from the file names alone; None without masks."""
    root = Path(root)
    mask_dir = Path(masks_dir) if masks_dir is not None else root / f"{split}A{MASK_FOLDER_SUFFIX}"
    if not mask_dir.is_dir():
        return None
    stems = {p.stem for p in mask_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    return sum(p.stem in stems for p in list_images(root, f"{split}A"))


def pair_annotations(
    root: Path, split: str = "test", masks_dir: Path | None = None
) -> tuple[list[Path], dict[str, Path]]:
    """Every ``{split}A`` image, and the masks by file stem; from the file names alone (nothing decoded).

    ``masks_dir`` defaults to ``root/{split}A_masks/``. A mask without an image, or no mask at all, is an error.
    """
    mask_dir = Path(masks_dir) if masks_dir is not None else Path(root) / f"{split}A{MASK_FOLDER_SUFFIX}"
    if not mask_dir.is_dir():
        raise DataError(f"no ground-truth masks: {mask_dir} does not exist")
    masks = {p.stem: p for p in mask_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    all_paths = list_images(Path(root), f"{split}A")
    orphans = sorted(set(masks) - {p.stem for p in all_paths})
    if orphans:
        raise DataError(f"{mask_dir} has masks whose name matches no {split}A image, e.g. {orphans[:3]}")
    if not any(p.stem in masks for p in all_paths):
        raise DataError(f"none of the {split}A images has a mask in {mask_dir}")
    return all_paths, masks


def load_annotated(
    root: Path, resize: int, split: str = "test", progress: bool = True, masks_dir: Path | None = None
) -> AnnotatedImages:
    """``{split}A`` images paired by file stem with the binary masks of ``masks_dir``.

    ``masks_dir`` defaults to ``root/{split}A_masks/``. A mask must have its
    image's aspect ratio (any scale: it is resized with nearest neighbour).
    Images without a mask are left out of scoring; a mask without an image, or
    no mask at all, is an error.
    """
    root = Path(root)
    all_paths, masks = pair_annotations(root, split, masks_dir)
    paths = [p for p in all_paths if p.stem in masks]
    crop = read_crop(root)
    images = torch.empty((len(paths), 3, resize, resize), dtype=torch.uint8)
    truth = torch.empty((len(paths), resize, resize), dtype=torch.bool)
    for i, path in enumerate(tqdm(paths, desc=f"decode {split}A + masks", disable=not progress, unit="img")):
        mask_path = masks[path.stem]
        (iw, ih), (mw, mh) = _image_size(path), _image_size(mask_path, "mask")
        if mw * ih != iw * mh:
            raise DataError(f"mask {mask_path} is {mw}x{mh} but its image {path} is {iw}x{ih} (aspect ratios differ)")
        images[i] = torch.from_numpy(decode_image(path, resize, crop)).permute(2, 0, 1)
        # The crop is in image pixels; a mask stored at another scale is cropped in proportion.
        mask_crop = crop * mw / iw if crop else None
        truth[i] = torch.from_numpy(decode_mask(mask_path, resize, mask_crop))
    unannotated = [p.name for p in all_paths if p.stem not in masks]
    return AnnotatedImages(images, truth, [p.name for p in paths], unannotated)


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] → float [-1, 1], on the tensor's device."""
    return images.float().div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] → uint8 [0, 255]."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def load_display_images(
    root: Path, resize: int, count: int, skip_bad: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` (readable, with ``skip_bad``) images of each domain for grids: test split, else train."""
    out = []
    for domain in ("A", "B"):
        try:
            paths = list_images(root, f"test{domain}")
        except DataError:
            paths = list_images(root, f"train{domain}")
        images, kept, _ = decode_images(
            paths[: 2 * count] if skip_bad else paths[:count], resize, crop=read_crop(root), skip_bad=skip_bad
        )
        out.append(images[:count])
    return out[0], out[1]
