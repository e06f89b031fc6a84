"""Scores into MLflow: final figures, and IoU against threshold as a metric series."""

from __future__ import annotations

import math
import time

import mlflow
from mlflow.entities import Metric

from evaluate.segmentation import SegmentationScores
from train.tracking import PENDING

RUN_FILE = "mlflow_run.json"  # in a run folder: the MLflow run its files belong to


def log_scores(scores: SegmentationScores, step: int, run_id: str | None = None) -> None:
    """Final metrics at ``step``, plus the IoU curves with step = threshold x 100 so the UI plots them.

    Logs to ``run_id``, or to the active run. One batch: a metric a call is slow on a database store.
    """
    run_id = run_id or mlflow.active_run().info.run_id
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, step) for k, v in scores.metrics.items() if math.isfinite(v)]
    for key, curve in (("val/iou_by_threshold", scores.val_curve), ("test/iou_by_threshold", scores.test_curve)):
        metrics += [Metric(key, v, now, round(t * 100)) for t, v in zip(scores.thresholds, curve, strict=True)]
    # Queued and retried if the tracking server is away, like every logging call made during a trial.
    PENDING.call(f"{len(metrics)} score metrics", mlflow.MlflowClient().log_batch, run_id, metrics=metrics)
