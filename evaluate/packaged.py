"""A trained run as an MLflow model: the weights, the training config and the validation-chosen threshold.

The model is an MLflow ``pyfunc`` model (``MaskModel``) saved in a run's
``model/`` artifact folder, so that ``mlflow.pyfunc.load_model``,
``mlflow models serve`` and ``mbu transfer/remove --model`` use a study's
result from an MLflow server alone, without the run folder.

Its input is a table with one row per image. The image is ``image``, encoded
(PNG, JPEG, ... bytes; base64 in a JSON request), or ``pixels``, a uint8
H x W x 3 RGB array (nested lists in JSON); the optional ``target`` (encoded)
or ``target_pixels`` (array) is an image that receives the content of the
image. Any size: each is resized as in training. Its output, one row per
input row:

- ``mask``: the soft mask in [0, 1], S x S (S the training size);
- ``binary_mask``: 1 where ``mask`` >= the model's threshold;
- ``removed``: the image with its content removed at that threshold, base64 PNG;
- ``transferred``: the content of ``image`` on ``target``, base64 PNG (empty without a target).

The weights are kept without the optimizer state (a third of a checkpoint).
Loading needs this package installed (``--env-manager local`` when serving): the model is rebuilt
by ``evaluate/model_code.py`` (MLflow's "models from code"), nothing is unpickled. Writing a
package is :mod:`mbu.evaluate.model_save`'s job, reading one back by its URI :mod:`mbu.evaluate.model_load`'s.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import Array, ColSpec, DataType, Schema
from PIL import Image

from mbu.data.images import (
    DataError,
    decode_image_array,
    decode_image_bytes,
    to_model_range,
    to_uint8,
)
from mbu.evaluate.report import load_model
from mbu.train.config import TrainConfig
from mbu.train.model import ContentTransferModel

MODEL_ARTIFACT = "model"  # the model's folder among a run's artifacts: runs:/<run id>/model
WEIGHTS_FILE = "weights.pt"
SETTINGS_FILE = "model.json"
WEIGHTS_BYTES = "weights_bytes"  # in SETTINGS_FILE: the size of WEIGHTS_FILE, to tell a whole upload from a cut one
BATCH = 32  # images per forward pass
DEFAULT_THRESHOLD = 0.5  # a model whose data root has no annotated images to choose one on

SIGNATURE = ModelSignature(
    inputs=Schema(
        [
            ColSpec(DataType.binary, "image", required=False),
            ColSpec(Array(Array(Array(DataType.long))), "pixels", required=False),
            ColSpec(DataType.binary, "target", required=False),
            ColSpec(Array(Array(Array(DataType.long))), "target_pixels", required=False),
        ]
    ),
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
    iteration: int = 0  # the training iteration of the weights

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def png_base64(image: torch.Tensor) -> str:
    """A (3, S, S) image in [-1, 1] as the base64 text of a PNG, the pixels ``mbu remove`` would write."""
    buffer = io.BytesIO()
    Image.fromarray(to_uint8(image).permute(1, 2, 0).cpu().numpy()).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


ImageInput = bytes | np.ndarray  # encoded bytes, or a uint8 H x W x 3 RGB array


def _as_bytes(value: Any, column: str, row: int) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):  # base64 text, as a JSON request carries it
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error as err:
            raise ValueError(f"row {row}: {column} is text that is not base64 ({err})") from None
    raise ValueError(f"row {row}: {column} must be encoded image bytes (PNG, JPEG, ...), got {type(value).__name__}")


def _as_pixels(value: Any, column: str, row: int) -> np.ndarray:
    """A uint8 H x W x 3 array of an array or nested lists of integers in 0..255."""
    array = np.asarray(value)
    if array.ndim != 3 or array.shape[2] != 3 or min(array.shape[:2]) < 1:
        raise ValueError(f"row {row}: {column} must be an H x W x 3 RGB array, got shape {array.shape}")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"row {row}: {column} must hold integers in 0..255 (uint8 RGB), got {array.dtype}")
        if array.min() < 0 or array.max() > 255:
            raise ValueError(f"row {row}: {column} holds values {array.min()}..{array.max()}, outside 0..255")
    return array.astype(np.uint8)


class BadInput(MlflowException, ValueError):
    """A request row the model cannot answer, named in the message: ``mlflow models serve`` answers it with a 400
    that carries the message and no traceback (it would show the server's paths)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def _decode(image: ImageInput, size: int, row: int = 0, role: str = "") -> torch.Tensor:
    """(3, S, S) uint8 of encoded bytes or an RGB array, resized as in training; a bad one names its row and
    column (``role``: "" for the image, "target" for the target)."""
    if isinstance(image, np.ndarray):
        column = f"{role}_pixels" if role else "pixels"
    else:
        column = role or "image"
    try:
        return decode_image_array(image, size) if isinstance(image, np.ndarray) else decode_image_bytes(image, size)
    except (DataError, ValueError) as err:
        raise BadInput(f"row {row}: {column}: {' '.join(str(err).split())}") from None


def predict_rows(loaded: LoadedModel, images: list[ImageInput], targets: list[ImageInput | None]) -> pd.DataFrame:
    """The model's output table (see the module docstring) for images and optional targets."""
    size, threshold, model = loaded.cfg.resize, loaded.threshold, loaded.model
    rows: list[dict[str, Any]] = []
    with torch.no_grad():
        for start in range(0, len(images), BATCH):
            chunk = images[start : start + BATCH]
            decoded = [_decode(image, size, start + i) for i, image in enumerate(chunk)]
            x = to_model_range(torch.stack(decoded).to(loaded.device))
            soft = model.segment(x)
            removed = model.remove(x, threshold, soft_mask=soft)  # the masks once, not twice
            for i, mask in enumerate(soft[:, 0]):
                target = targets[start + i]
                transferred = ""
                if target is not None:
                    onto = to_model_range(_decode(target, size, start + i, "target")[None].to(loaded.device))
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
    model, cfg, iteration = load_model(weights, device)  # a weights file loads as a run folder's checkpoint does
    settings = json.loads(Path(settings_file).read_text())
    return LoadedModel(model, cfg, float(settings["threshold"]), settings, iteration)


def quiet_downloads() -> None:
    """No MLflow progress bar per artifact download (a model is a handful of files)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


class MaskModel(mlflow.pyfunc.PythonModel):
    """The ``pyfunc`` face of a trained run: masks, removal and transfer of encoded images."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.loaded = load_weights(Path(context.artifacts["weights"]), Path(context.artifacts["settings"]))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        try:
            return self._predict(model_input)
        except ValueError as err:  # a bad request, said as one: the row and what to fix
            raise err if isinstance(err, BadInput) else BadInput(" ".join(str(err).split())) from None

    def _predict(self, model_input: pd.DataFrame) -> pd.DataFrame:
        if "image" not in model_input and "pixels" not in model_input:
            raise ValueError("the input needs an 'image' column of encoded images or a 'pixels' column of RGB arrays")
        images = [_row_image(model_input, i, "image", "pixels") for i in range(len(model_input))]
        if any(image is None for image in images):
            row = images.index(None)
            raise ValueError(f"row {row} has neither an image nor pixels")
        targets = [_row_image(model_input, i, "target", "target_pixels") for i in range(len(model_input))]
        return predict_rows(self.loaded, images, targets)


def _row_image(table: pd.DataFrame, row: int, encoded: str, array: str) -> ImageInput | None:
    """Row ``row``'s image from the column of encoded images or the column of arrays (None: neither)."""
    value = table[encoded].iloc[row] if encoded in table else None
    pixels = table[array].iloc[row] if array in table else None
    if not _missing(value) and not _missing(pixels):
        raise ValueError(f"row {row} has both {encoded} and {array}: give one of them")
    if not _missing(value):
        return _as_bytes(value, encoded, row)
    return None if _missing(pixels) else _as_pixels(pixels, array, row)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))
