"""Segmentation scores of a trained model: masks, a threshold picked on validation, test IoU."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mbu.data.images import AnnotatedImages, load_annotated, to_model_range
from mbu.evaluate.iou import SweepCounts, safe_iou, sweep, threshold_grid
from mbu.train.model import ContentTransferModel

BOOTSTRAP_SAMPLES = 1000  # resamples of the test images for the per-image IoU interval


@dataclass
class ModelMaps:
    """Per-pixel maps of the annotated images: (N, S, S) floats in [0, 1], on the CPU."""

    masks: torch.Tensor  # the mask decoder's soft mask of [Ec(a), Es(a)]
    reconstruction_error: torch.Tensor  # |a - D_A([Ec(a), 0])|, channel mean, scaled to [0, 1]


@torch.no_grad()
def predict_maps(
    model: ContentTransferModel, images: torch.Tensor, batch_size: int = 64, reconstruction: bool = True
) -> ModelMaps:
    """Soft masks and content-free reconstruction errors for uint8 A images; model in eval mode.

    ``reconstruction=False`` skips the decoder pass: the errors are then empty.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    masks, errors = [], []
    for start in range(0, len(images), batch_size):
        batch = to_model_range(images[start : start + batch_size].to(device))
        masks.append(model.segment(batch)[:, 0].float().cpu())
        if reconstruction:
            errors.append(((batch - model.content_free(batch)).abs().mean(1) / 2).float().cpu())
    model.train(was_training)
    return ModelMaps(torch.cat(masks), torch.cat(errors) if errors else torch.empty(0))


