"""Where MLflow records go, and how a training config becomes MLflow params."""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag

from train.config import TrainConfig

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # MLflow 3's own default store


def resolve_tracking_uri(configured: str = "") -> str:
    """The given URI first, then ``$MLFLOW_TRACKING_URI``, then the local SQLite store."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


TRACKING_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")


def sqlite_file(url: str) -> Path | None:
    """The database file of a ``sqlite:///PATH`` URL (None for an in-memory database)."""
    path = url.split(":///", 1)[1] if ":///" in url else ""
    return Path(path) if path and path != ":memory:" else None


def check_tracking_uri(uri: str) -> None:
    """Refuse, naming the URI, a tracking store MLflow cannot open, before anything is created in it."""
    scheme = uri.split("://", 1)[0].split("+", 1)[0] if "://" in uri else ""
    if scheme not in TRACKING_SCHEMES:
        raise ValueError(
            f"tracking URI {uri!r} is not one MLflow can use here: give sqlite:///FILE.db, "
            "http(s)://HOST:PORT of an MLflow server, or a database URL (postgresql://...)"
        )
    database = sqlite_file(uri) if scheme == "sqlite" else None
    if database is not None and not database.resolve().parent.is_dir():
        raise ValueError(f"tracking URI {uri}: folder {database.resolve().parent} does not exist")
    check_tracking_server(uri)


def check_tracking_server(uri: str, timeout: float = 10.0) -> None:
    """Fail now, with the reason, when an http(s) tracking URI has no MLflow server answering.

    MLflow's own client retries for minutes before giving up; this check runs
    before any data is decoded or any training starts.
    """
    if not uri.startswith(("http://", "https://")):
        return
    # MLflow's client retries a failed request for minutes by default; a trial should not stall that long.
    for name, value in (("MAX_RETRIES", "2"), ("BACKOFF_FACTOR", "1"), ("TIMEOUT", "30")):
        os.environ.setdefault(f"MLFLOW_HTTP_REQUEST_{name}", value)
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


@dataclass
class PendingLogs:
    """MLflow calls made while a trial trains, kept when the tracking server is away.

    Training must not stop because the tracking server went down. A failed call
    is queued; later calls are queued too until ``retry_after`` seconds have
    passed, then the queue is replayed in order before the new call. What never
    got through is named by :meth:`flush`'s warning at the end of the trial.
    """

    retry_after: float = 30.0
    queue: list[tuple[str, Callable[..., Any], tuple, dict]] = field(default_factory=list)
    failed_at: float = -1e9

    def call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.queue.append((what, fn, args, kwargs))
        if len(self.queue) > 1 and time.monotonic() - self.failed_at < self.retry_after:
            return  # the server was away a moment ago: keep it for later, do not stall training
        self._replay()

    def _replay(self) -> None:
        while self.queue:
            what, fn, args, kwargs = self.queue[0]
            try:
                fn(*args, **kwargs)
            except Exception as err:  # any transport or server error: keep the call, carry on
                if time.monotonic() - self.failed_at >= self.retry_after:
                    warnings.warn(f"MLflow did not take {what} ({err}); training goes on, logs kept", stacklevel=3)
                self.failed_at = time.monotonic()
                return
            self.queue.pop(0)

    def end_run(self, status: str = "FINISHED") -> None:
        """End the active run; if the server is away, close it on the server later."""
        run = mlflow.active_run()
        if run is None:
            return
        try:
            mlflow.end_run(status)  # leaves the fluent stack even when the request fails
        except Exception:
            client = mlflow.MlflowClient()
            self.call(f"the end of run {run.info.run_id}", client.set_terminated, run.info.run_id, status)

    def flush(self) -> list[str]:
        """Try the queue once more; warn about and return what is still not logged."""
        self._replay()
        left = [what for what, *_ in self.queue]
        if left:
            shown = "; ".join(left[:5]) + (f"; ... {len(left) - 5} more" if len(left) > 5 else "")
            warnings.warn(f"{len(left)} MLflow call(s) not logged (tracking server unreachable): {shown}", stacklevel=2)
        return left


PENDING = PendingLogs()  # one per process: every trial of a worker shares the queue


# The active run's logging calls, bound to its run id now (a call replayed later must not land in
# whatever run is active then) and sent through PENDING.


def _active_run_id() -> str | None:
    run = mlflow.active_run()
    return None if run is None else run.info.run_id


def log_metrics(metrics: dict[str, float], step: int) -> None:
    run_id = _active_run_id()
    if run_id is not None:
        stamp = int(time.time() * 1000)
        batch = [Metric(key, float(value), stamp, step) for key, value in metrics.items()]
        PENDING.call(f"{len(batch)} metrics at step {step}", mlflow.MlflowClient().log_batch, run_id, metrics=batch)


def log_params(params: dict[str, Any]) -> None:
    run_id = _active_run_id()
    if run_id is not None:
        batch = [Param(key, str(value)) for key, value in params.items()]
        PENDING.call(f"{len(batch)} params", mlflow.MlflowClient().log_batch, run_id, params=batch)


def set_tags(tags: dict[str, Any]) -> None:
    run_id = _active_run_id()
    if run_id is not None:
        batch = [RunTag(key, str(value)) for key, value in tags.items()]
        PENDING.call(f"tags {sorted(tags)}", mlflow.MlflowClient().log_batch, run_id, tags=batch)


def log_artifact(path: str) -> None:
    run_id = _active_run_id()
    if run_id is not None:
        PENDING.call(f"artifact {path}", mlflow.MlflowClient().log_artifact, run_id, path)


def log_image(image: Any, key: str, step: int) -> None:
    run_id = _active_run_id()
    if run_id is not None:
        PENDING.call(f"image {key} at step {step}", mlflow.MlflowClient().log_image, run_id, image, key=key, step=step)
