"""A trained run as an MLflow model: the weights, the training config and the validation-chosen threshold.

The model is an MLflow ``pyfunc`` model (``MaskModel``) saved in a run's
``model/`` artifact folder, so that ``mlflow.pyfunc.load_model``,
``mlflow models serve`` and ``mbu transfer/remove --model`` use a study's
result from an MLflow server alone, without the run folder.

Its input is a table with one row per image: ``image``, the encoded image
(PNG, JPEG, ... bytes; base64 in a JSON request), and the optional
``target``, an image that receives the content of ``image``. Any size: each is
resized as in training. Its output, one row per input row:

- ``mask``: the soft mask in [0, 1], S x S (S the training size);
- ``binary_mask``: 1 where ``mask`` >= the model's threshold;
- ``removed``: the image with its content removed at that threshold, base64 PNG;
- ``transferred``: the content of ``image`` on ``target``, base64 PNG (empty without a target).

The weights are kept without the optimizer state (a third of a checkpoint).
Loading needs this package installed (``--env-manager local`` when serving): the model is rebuilt
by ``evaluate/model_code.py`` (MLflow's "models from code"), nothing is unpickled.
"""

from __future__ import annotations

import base64
import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mbu.data.images import decode_image_bytes, to_model_range, to_uint8
from mbu.evaluate.report import load_model
from mbu.train.checkpoint import load_checkpoint, save_checkpoint, weights_only_state
from mbu.train.config import TrainConfig
from mbu.train.errors import first_line
from mbu.train.model import ContentTransferModel
from mbu.train.tracking import missing_sqlite_file
from mlflow.models import ModelSignature
from mlflow.types.schema import Array, ColSpec, DataType, Schema
from PIL import Image

MODEL_ARTIFACT = "model"  # the model's folder among a run's artifacts: runs:/<run id>/model
WEIGHTS_FILE = "weights.pt"
SETTINGS_FILE = "model.json"
BATCH = 32  # images per forward pass

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(DataType.binary, "image"), ColSpec(DataType.binary, "target", required=False)]),
    outputs=Schema(
        [
            ColSpec(Array(Array(DataType.double)), "mask"),
            ColSpec(Array(Array(DataType.long)), "binary_mask"),
            ColSpec(DataType.string, "removed"),
            ColSpec(DataType.string, "transferred"),
        ]
    ),
)


@dataclass
class LoadedModel:
    """A model ready to apply: eval mode, its training config and threshold, what it came from."""

    model: ContentTransferModel
    cfg: TrainConfig
    threshold: float
    settings: dict[str, Any]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def png_base64(image: torch.Tensor) -> str:
    """A (3, S, S) image in [-1, 1] as the base64 text of a PNG, the pixels ``mbu remove`` would write."""
    buffer = io.BytesIO()
    Image.fromarray(to_uint8(image).permute(1, 2, 0).cpu().numpy()).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _as_bytes(value: Any, column: str, row: int) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):  # base64 text, as a JSON request carries it
        return base64.b64decode(value)
    raise ValueError(f"row {row}: {column} must be encoded image bytes (PNG, JPEG, ...), got {type(value).__name__}")


def predict_rows(loaded: LoadedModel, images: list[bytes], targets: list[bytes | None]) -> pd.DataFrame:
    """The model's output table (see the module docstring) for encoded images and optional targets."""
    size, threshold, model = loaded.cfg.resize, loaded.threshold, loaded.model
    rows: list[dict[str, Any]] = []
    with torch.no_grad():
        for start in range(0, len(images), BATCH):
            chunk = images[start : start + BATCH]
            x = to_model_range(torch.stack([decode_image_bytes(data, size) for data in chunk]).to(loaded.device))
            masks = model.segment(x)[:, 0]
            removed = model.remove(x, threshold)
            for i, mask in enumerate(masks):
                target = targets[start + i]
                transferred = ""
                if target is not None:
                    onto = to_model_range(decode_image_bytes(target, size)[None].to(loaded.device))
                    transferred = png_base64(model.transfer(x[i : i + 1], onto)[0])
                rows.append(
                    {
                        "mask": mask.double().cpu().numpy().tolist(),
                        "binary_mask": (mask >= threshold).long().cpu().numpy().tolist(),
                        "removed": png_base64(removed[i]),
                        "transferred": transferred,
                    }
                )
    return pd.DataFrame(rows, columns=["mask", "binary_mask", "removed", "transferred"])


