"""Writing a trained run's MLflow model: the package saved in a folder, logged into a run's ``model/``
artifacts, and ``mbu train --log-model``, which scores the run first to choose the model's threshold."""

from __future__ import annotations

import io
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch
from PIL import Image

from mbu.base.files import WriteError
from mbu.base.run_files import CHECKPOINT_FILE
from mbu.data.images import MIN_ANNOTATED, count_annotated
from mbu.evaluate.packaged import (
    DEFAULT_THRESHOLD,
    MODEL_ARTIFACT,
    SETTINGS_FILE,
    SIGNATURE,
    WEIGHTS_BYTES,
    WEIGHTS_FILE,
    quiet_downloads,
)
from mbu.evaluate.report import evaluate_run
from mbu.evaluate.segmentation import figure_warnings
from mbu.evaluate.tracking import log_scores
from mbu.train.checkpoint import load_checkpoint, save_checkpoint, weights_only_state
from mbu.train.config import TrainConfig
from mbu.train.tracking import Recorder


def example_image(size: int = 16) -> bytes:
    """A small grey PNG: the model's input example (any size is resized)."""
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (128, 128, 128)).save(buffer, format="PNG")
    return buffer.getvalue()


def save_model_package(checkpoint: Path, threshold: float, dst: Path, settings: dict[str, Any]) -> Path:
    """Write the MLflow model of ``checkpoint`` (weights only) with its threshold into the new folder ``dst``."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"a model's threshold must be in [0, 1], got {threshold}")
    state = load_checkpoint(checkpoint, map_location="cpu")
    quiet_downloads()  # MLflow downloads the new model once to check its input example
    logging.getLogger("mlflow.pyfunc").setLevel(logging.WARNING)  # and says so on the terminal
    with tempfile.TemporaryDirectory() as tmp:
        weights, settings_file = Path(tmp) / WEIGHTS_FILE, Path(tmp) / SETTINGS_FILE
        save_checkpoint(weights, weights_only_state(state))
        # The weights' size goes with the model: a reader can tell a whole upload from one cut short.
        size = {WEIGHTS_BYTES: weights.stat().st_size}
        settings_file.write_text(json.dumps({**settings, "threshold": threshold, **size}, indent=2))
        mlflow.pyfunc.save_model(
            path=str(dst),
            python_model=str(Path(__file__).with_name("model_code.py")),  # code, not a pickle, rebuilds it
            artifacts={"weights": str(weights), "settings": str(settings_file)},
            signature=SIGNATURE,
            input_example=pd.DataFrame({"image": [example_image()]}),
            pip_requirements=[f"torch>={torch.__version__.split('+')[0]}", "pillow", "numpy", "pandas"],
        )
    return dst


def log_model_package(recorder: Recorder, checkpoint: Path, threshold: float, settings: dict[str, Any]) -> str:
    """Save the model of ``checkpoint`` into the ``model/`` artifacts of the recorder's run; its ``runs:/`` URI."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_model_package(checkpoint, threshold, Path(tmp) / MODEL_ARTIFACT, settings)
        recorder.log_folder_now(folder, MODEL_ARTIFACT)
        weights = folder / "artifacts" / WEIGHTS_FILE
        stored = recorder.artifact_size(f"{MODEL_ARTIFACT}/artifacts/{WEIGHTS_FILE}")
        if recorder.active and stored != weights.stat().st_size:  # the store took part of it, or none (full disk)
            raise WriteError(
                f"the model's {WEIGHTS_FILE} reached the artifact store with {stored or 0} of its "
                f"{weights.stat().st_size} bytes (is the store's disk full?); the run is kept, log it again"
            )
    return f"runs:/{recorder.run_id}/{MODEL_ARTIFACT}"


def log_trained_model(cfg: TrainConfig, recorder: Recorder, device: str = "auto", progress: bool = True) -> str:
    """``mbu train --log-model``: the model of the run ``cfg`` trained, in its MLflow run; the lines to print.

    Where the data root has annotated test A images the run is scored first, as ``mbu eval --run``
    scores it (report files and scores logged too), and the model takes the threshold chosen on the
    validation half; without them it takes ``DEFAULT_THRESHOLD``, and says so.
    """
    run_dir = Path(cfg.out)
    count = count_annotated(Path(cfg.root))
    if count is not None and count >= MIN_ANNOTATED:
        report = evaluate_run(run_dir, device=device, progress=progress)
        for path in report["paths"]:
            recorder.log_artifact(path)
        log_scores(report["scores"], report["iteration"], recorder)
        metrics = report["metrics"]
        threshold = metrics["val/threshold_best"]
        how = f"threshold {threshold:.2f} chosen on validation, test IoU {metrics['test/iou']:.4f}"
        warnings = [f"warning: {note}" for note in figure_warnings(metrics)]
    else:
        threshold, warnings = DEFAULT_THRESHOLD, []
        how = (
            f"threshold {threshold}: {cfg.root} has {count or 0} annotated test A images, and choosing one "
            f"needs at least {MIN_ANNOTATED} (a validation half and a test half)"
        )
    settings = {"run": str(run_dir.resolve()), "run_id": recorder.run_id, "threshold_chosen": how}
    uri = log_model_package(recorder, run_dir / CHECKPOINT_FILE, threshold, settings)
    return "\n".join([f"model: {uri} ({how})", *warnings])
