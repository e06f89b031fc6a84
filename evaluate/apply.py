"""Uses of a trained model on any images: transfer content, remove it (CPU or CUDA, batched)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from data.images import IMAGE_SUFFIXES, DataError, decode_images, to_model_range, to_uint8
from evaluate.report import load_model
from train.visuals import transfer_grids

DEFAULT_BATCH = 32


def collect_images(inputs: list[Path]) -> list[Path]:
    """Image files named directly, or found (sorted) in the folders named."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DataError(f"{item} holds no images")
            paths += found
        elif item.is_file():
            paths.append(item)
        else:
            raise DataError(f"{item} does not exist")
    if not paths:
        raise DataError("no input images given")
    return paths


def _load(paths: list[Path], resize: int, device: torch.device) -> torch.Tensor:
    return to_model_range(decode_images(paths, resize)[0].to(device))


def _save(image: torch.Tensor, path: Path) -> None:
    Image.fromarray(to_uint8(image).permute(1, 2, 0).cpu().numpy()).save(path)


def transfer(run_dir: Path, guides: list[Path], targets: list[Path], out: Path, device: str = "auto") -> list[Path]:
    """Content of every guide onto every target: single images and one grid. Returns the files written."""
    model, cfg, _ = load_model(run_dir, device)
    dev = next(model.parameters()).device
    guide_paths, target_paths = collect_images(guides), collect_images(targets)
    out.mkdir(parents=True, exist_ok=True)
    targets_t = _load(target_paths, cfg.resize, dev)
    written = []
    with torch.no_grad():
        for guide_path in guide_paths:
            guide = _load([guide_path], cfg.resize, dev).expand(len(targets_t), -1, -1, -1)
            result = model.transfer(guide, targets_t)
            for j, target_path in enumerate(target_paths):
                path = out / f"{guide_path.stem}__on__{target_path.stem}.png"
                _save(result[j], path)
                written.append(path)
        grid = transfer_grids(model, _load(guide_paths, cfg.resize, dev), targets_t)["transfer"]
    grid_path = out / "transfer_grid.png"
    Image.fromarray(grid).save(grid_path)
    return [*written, grid_path]


def remove(
    run_dir: Path,
    inputs: list[Path],
    threshold: float,
    out: Path,
    device: str = "auto",
    batch_size: int = DEFAULT_BATCH,
) -> list[Path]:
    """Remove the content of each image (mask >= threshold), in batches; one output per input name."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    model, cfg, _ = load_model(run_dir, device)
    dev = next(model.parameters()).device
    paths = collect_images(inputs)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with torch.no_grad():
        for start in range(0, len(paths), batch_size):  # the last batch may be short
            chunk = paths[start : start + batch_size]
            for path, image in zip(chunk, model.remove(_load(chunk, cfg.resize, dev), threshold), strict=True):
                target = out / f"{path.stem}.png"
                _save(image, target)
                written.append(target)
    return written