def load_weights(weights: Path, settings_file: Path, device: str = "cpu") -> LoadedModel:
    """The model of a saved package's weights and settings files, in eval mode on ``device``."""
    model, cfg, _ = load_model(weights, device)  # a weights file loads as a run folder's checkpoint does
    settings = json.loads(Path(settings_file).read_text())
    return LoadedModel(model, cfg, float(settings["threshold"]), settings)


class MaskModel(mlflow.pyfunc.PythonModel):
    """The ``pyfunc`` face of a trained run: masks, removal and transfer of encoded images."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.loaded = load_weights(Path(context.artifacts["weights"]), Path(context.artifacts["settings"]))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        if "image" not in model_input:
            raise ValueError("the input needs an 'image' column of encoded images")
        images = [_as_bytes(v, "image", i) for i, v in enumerate(model_input["image"])]
        raw_targets = model_input["target"] if "target" in model_input else [None] * len(images)
        targets = [None if _missing(v) else _as_bytes(v, "target", i) for i, v in enumerate(raw_targets)]
        return predict_rows(self.loaded, images, targets)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


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
    with tempfile.TemporaryDirectory() as tmp:
        weights, settings_file = Path(tmp) / WEIGHTS_FILE, Path(tmp) / SETTINGS_FILE
        save_checkpoint(weights, weights_only_state(state))
        settings_file.write_text(json.dumps({**settings, "threshold": threshold}, indent=2))
        mlflow.pyfunc.save_model(
            path=str(dst),
            python_model=str(Path(__file__).with_name("model_code.py")),  # code, not a pickle, rebuilds it
            artifacts={"weights": str(weights), "settings": str(settings_file)},
            signature=SIGNATURE,
            input_example=pd.DataFrame({"image": [example_image()]}),
            pip_requirements=[f"torch>={torch.__version__.split('+')[0]}", "pillow", "numpy", "pandas"],
        )
    return dst


def log_model_package(
    client: mlflow.MlflowClient, run_id: str, checkpoint: Path, threshold: float, settings: dict[str, Any]
) -> str:
    """Save the model of ``checkpoint`` into the run's ``model/`` artifacts; its ``runs:/`` URI."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_model_package(checkpoint, threshold, Path(tmp) / MODEL_ARTIFACT, settings)
        client.log_artifacts(run_id, str(folder), MODEL_ARTIFACT)
    return f"runs:/{run_id}/{MODEL_ARTIFACT}"


def quiet_downloads() -> None:
    """No MLflow progress bar per artifact download (a model is a handful of files)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def load_model_uri(uri: str, tracking_uri: str, device: str = "auto") -> LoadedModel:
    """The model at ``uri`` (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/ID/model`` or a folder)."""
    quiet_downloads()
    missing = missing_sqlite_file(tracking_uri)
    if missing is not None and not Path(uri).is_dir():  # opening it would create an empty store
        raise ValueError(f"--model {uri}: no MLflow store at {missing} ({tracking_uri}); give --tracking-uri")
    with tempfile.TemporaryDirectory() as tmp:
        if Path(uri).is_dir():
            local = Path(uri)
        else:
            try:
                local = Path(
                    mlflow.artifacts.download_artifacts(
                        artifact_uri=uri, dst_path=tmp, tracking_uri=tracking_uri, registry_uri=tracking_uri
                    )
                )
            except mlflow.exceptions.MlflowException as err:
                raise ValueError(
                    f"--model {uri}: not found in the MLflow store {tracking_uri}: {first_line(err)}"
                ) from err
        artifacts = local / "artifacts"
        if not (artifacts / WEIGHTS_FILE).is_file() or not (artifacts / SETTINGS_FILE).is_file():
            raise ValueError(f"--model {uri} is not a model written by mbu (no artifacts/{WEIGHTS_FILE})")
        return load_weights(artifacts / WEIGHTS_FILE, artifacts / SETTINGS_FILE, device)
