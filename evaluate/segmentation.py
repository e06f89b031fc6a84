"""Segmentation scores of a trained model: masks, a threshold picked on validation, test IoU."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data.images import AnnotatedImages, load_annotated, to_model_range
from evaluate.iou import SweepCounts, safe_iou, sweep, threshold_grid
from train.model import ContentTransferModel

REPORT_FILE = "report.json"


@torch.no_grad()
def predict_masks(model: ContentTransferModel, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """(N, S, S) soft masks in [0, 1] for uint8 A images, on the CPU; model in eval mode."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        batch = to_model_range(images[start : start + batch_size].to(device))
        out.append(model.segment(batch)[:, 0].float().cpu())
    model.train(was_training)
    return torch.cat(out)


def validation_split(count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint (validation, test) index halves of ``count`` annotated images."""
    if count < 2:
        raise ValueError(f"need at least 2 annotated images to split validation from test, got {count}")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    half = count // 2
    return order[:half].sort().values, order[half:].sort().values


@dataclass
class SegmentationScores:
    """The figures of a best-threshold evaluation; ``metrics`` uses the MLflow key names."""

    metrics: dict[str, float]
    thresholds: list[float]
    val_curve: list[float]  # data-set IoU on the validation half, per threshold
    test_curve: list[float]  # data-set IoU on the test half, per threshold
    val_names: list[str]
    test_names: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "metrics": self.metrics,
            "thresholds": self.thresholds,
            "curves": {"val/iou": self.val_curve, "test/iou": self.test_curve},
            "split": {"val": self.val_names, "test": self.test_names},
            "conventions": {
                "positive": "mask value >= threshold",
                "iou": "data-set level: sum of intersections / sum of unions",
                "iou_per_image": "mean over images of each image's IoU",
                "empty": "an image with empty prediction and empty truth has IoU 1",
                "threshold": "chosen on the validation half; test/iou reported at it",
                "oracle": "best threshold chosen on the test half itself (the paper's protocol; optimistic)",
            },
        }


def score_masks(probs: torch.Tensor, truth: torch.Tensor, names: list[str], split_seed: int = 0) -> SegmentationScores:
    """Pick the threshold on a validation half, report IoU on the disjoint test half."""
    counts: SweepCounts = sweep(probs, truth, threshold_grid())
    val, test = validation_split(len(names), split_seed)
    val_curve, test_curve = counts.dataset_iou(val), counts.dataset_iou(test)
    per_image = counts.per_image_iou()
    best = int(val_curve.argmax())
    oracle = int(test_curve.argmax())
    thresholds = counts.thresholds
    all_ones = safe_iou(counts.truth[test], counts.pixels[test])  # predict every pixel
    metrics = {
        "val/iou_best": float(val_curve[best]),
        "val/threshold_best": float(thresholds[best]),
        "val/iou_per_image": float(per_image[val, best].mean()),
        "test/iou": float(test_curve[best]),
        "test/iou_per_image": float(per_image[test, best].mean()),
        "test/iou_oracle": float(test_curve[oracle]),
        "test/threshold_oracle": float(thresholds[oracle]),
        "baseline/iou_all_ones": float(safe_iou(counts.truth[test].sum(), counts.pixels[test].sum())),
        "baseline/iou_all_ones_per_image": float(all_ones.mean()),
        "test/images": float(len(test)),
        "val/images": float(len(val)),
    }
    return SegmentationScores(
        metrics=metrics,
        thresholds=[round(float(t), 6) for t in thresholds],
        val_curve=val_curve.tolist(),
        test_curve=test_curve.tolist(),
        val_names=[names[i] for i in val],
        test_names=[names[i] for i in test],
    )


def evaluate_model(model: ContentTransferModel, annotated: AnnotatedImages, split_seed: int = 0) -> SegmentationScores:
    probs = predict_masks(model, annotated.images)
    return score_masks(probs, annotated.masks, annotated.names, split_seed)


def load_test_annotations(root: Path, resize: int, progress: bool = True) -> AnnotatedImages:
    return load_annotated(Path(root), resize, "test", progress)
