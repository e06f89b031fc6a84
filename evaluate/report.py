"""The report of a run folder: ``report.json``, ``report.md``, two figures and the saved masks."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure  # drawn straight to files: no pyplot, no display backend

from mbu.base.files import atomic_write, write_json
from mbu.base.run_files import CHECKPOINT_FILE, CURVES_FILE, EXAMPLES_FILE, MASKS_FILE, REPORT_FILE, REPORT_FILES
from mbu.data.files import check_writable
from mbu.data.images import MASK_FOLDER_SUFFIX, AnnotatedImages
from mbu.evaluate.segmentation import (
    ModelMaps,
    SegmentationScores,
    figure_warnings,
    load_test_annotations,
    predict_maps,
    score_masks,
)
from mbu.train.checkpoint import load_checkpoint
from mbu.train.config import TrainConfig
from mbu.train.model import ContentTransferModel
from mbu.train.step import resolve_device

if TYPE_CHECKING:
    from mbu.evaluate.packaged import LoadedModel

EXAMPLES_PER_SIDE = 4  # best and worst test images shown
EXAMPLE_PANEL_PIXELS = 150  # smallest side of a panel in examples.png (images are zoomed by a whole factor)
EXAMPLES_DPI = 110


def load_model(run_dir: Path, device: str = "auto") -> tuple[ContentTransferModel, TrainConfig, int]:
    """The trained model of a run folder (eval mode), its config and iteration."""
    state = load_checkpoint(Path(run_dir), map_location="cpu")
    cfg = TrainConfig.from_dict(state["config"])
    model = ContentTransferModel(cfg.model_config())
    model.load_state_dict(state["model"])
    model.to(resolve_device(device)).eval()
    return model, cfg, int(state["iteration"])


def save_masks(path: Path, maps: ModelMaps, annotated: AnnotatedImages) -> None:
    """Soft masks, truth and names as plain arrays (loadable with ``allow_pickle=False``)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(
                f,
                masks=maps.masks.numpy(),
                reconstruction_error=maps.reconstruction_error.numpy(),
                truth=annotated.masks.numpy(),
                names=np.array(annotated.names),
            )

    atomic_write(path, write)


