"""The one-pass threshold sweep agrees with scikit-learn at every threshold of the grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import jaccard_score

from mbu.evaluate.iou import EMPTY_IOU, IoUSweep, sweep, threshold_grid
from mbu.evaluate.segmentation import score_masks, validation_split


def _sklearn_curves(probs: torch.Tensor, truth: torch.Tensor, thresholds: torch.Tensor):
    """Per threshold: data-set IoU (all pixels pooled) and each image's IoU, by scikit-learn."""
    y_true = truth.reshape(len(truth), -1).numpy()
    dataset, per_image = [], []
    for t in thresholds:
        y_pred = (probs >= t).reshape(len(probs), -1).numpy()
        dataset.append(jaccard_score(y_true.ravel(), y_pred.ravel(), zero_division=EMPTY_IOU))
        per_image.append(
            [jaccard_score(yt, yp, zero_division=EMPTY_IOU) for yt, yp in zip(y_true, y_pred, strict=True)]
        )
    return np.array(dataset), np.array(per_image).T


def _assert_agrees(probs: torch.Tensor, truth: torch.Tensor) -> None:
    thresholds = threshold_grid()
    counts = sweep(probs, truth, thresholds)
    dataset, per_image = _sklearn_curves(probs, truth, thresholds)
    np.testing.assert_allclose(counts.dataset_iou().numpy(), dataset, rtol=0, atol=1e-12)
    np.testing.assert_allclose(counts.per_image_iou().numpy(), per_image, rtol=0, atol=1e-12)


def test_random_masks_agree_with_sklearn() -> None:
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(5, 16, 16, generator=g)
    truth = torch.rand(5, 16, 16, generator=g) < 0.3
    _assert_agrees(probs, truth)


def test_values_exactly_on_thresholds_agree_with_sklearn() -> None:
    grid = threshold_grid()
    g = torch.Generator().manual_seed(1)
    probs = grid[torch.randint(0, len(grid), (4, 12, 12), generator=g)]  # every value is a grid point
    probs[0, 0, :3] = torch.tensor([0.0, 1.0, 0.5])
    truth = torch.rand(4, 12, 12, generator=g) < 0.5
    _assert_agrees(probs, truth)


def test_empty_truth_and_empty_prediction_agree_with_sklearn() -> None:
    probs = torch.rand(4, 8, 8, generator=torch.Generator().manual_seed(2)) * 0.5  # nothing >= 0.5 ...
    truth = torch.zeros(4, 8, 8, dtype=torch.bool)
    truth[1, 2:4, 2:4] = True  # image 1 has content, others none
    probs[2] = 0.0  # image 2: prediction empty for every threshold > 0
    _assert_agrees(probs, truth)
    counts = sweep(probs, truth)
    # Image 0: empty truth; above its max value the prediction is empty too -> the stated convention.
    assert counts.per_image_iou()[0, -1].item() == EMPTY_IOU


def test_streaming_batches_equal_one_pass() -> None:
    g = torch.Generator().manual_seed(3)
    probs, truth = torch.rand(6, 10, 10, generator=g), torch.rand(6, 10, 10, generator=g) < 0.4
    streamed = IoUSweep()
    streamed.update(probs[:4], truth[:4])
    streamed.update(probs[4:], truth[4:])
    a, b = streamed.compute(), sweep(probs, truth)
    assert torch.equal(a.intersection, b.intersection) and torch.equal(a.predicted, b.predicted)


def test_best_threshold_found_on_constructed_case() -> None:
    # Truth is the left half; the mask is 0.7 on the truth and 0.4 / 0.8 noise elsewhere in a
    # pattern that makes every threshold in (0.4, 0.7] perfect and nothing else perfect.
    truth = torch.zeros(4, 8, 8, dtype=torch.bool)
    truth[:, :, :4] = True
    probs = torch.full((4, 8, 8), 0.4)
    probs[truth] = 0.7
    scores = score_masks(probs, truth, [f"{i}.png" for i in range(4)])
    assert scores.metrics["val/iou_best"] == 1.0
    assert scores.metrics["test/iou"] == 1.0
    assert 0.4 < scores.metrics["val/threshold_best"] <= 0.7
    assert scores.metrics["baseline/iou_all_ones"] == pytest.approx(0.5)


def test_threshold_is_chosen_on_validation_only() -> None:
    """Validation and test halves want different thresholds; test/iou uses validation's."""
    truth = torch.zeros(4, 4, 4, dtype=torch.bool)
    truth[:, :2] = True
    val, test = validation_split(4)
    probs = torch.zeros(4, 4, 4)
    for i in val.tolist():  # validation: content 0.8, background 0.2 -> best t in (0.2, 0.8]
        probs[i] = torch.where(truth[i], 0.8, 0.2)
    for i in test.tolist():  # test: content 0.15, background 0.05 -> best t in (0.05, 0.15]
        probs[i] = torch.where(truth[i], 0.15, 0.05)
    scores = score_masks(probs, truth, [str(i) for i in range(4)])
    assert 0.2 < scores.metrics["val/threshold_best"] <= 0.8
    assert scores.metrics["val/iou_best"] == 1.0
    assert scores.metrics["test/iou"] == 0.0  # nothing reaches validation's threshold on test
    assert scores.metrics["test/iou_oracle"] == 1.0
    assert 0.05 < scores.metrics["test/threshold_oracle"] <= 0.15
    assert set(scores.val_names).isdisjoint(scores.test_names)


def test_shape_mismatch_and_nan_are_errors() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        sweep(torch.rand(2, 4, 4), torch.zeros(2, 4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="NaN"):
        sweep(torch.full((1, 2, 2), float("nan")), torch.zeros(1, 2, 2, dtype=torch.bool))


def test_precision_recall_ap_and_interval_on_a_constructed_case() -> None:
    truth = torch.zeros(4, 4, 4, dtype=torch.bool)
    truth[:, :2] = True  # 8 content pixels an image
    probs = torch.where(truth, 0.9, 0.1)
    probs[:, 2, :2] = 0.9  # 2 false positives an image, at the content's level
    scores = score_masks(probs, truth, [str(i) for i in range(4)])
    m = scores.metrics
    assert m["test/precision"] == pytest.approx(8 / 10)
    assert m["test/recall"] == pytest.approx(1.0)
    assert m["test/iou"] == pytest.approx(8 / 10)
    assert m["test/average_precision"] == pytest.approx(0.8)  # one score level: precision 0.8 at recall 1
    # Every test image scores 0.8, so the bootstrap interval of the mean collapses onto it.
    assert m["test/iou_per_image_ci_low"] == pytest.approx(0.8) == m["test/iou_per_image_ci_high"]


def test_reconstruction_difference_baseline_uses_the_same_protocol() -> None:
    truth = torch.zeros(4, 4, 4, dtype=torch.bool)
    truth[:, 1] = True
    perfect_error = truth.float() * 0.5  # error exactly on the content
    scores = score_masks(torch.rand(4, 4, 4), truth, [str(i) for i in range(4)], reconstruction_error=perfect_error)
    assert scores.metrics["baseline/iou_recon_diff"] == 1.0
    assert 0 < scores.metrics["baseline/threshold_recon_diff"] <= 0.5