def predict_masks(model: ContentTransferModel, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """(N, S, S) soft masks in [0, 1] for uint8 A images, on the CPU (the mask decoder only)."""
    return predict_maps(model, images, batch_size, reconstruction=False).masks


def validation_split(count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint (validation, test) index halves of ``count`` annotated images."""
    if count < 2:
        raise ValueError(f"need at least 2 annotated images to split validation from test, got {count}")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    half = count // 2
    return order[:half].sort().values, order[half:].sort().values


def bootstrap_interval(values: torch.Tensor, seed: int = 0, samples: int = BOOTSTRAP_SAMPLES) -> tuple[float, float]:
    """95% percentile interval of the mean of ``values`` over image resamples."""
    rng = np.random.default_rng(seed)
    v = values.double().numpy()
    means = v[rng.integers(0, len(v), size=(samples, len(v)))].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


@dataclass
class SegmentationScores:
    """The figures of a best-threshold evaluation; ``metrics`` uses the MLflow key names."""

    metrics: dict[str, float]
    thresholds: list[float]
    val_curve: list[float]  # data-set IoU on the validation half, per threshold
    test_curve: list[float]  # data-set IoU on the test half, per threshold
    val_names: list[str]
    test_names: list[str]
    test_image_iou: list[float] = field(default_factory=list)  # each test image's IoU at the threshold

    def to_dict(self) -> dict[str, Any]:
        return {
            "metrics": self.metrics,
            "thresholds": self.thresholds,
            "curves": {"val/iou": self.val_curve, "test/iou": self.test_curve},
            "split": {"val": self.val_names, "test": self.test_names},
            "test_images": [{"name": n, "iou": v} for n, v in zip(self.test_names, self.test_image_iou, strict=True)],
            "conventions": {
                "positive": "mask value >= threshold",
                "iou": "data-set level: sum of intersections / sum of unions",
                "iou_per_image": "mean over images of each image's IoU, with a bootstrap 95% interval",
                "empty": "an image with empty prediction and empty truth has IoU 1",
                "threshold": "chosen on the validation half; every test/ figure is at it",
                "oracle": "best threshold chosen on the test half itself (the paper's protocol; optimistic)",
                "baselines": "all_ones marks every pixel; recon_diff thresholds |A - content-free "
                "reconstruction| (threshold chosen on validation too)",
            },
        }


def _pick(counts: SweepCounts, val: torch.Tensor, test: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Index of the validation-best threshold, and both halves' data-set IoU curves."""
    val_curve, test_curve = counts.dataset_iou(val), counts.dataset_iou(test)
    return int(val_curve.argmax()), val_curve, test_curve


def score_masks(
    probs: torch.Tensor,
    truth: torch.Tensor,
    names: list[str],
    split_seed: int = 0,
    reconstruction_error: torch.Tensor | None = None,
) -> SegmentationScores:
    """Pick the threshold on a validation half, report IoU on the disjoint test half."""
    grid = threshold_grid()
    counts = sweep(probs, truth, grid)
    val, test = validation_split(len(names), split_seed)
    best, val_curve, test_curve = _pick(counts, val, test)
    oracle = int(test_curve.argmax())
    per_image = counts.per_image_iou()
    test_iou = per_image[test, best]
    ci_low, ci_high = bootstrap_interval(test_iou, split_seed)
    inter = counts.intersection[test, best].sum().item()
    predicted = counts.predicted[test, best].sum().item()
    true_pixels = counts.truth[test].sum().item()
    test_probs = probs[test].flatten().double().numpy()
    test_truth = truth[test].flatten().numpy()
    # Imported here: scikit-learn's import costs ~1.5 s, and only scoring needs it.
    from sklearn.metrics import average_precision_score

    metrics = {
        "val/iou_best": float(val_curve[best]),
        "val/threshold_best": float(grid[best]),
        "val/iou_per_image": float(per_image[val, best].mean()),
        "val/marked_fraction": counts.predicted[val, best].sum().item() / counts.pixels[val].sum().item(),
        "test/iou": float(test_curve[best]),
        "test/iou_per_image": float(test_iou.mean()),
        "test/iou_per_image_ci_low": ci_low,
        "test/iou_per_image_ci_high": ci_high,
        "test/precision": inter / predicted if predicted else 1.0,
        "test/marked_fraction": predicted / counts.pixels[test].sum().item(),
        "test/recall": inter / true_pixels if true_pixels else 1.0,
        "test/average_precision": float(average_precision_score(test_truth, test_probs))
        if test_truth.any()
        else float("nan"),
        "test/iou_oracle": float(test_curve[oracle]),
        "test/threshold_oracle": float(grid[oracle]),
        "baseline/iou_all_ones": float(safe_iou(counts.truth[test].sum(), counts.pixels[test].sum())),
        "baseline/iou_all_ones_per_image": float(safe_iou(counts.truth[test], counts.pixels[test]).mean()),
        "baseline/iou_all_ones_val": float(safe_iou(counts.truth[val].sum(), counts.pixels[val].sum())),
        "test/images": float(len(test)),
        "val/images": float(len(val)),
    }
    if reconstruction_error is not None:
        recon = sweep(reconstruction_error, truth, grid)
        recon_best, _, recon_test = _pick(recon, val, test)
        metrics["baseline/iou_recon_diff"] = float(recon_test[recon_best])
        metrics["baseline/threshold_recon_diff"] = float(grid[recon_best])
    return SegmentationScores(
        metrics=metrics,
        thresholds=[round(float(t), 6) for t in grid],
        val_curve=val_curve.tolist(),
        test_curve=test_curve.tolist(),
        val_names=[names[i] for i in val],
        test_names=[names[i] for i in test],
        test_image_iou=test_iou.tolist(),
    )


def figure_warnings(metrics: dict[str, float]) -> list[str]:
    """Why a report's headline figures may mean less than they seem; empty when they hold up."""
    notes = []
    all_ones, test_iou = metrics.get("baseline/iou_all_ones"), metrics.get("test/iou")
    if all_ones is not None and test_iou is not None and test_iou <= all_ones:
        notes.append(f"the mask does not beat marking every pixel: test IoU {test_iou:.4f} <= all-ones {all_ones:.4f}")
    if metrics.get("test/marked_fraction", 0.0) >= 0.999:
        notes.append(
            f"the chosen threshold {metrics.get('val/threshold_best', 0):.2f} marks every pixel as content: "
            "the mask separates nothing there"
        )
    return notes


def load_test_annotations(
    root: Path, resize: int, progress: bool = True, masks_dir: Path | None = None
) -> AnnotatedImages:
    """Test A images with their masks (``root/testA_masks/`` unless ``masks_dir`` is given)."""
    return load_annotated(Path(root), resize, "test", progress, masks_dir)