def load_masks(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def plot_curves(path: Path, scores: SegmentationScores) -> None:
    m = scores.metrics
    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.subplots()
    ax.plot(scores.thresholds, scores.val_curve, label=f"validation ({int(m['val/images'])} images)")
    ax.plot(scores.thresholds, scores.test_curve, label=f"test ({int(m['test/images'])} images)")
    ax.axvline(m["val/threshold_best"], color="k", linestyle="--", linewidth=1)
    ax.annotate(
        f"chosen t = {m['val/threshold_best']:.2f}\ntest IoU {m['test/iou']:.3f}",
        (m["val/threshold_best"], m["test/iou"]),
        xytext=(8, 8),
        textcoords="offset points",
        fontsize=8,
    )
    ax.axhline(m["baseline/iou_all_ones"], color="grey", linestyle=":", linewidth=1, label="all-ones mask")
    ax.set_xlabel("threshold (mask value >= t is content)")
    ax.set_ylabel("data-set IoU")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, max(1e-3, max(scores.val_curve + scores.test_curve)) * 1.15)
    ax.set_title("IoU against threshold")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def _as_rgb(panel: np.ndarray) -> np.ndarray:
    """A uint8 (H, W, 3) image as it is; an (H, W) map in [0, 1] (soft or boolean) as grey uint8 RGB."""
    if panel.ndim == 3:
        return panel
    grey = np.round(np.clip(np.nan_to_num(panel.astype(np.float32)), 0, 1) * 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def plot_examples(path: Path, scores: SegmentationScores, maps: ModelMaps, annotated: AnnotatedImages) -> None:
    """Best and worst test images: image, soft mask, thresholded mask, truth.

    The panels are pasted into one picture (nearest-neighbour zoom, a grey frame so that an all-white
    mask still shows) with the titles as figure text: drawn as 32 matplotlib axes, it took ~1 s of
    every trial.
    """
    index = {name: i for i, name in enumerate(annotated.names)}
    ranked = sorted(zip(scores.test_image_iou, scores.test_names, strict=True), reverse=True)
    k = min(EXAMPLES_PER_SIDE, len(ranked))
    rows = [("best", r) for r in ranked[:k]] + [("worst", r) for r in ranked[::-1][:k]]
    threshold = scores.metrics["val/threshold_best"]
    side = annotated.images.shape[-1]
    zoom = max(1, math.ceil(EXAMPLE_PANEL_PIXELS / side))
    cell, gap, title = side * zoom, 12, 16  # pixels: panel side, space between panels, title line
    width, height = 4 * cell + 5 * gap, len(rows) * (title + cell + gap) + gap
    page = np.full((height, width, 3), 255, dtype=np.uint8)
    fig = Figure(figsize=(width / EXAMPLES_DPI, height / EXAMPLES_DPI), dpi=EXAMPLES_DPI)
    for r, (kind, (iou, name)) in enumerate(rows):
        i = index[name]
        mask = maps.masks[i].numpy()
        panels = [
            (annotated.images[i].permute(1, 2, 0).numpy(), f"{kind}: {name}"),
            (mask, "soft mask"),
            (mask >= threshold, f"mask >= {threshold:.2f}"),
            (annotated.masks[i].numpy(), f"truth (IoU {iou:.2f})"),
        ]
        top = gap + r * (title + cell + gap) + title
        for c, (image, caption) in enumerate(panels):
            left = gap + c * (cell + gap)
            page[top - 1 : top + cell + 1, left - 1 : left + cell + 1] = 153  # the frame
            page[top : top + cell, left : left + cell] = _as_rgb(image).repeat(zoom, axis=0).repeat(zoom, axis=1)
            x, y = (left + cell / 2) / width, 1 - (top - 4) / height
            fig.text(x, y, caption, fontsize=7, ha="center", va="bottom")
    fig.figimage(page, origin="upper")
    # The page is placed in pixels: saved at another dpi, or cropped tight, it would part from its captions.
    with matplotlib.rc_context({"savefig.bbox": "standard"}):
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=EXAMPLES_DPI))


