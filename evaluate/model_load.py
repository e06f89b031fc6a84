"""Reading a model back by its URI (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/ID/model``)
or folder: only the model's own two files are downloaded, after its folder is listed."""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow

from mbu.base.command import first_line
from mbu.base.urls import check_store_to_read
from mbu.evaluate.packaged import (
    SETTINGS_FILE,
    WEIGHTS_FILE,
    LoadedModel,
    load_weights,
    quiet_downloads,
)


def registry_source(uri: str, client: mlflow.MlflowClient) -> str:
    """Where the files of a ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` model are; other URIs as given.

    Resolved with ``client``: MLflow's own download looks a registered model up in the process-wide
    registry (``$MLFLOW_TRACKING_URI``), not in the store the caller names.
    """
    if not uri.startswith("models:/"):
        return uri
    name, _, version = uri.removeprefix("models:/").partition("/")
    alias = ""
    if "@" in name and not version:
        name, alias = name.split("@", 1)
    if not name or not (alias or version.isdigit()):
        raise ValueError(
            f"--model {uri}: give models:/NAME@ALIAS or models:/NAME/VERSION (a number), or runs:/RUN_ID/model"
        )
    if alias:
        version = str(client.get_model_version_by_alias(name, alias).version)
    return client.get_model_version_download_uri(name, version)


def load_model_uri(uri: str, tracking_uri: str, device: str = "auto") -> LoadedModel:
    """The model at ``uri`` (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/ID/model`` or a folder)."""
    quiet_downloads()
    if Path(uri).is_dir():
        artifacts = Path(uri) / "artifacts"
        if not (artifacts / WEIGHTS_FILE).is_file() or not (artifacts / SETTINGS_FILE).is_file():
            raise ValueError(f"--model {uri} is not a model written by mbu (no artifacts/{WEIGHTS_FILE})")
        return load_weights(artifacts / WEIGHTS_FILE, artifacts / SETTINGS_FILE, device)
    check_store_to_read(tracking_uri)  # one line for a store that is gone, not MLflow's, or not answering
    with tempfile.TemporaryDirectory() as tmp:
        weights, settings = download_model_files(uri, tracking_uri, Path(tmp))
        return load_weights(weights, settings, device)


def download_model_files(uri: str, tracking_uri: str, tmp: Path) -> tuple[Path, Path]:
    """The weights and settings files of the model at ``uri``, and nothing else, downloaded into ``tmp``.

    The model's folder is listed first, so a URI naming some other folder (``file:///tmp``, a folder of
    runs) is refused before a byte is copied.
    """
    try:
        source = registry_source(uri, mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri))
        listed = mlflow.artifacts.list_artifacts(
            artifact_uri=f"{source.rstrip('/')}/artifacts", tracking_uri=tracking_uri
        )
    except mlflow.exceptions.MlflowException as err:
        raise ValueError(f"--model {uri}: not found in the MLflow store {tracking_uri}: {first_line(err)}") from err
    names = {Path(item.path).name for item in listed}
    if not {WEIGHTS_FILE, SETTINGS_FILE} <= names:
        raise ValueError(f"--model {uri} is not a model written by mbu (no artifacts/{WEIGHTS_FILE})")
    files = []
    for name in (WEIGHTS_FILE, SETTINGS_FILE):
        artifact = f"{source.rstrip('/')}/artifacts/{name}"
        try:
            files.append(
                Path(
                    mlflow.artifacts.download_artifacts(
                        artifact_uri=artifact, dst_path=str(tmp), tracking_uri=tracking_uri
                    )
                )
            )
        except mlflow.exceptions.MlflowException as err:
            raise ValueError(f"--model {uri}: {name} could not be read: {first_line(err)}") from err
    return files[0], files[1]
