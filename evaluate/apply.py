"""Uses of a trained model on any images: transfer content, remove it (CPU or CUDA, batched)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from mbu.base.files import atomic_write
from mbu.base.run_files import REPORT_FILE
from mbu.data.files import check_writable
from mbu.data.images import IMAGE_SUFFIXES, DataError, decode_images, to_model_range, to_uint8
from mbu.evaluate.packaged import DEFAULT_THRESHOLD, LoadedModel
from mbu.evaluate.report import load_model
from mbu.train.visuals import transfer_grids

DEFAULT_BATCH = 32
GRID_FILE = "transfer_grid.png"
PAIR_PATTERN = "{guide}__on__{target}.png"  # one transfer: the guide's content on the target


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from: a run folder (``--run``) or an MLflow model URI (``--model``)."""

    run: Path | None = None
    uri: str | None = None
    tracking_uri: str = ""

    def __post_init__(self) -> None:
        if (self.run is None) == (self.uri is None):
            raise ValueError("give one of --run (a run folder) or --model (an MLflow model URI), not both or neither")

    def load(self, device: str) -> LoadedModel:
        """The model, its config and its threshold (the model's own with --model, the run's own with --run)."""
        if self.uri is not None:
            from mbu.base.urls import resolve_tracking_uri
            from mbu.evaluate.model_load import load_model_uri

            return load_model_uri(self.uri, resolve_tracking_uri(self.tracking_uri), device)
        model, cfg, iteration = load_model(self.run, device)
        threshold, chosen = run_threshold(self.run)
        settings = {"run": str(self.run), "threshold_source": chosen}
        return LoadedModel(model, cfg, threshold, settings, iteration)


def run_threshold(run: Path) -> tuple[float, str]:
    """A run folder's own threshold and where it comes from: the one its report chose on validation, else 0.5."""
    report = Path(run) / REPORT_FILE
    if report.is_file():
        metrics = json.loads(report.read_text()).get("metrics", {})
        if "val/threshold_best" in metrics:
            return float(metrics["val/threshold_best"]), "chosen on validation in the run's report"
    return DEFAULT_THRESHOLD, "the default: the run has no report to take one from (mbu eval --run scores it)"


@dataclass
class Removed:
    """What ``mbu remove`` wrote, and how."""

    written: list[Path]
    threshold: float
    size: int  # outputs are size x size: the model's training size


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


def check_output_folder(out: Path, inputs: list[Path], images: list[Path]) -> None:
    """Refuse an output folder that is an input folder or holds an input image: inputs are never written over."""
    check_writable(out, "--out")
    out = Path(out).resolve()
    folders = {Path(item).resolve() for item in inputs if Path(item).is_dir()}
    folders |= {path.resolve().parent for path in images}
    if out in folders:
        raise ValueError(f"--out {out} is a folder of input images; write the results to another folder")


def output_names(paths: list[Path], pattern: str = "{}.png") -> list[str]:
    """One file name per input, from its stem; repeated stems get -2, -3, ... in input order."""
    seen: dict[str, int] = {}
    names = []
    for path in paths:
        seen[path.stem] = seen.get(path.stem, 0) + 1
        stem = path.stem if seen[path.stem] == 1 else f"{path.stem}-{seen[path.stem]}"
        names.append(pattern.format(stem))
    return names


def check_not_written(out: Path, names: list[str], overwrite: bool) -> None:
    """Refuse to replace earlier results in ``out`` unless told to."""
    existing = [name for name in names if (Path(out) / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds {len(existing)} of the output files (e.g. {existing[0]}); "
            "give another --out, or pass --overwrite to replace them"
        )


def _load(paths: list[Path], resize: int, device: torch.device) -> torch.Tensor:
    return to_model_range(decode_images(paths, resize)[0].to(device))


def _save(image: torch.Tensor, path: Path) -> None:
    """One output PNG, written whole or not at all (a full disk leaves no truncated file to block a rerun)."""
    picture = Image.fromarray(to_uint8(image).permute(1, 2, 0).cpu().numpy())
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


def transfer(
    source: ModelSource,
    guides: list[Path],
    targets: list[Path],
    out: Path,
    device: str = "auto",
    overwrite: bool = False,
) -> list[Path]:
    """Content of every guide onto every target: single images and one grid. Returns the files written."""
    guide_paths, target_paths = collect_images(guides), collect_images(targets)
    check_output_folder(out, [*guides, *targets], [*guide_paths, *target_paths])
    guide_stems = [name[: -len(".png")] for name in output_names(guide_paths)]
    target_stems = [name[: -len(".png")] for name in output_names(target_paths)]
    names = [PAIR_PATTERN.format(guide=g, target=t) for g in guide_stems for t in target_stems] + [GRID_FILE]
    check_not_written(out, names, overwrite)
    loaded = source.load(device)
    model, cfg, dev = loaded.model, loaded.cfg, loaded.device
    out.mkdir(parents=True, exist_ok=True)
    targets_t = _load(target_paths, cfg.resize, dev)
    if overwrite:
        clear_transfers(out)
    written = []
    with torch.no_grad():
        for guide_path in guide_paths:
            guide = _load([guide_path], cfg.resize, dev).expand(len(targets_t), -1, -1, -1)
            for image in model.transfer(guide, targets_t):
                path = out / names[len(written)]
                _save(image, path)
                written.append(path)
        grid = transfer_grids(model, _load(guide_paths, cfg.resize, dev), targets_t)["transfer"]
    grid_path = out / GRID_FILE
    atomic_write(grid_path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))
    return [*written, grid_path]


def clear_transfers(out: Path) -> list[Path]:
    """Delete what an earlier ``transfer`` wrote in ``out`` (its pair images and grid), nothing else; returns them."""
    out = Path(out)
    earlier = [p for p in out.glob(PAIR_PATTERN.format(guide="*", target="*")) if p.is_file()]
    earlier += [out / GRID_FILE] if (out / GRID_FILE).is_file() else []
    for path in earlier:
        path.unlink()
    return earlier


def remove(
    source: ModelSource,
    inputs: list[Path],
    threshold: float | None,
    out: Path,
    device: str = "auto",
    batch_size: int = DEFAULT_BATCH,
    overwrite: bool = False,
) -> Removed:
    """Remove the content of each image (mask >= threshold), in batches; one output per input, named by stem.

    ``threshold`` None: the model's own (a ``--model``'s, or a run folder's report's, validation-chosen one;
    0.5 for a run folder with no report).
    """
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"--threshold must be in [0, 1], got {threshold}")
    if batch_size < 1:
        raise ValueError(f"--bs must be a positive integer, got {batch_size}")
    paths = collect_images(inputs)
    check_output_folder(out, inputs, paths)
    names = output_names(paths)
    check_not_written(out, names, overwrite)
    loaded = source.load(device)
    model, cfg, dev = loaded.model, loaded.cfg, loaded.device
    threshold = loaded.threshold if threshold is None else threshold
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with torch.no_grad():
        for start in range(0, len(paths), batch_size):  # the last batch may be short
            chunk = paths[start : start + batch_size]
            for image in model.remove(_load(chunk, cfg.resize, dev), threshold):
                target = out / names[len(written)]
                _save(image, target)
                written.append(target)
    return Removed(written, threshold, cfg.resize)