def _table(header: str, rows: list[tuple[str, str, str]]) -> str:
    lines = [header, "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    m = report["metrics"]
    n_test, n_val, t = int(m["test/images"]), int(m["val/images"]), m["val/threshold_best"]
    ci = f"[{m['test/iou_per_image_ci_low']:.4f}, {m['test/iou_per_image_ci_high']:.4f}]"
    headline = _table(
        "| figure | value | how |",
        [
            ("**test IoU**", f"**{m['test/iou']:.4f}**", f"data-set IoU on {n_test} test images at threshold {t:.2f}"),
            ("test IoU, mean per image", f"{m['test/iou_per_image']:.4f}", f"95% bootstrap interval {ci}"),
            ("precision / recall", f"{m['test/precision']:.4f} / {m['test/recall']:.4f}", "test pixels at threshold"),
            ("average precision", f"{m['test/average_precision']:.4f}", "scikit-learn, test pixels, all thresholds"),
            ("validation IoU", f"{m['val/iou_best']:.4f}", f"best over thresholds on {n_val} validation images"),
            (
                "oracle test IoU",
                f"{m['test/iou_oracle']:.4f}",
                f"threshold {m['test/threshold_oracle']:.2f} chosen on the test images themselves (optimistic)",
            ),
        ],
    )
    baseline_rows = [("all ones", f"{m['baseline/iou_all_ones']:.4f}", "every pixel marked")]
    if "baseline/iou_recon_diff" in m:
        baseline_rows.append(
            (
                "content-free reconstruction difference",
                f"{m['baseline/iou_recon_diff']:.4f}",
                f"threshold {m['baseline/threshold_recon_diff']:.2f}, chosen on validation",
            )
        )
    baselines = _table("| mask | test IoU | note |", baseline_rows)
    notes = figure_warnings(m)
    warnings = "".join(f"> **Warning:** {note}.\n\n" for note in notes)  # one quote block each
    scored = report["scored_on"]
    if "model" in report:
        what = f"MLflow model `{report['model']}`, weights of iteration {report['iteration']}"
    else:
        what = f"Run `{Path(report['checkpoint']).parent}`, checkpoint at iteration {report['iteration']}"
    return f"""# Segmentation report

{what}; scored on the test A images of `{scored["root"]}` against the masks in `{scored["masks"]}`.

{warnings}## Headline

{headline}

## Baselines on the same test images

{baselines}

## How these were obtained

The mask decoder's soft mask of each annotated test A image (model in eval
mode) is compared with the ground truth at every threshold 0.00 ... 1.00; a
pixel counts as content when its mask value is >= the threshold. The
annotated images are split into two disjoint halves by a fixed seed: the
threshold is chosen on the validation half and every `test` figure is
measured at it on the other half. Data-set IoU is the sum of intersections
over the sum of unions; an image with empty prediction and empty truth scores
IoU 1.

![IoU against threshold]({CURVES_FILE})

Best and worst test images (image, soft mask, thresholded mask, truth):

![examples]({EXAMPLES_FILE})

Files: `{REPORT_FILE}` (every figure, curve, split and the config),
`{MASKS_FILE}` (the soft masks and truth these figures were computed from).
"""


def write_report(
    run_dir: Path,
    scores: SegmentationScores,
    maps: ModelMaps,
    annotated: AnnotatedImages,
    cfg: TrainConfig,
    iteration: int,
    checkpoint: Path | None = None,
    scored_on: dict[str, str] | None = None,
    model_uri: str | None = None,
) -> list[Path]:
    """Write every report file into ``run_dir``; returns their paths (JSON first).

    ``checkpoint`` names the scored checkpoint (default: the one in ``run_dir``), or ``model_uri`` the
    MLflow model scored; ``scored_on`` the data root and masks folder scored (default: the training
    root and its ``testA_masks/``).
    """
    run_dir = Path(run_dir)
    scored = (
        {"model": model_uri} if model_uri else {"checkpoint": str((checkpoint or run_dir / CHECKPOINT_FILE).resolve())}
    )
    report = {
        **scores.to_dict(),
        **scored,
        "iteration": iteration,
        "scored_on": scored_on or scoring_source(cfg.root),
        "config": cfg.to_dict(),
    }
    paths = [run_dir / name for name in REPORT_FILES]
    run_dir.mkdir(parents=True, exist_ok=True)  # a new folder only once there is a report to put in it
    write_json(paths[0], report)
    atomic_write(paths[1], lambda tmp: tmp.write_text(markdown(report)))
    plot_curves(paths[2], scores)
    plot_examples(paths[3], scores, maps, annotated)
    save_masks(paths[4], maps, annotated)
    return paths


def score_and_report(
    model: ContentTransferModel,
    annotated: AnnotatedImages,
    cfg: TrainConfig,
    iteration: int,
    run_dir: Path,
    split_seed: int = 0,
    checkpoint: Path | None = None,
    scored_on: dict[str, str] | None = None,
    model_uri: str | None = None,
) -> tuple[SegmentationScores, list[Path]]:
    """Masks and baseline maps of the annotated images, their scores, and the report files."""
    maps = predict_maps(model, annotated.images)
    scores = score_masks(maps.masks, annotated.masks, annotated.names, split_seed, maps.reconstruction_error)
    paths = write_report(run_dir, scores, maps, annotated, cfg, iteration, checkpoint, scored_on, model_uri)
    return scores, paths


def scoring_source(root: str | Path, masks_dir: Path | None = None) -> dict[str, str]:
    """The data root and masks folder a scoring reads, as absolute paths (masks: ``ROOT/testA_masks/`` by default)."""
    root = Path(root).resolve()
    masks = Path(masks_dir).resolve() if masks_dir is not None else root / f"testA{MASK_FOLDER_SUFFIX}"
    return {"root": str(root), "masks": str(masks)}


def report_folder(run_dir: Path, cfg: TrainConfig, scored_on: dict[str, str]) -> Path:
    """The run folder for the data it trained on; ``eval-<masks or root name>-<hash>/`` inside it for any other.

    The hash is of the resolved root and masks paths, so two masks folders of the same name
    get two reports, and scoring the same folders again replaces that one report.
    """
    if scored_on == scoring_source(cfg.root):
        return Path(run_dir)
    root_masks = scored_on["masks"] == scoring_source(scored_on["root"])["masks"]  # another root's own masks
    name = Path(scored_on["root"] if root_masks else scored_on["masks"]).name
    digest = hashlib.sha256(f"{scored_on['root']}\n{scored_on['masks']}".encode()).hexdigest()[:8]
    return Path(run_dir) / f"eval-{name}-{digest}"


def evaluate_run(
    run_dir: Path,
    root: str | None = None,
    device: str = "auto",
    split_seed: int = 0,
    progress: bool = True,
    masks_dir: Path | None = None,
) -> dict[str, Any]:
    """Score a run folder's checkpoint on ``root`` (default: the root it trained on) and write its report.

    Masks come from ``masks_dir``, else ``root/testA_masks/``. Scored against other masks or
    another root, the report goes to a subfolder ``eval-<name>-<hash>/`` (:func:`report_folder`)
    beside the run's own report, never over it; the report names the root and masks it scored.
    """
    run_dir = Path(run_dir)
    model, cfg, iteration = load_model(run_dir, device)
    scored_on = scoring_source(root or cfg.root, masks_dir)
    out = report_folder(run_dir, cfg, scored_on)
    check_writable(out, "report folder")
    annotated = load_test_annotations(Path(root or cfg.root), cfg.resize, progress, masks_dir)
    checkpoint = run_dir / CHECKPOINT_FILE
    scores, paths = score_and_report(model, annotated, cfg, iteration, out, split_seed, checkpoint, scored_on)
    return {
        "metrics": scores.metrics,
        "scores": scores,
        "iteration": iteration,
        "paths": paths,
        "unannotated": annotated.unannotated,
        "report_dir": out,
    }


def evaluate_model(
    loaded: LoadedModel,
    uri: str,
    out: Path,
    root: str | None = None,
    split_seed: int = 0,
    progress: bool = True,
    masks_dir: Path | None = None,
) -> dict[str, Any]:
    """Score an MLflow model (``mbu eval --model``) on ``root`` (default: the root it trained on); report in ``out``.

    ``out`` is a new folder, or one that holds no run: a run folder's own report is ``mbu eval --run``'s.
    """
    out = Path(out)
    if (out / CHECKPOINT_FILE).exists():
        raise FileExistsError(f"--out {out} is a run folder; score it with --run {out}, or give another --out")
    check_writable(out, "--out")
    data_root = Path(root or loaded.cfg.root)
    if not data_root.is_dir():
        raise FileNotFoundError(
            f"--model {uri} trained on {data_root}, which is not a folder on this machine; give --root"
            if root is None
            else f"--root {data_root} is not a folder"
        )
    scored_on = scoring_source(data_root, masks_dir)
    for folder in (scored_on["root"], scored_on["masks"]):  # figures among the images would be read as images
        if Path(folder) == out.resolve() or Path(folder) in out.resolve().parents:
            raise ValueError(f"--out {out} is inside {folder}, which this scoring reads; give a folder outside it")
    annotated = load_test_annotations(data_root, loaded.cfg.resize, progress, masks_dir)
    scores, paths = score_and_report(
        loaded.model, annotated, loaded.cfg, loaded.iteration, out, split_seed, scored_on=scored_on, model_uri=uri
    )
    return {"metrics": scores.metrics, "paths": paths, "unannotated": annotated.unannotated, "report_dir": out}
