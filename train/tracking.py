"""Where MLflow records go, and how a training config becomes MLflow params."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from dataclasses import fields
from typing import Any

from train.config import TrainConfig

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # MLflow 3's own default store


def resolve_tracking_uri(configured: str = "") -> str:
    """The given URI first, then ``$MLFLOW_TRACKING_URI``, then the local SQLite store."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def check_tracking_server(uri: str, timeout: float = 10.0) -> None:
    """Fail now, with the reason, when an http(s) tracking URI has no MLflow server answering.

    MLflow's own client retries for minutes before giving up; this check runs
    before any data is decoded or any training starts.
    """
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            response.read()
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ValueError(
            f"MLflow tracking server {uri} is unreachable ({reason}); start it "
            "(mlflow server --host 127.0.0.1 --port PORT ...) or pass another --tracking-uri"
        ) from err


def train_params(cfg: TrainConfig) -> dict[str, Any]:
    """Every training setting as a flat MLflow param (weights under their flag names)."""
    params = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name != "weights"}
    params.update({f.name: getattr(cfg.weights, f.name) for f in fields(cfg.weights)})
    return {k: ("" if v is None else v) for k, v in params.items()}
