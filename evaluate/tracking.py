"""Scores into MLflow: final figures, and IoU against threshold as a metric series."""

from __future__ import annotations

import math
import time

from mlflow.entities import Metric

from mbu.evaluate.segmentation import SegmentationScores
from mbu.train.tracking import Recorder


def log_scores(scores: SegmentationScores, step: int, recorder: Recorder) -> None:
    """Final metrics at ``step``, plus the IoU curves with step = threshold x 100 so the UI plots them.

    One batch: a metric a call is slow on a database store.
    """
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, step) for k, v in scores.metrics.items() if math.isfinite(v)]
    for key, curve in (("val/iou_by_threshold", scores.val_curve), ("test/iou_by_threshold", scores.test_curve)):
        metrics += [Metric(key, v, now, round(t * 100)) for t, v in zip(scores.thresholds, curve, strict=True)]
    recorder.log_metric_batch(f"{len(metrics)} score metrics", metrics)
