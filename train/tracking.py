"""Where MLflow records go, how a training config becomes MLflow params, and the one recorder that writes them."""

from __future__ import annotations

import logging
import os
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import mlflow
from mbu.train.config import TrainConfig
from mlflow.entities import Metric, Param, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # MLflow 3's own default store


def resolve_tracking_uri(configured: str = "") -> str:
    """The given URI first, then ``$MLFLOW_TRACKING_URI``, then the local SQLite store."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


TRACKING_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")


def url_scheme(url: str) -> str:
    """``sqlite``, ``postgresql`` (driver suffix dropped), ...; a URL without ``://`` is its own scheme."""
    return url.split("://", 1)[0].split("+", 1)[0] if "://" in url else url


def sqlite_file(url: str) -> Path | None:
    """The database file of a ``sqlite:///PATH`` URL (None for another scheme or an in-memory database)."""
    path = url.split(":///", 1)[1] if url_scheme(url) == "sqlite" and ":///" in url else ""
    return Path(path) if path and path != ":memory:" else None


def missing_sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL when it does not exist (opening it would create it)."""
    database = sqlite_file(url)
    return database if database is not None and not database.is_file() else None


def check_database_folder(url: str, what: str) -> None:
    """A SQLite URL whose folder is missing is an error naming it (``what``: the store's role)."""
    database = sqlite_file(url)
    if database is not None and not database.resolve().parent.is_dir():
        raise ValueError(f"{what} {url}: folder {database.resolve().parent} does not exist")


SERVER_SCHEMES = ("postgresql", "mysql", "mssql")  # database URLs that name a server (not a local file)


def check_database_server(url: str, what: str, timeout: int = 10) -> None:
    """A database-server URL must parse, have its driver installed and reach a server that answers.

    Checked before anything is written, so each of these is one line naming the URL (password hidden)
    instead of a traceback from SQLAlchemy, the driver or the library that opened it.
    """
    if url_scheme(url) not in SERVER_SCHEMES:
        return
    import sqlalchemy

    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError as err:
        raise ValueError(f"{what} {url!r} is not a database URL: {err}") from err
    shown = parsed.render_as_string(hide_password=True)
    try:
        parsed.get_dialect().import_dbapi()
    except (ImportError, sqlalchemy.exc.NoSuchModuleError) as err:
        raise ValueError(
            f"{what} {shown}: its database driver is not installed ({err}); for PostgreSQL run "
            'pip install -e ".[postgres]" (psycopg 3, what postgresql:// uses), or name an installed driver '
            "in the URL (postgresql+psycopg2://...)"
        ) from err
    engine = sqlalchemy.create_engine(parsed, connect_args={"connect_timeout": timeout})
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.SQLAlchemyError as err:
        reason = " ".join(str(getattr(err, "orig", None) or err).split())
        raise ValueError(
            f"{what} {shown}: cannot connect ({reason}); check that the server runs, the database exists "
            "and the user may log in"
        ) from err
    finally:
        engine.dispose()


def check_tracking_uri(uri: str) -> None:
    """Refuse, naming the URI, a tracking store MLflow cannot open, before anything is created in it."""
    if url_scheme(uri) not in TRACKING_SCHEMES:  # a bare "databricks" included
        raise ValueError(
            f"tracking URI {uri!r} is not one MLflow can use here: give sqlite:///FILE.db, "
            "http(s)://HOST:PORT of an MLflow server, or a database URL (postgresql://...)"
        )
    check_database_folder(uri, "tracking URI")
    check_database_writable(uri, "tracking URI")
    check_database_server(uri, "tracking URI")
    check_tracking_server(uri)


def check_database_writable(url: str, what: str) -> None:
    """A SQLite URL whose file or folder cannot be written is an error naming it (``what``: the store's role).

    SQLite creates the database, and its journal beside it, in that folder: without write permission
    there, MLflow retries for minutes before it fails.
    """
    database = sqlite_file(url)
    if database is None:
        return
    database = database.resolve()
    if not os.access(database.parent, os.W_OK | os.X_OK):
        raise PermissionError(
            f"{what} {url}: no permission to write in {database.parent} (SQLite writes the database and its "
            "journal there); run from a folder you can write, or point the URI elsewhere"
        )
    if database.exists() and not os.access(database, os.W_OK):
        raise PermissionError(f"{what} {url}: {database} is read-only; make it writable or point the URI elsewhere")


def quiet_store_messages() -> None:
    """Keep MLflow's messages about creating and upgrading a store's tables off the terminal (warnings stay)."""
    for name in ("mlflow.store.db.utils", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


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


class Recorder:
    """Every MLflow write of one run: an explicit client bound to the run id, never MLflow's global state.

    Training must not stop because a tracking server went down. A failed call
    is queued; later calls are queued too until ``retry_after`` seconds have
    passed, then the queue is replayed in order before the new call. What never
    got through is named by :meth:`flush`'s warning. A recorder with no run
    (``Recorder.off()``) takes every call and does nothing.
    """

    def __init__(self, client: mlflow.MlflowClient | None, run_id: str | None, retry_after: float = 30.0) -> None:
        self.client = client
        self.run_id = run_id
        self.retry_after = retry_after
        self.queue: list[tuple[str, Callable[..., Any], tuple, dict]] = []
        self.failed_at = -1e9

    @classmethod
    def off(cls) -> Recorder:
        return cls(None, None)

    @classmethod
    def of_run(cls, tracking_uri: str, run_id: str) -> Recorder:
        """A recorder for an existing run (e.g. to add report files to it)."""
        return cls(mlflow.MlflowClient(tracking_uri), run_id)

    @classmethod
    def start(
        cls,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        run_id: str | None = None,
        parent_id: str | None = None,
        tags: dict[str, Any] | None = None,
    ) -> Recorder:
        """A new run in ``experiment`` (created if needed) nested under ``parent_id``; or ``run_id`` running again."""
        client = mlflow.MlflowClient(tracking_uri)
        if run_id is not None:
            client.update_run(run_id, status="RUNNING")
        else:
            found = client.get_experiment_by_name(experiment)
            if found is not None and found.lifecycle_stage != "active":
                raise ValueError(
                    f"MLflow experiment {experiment!r} in {tracking_uri} was deleted: restore it "
                    f"(mlflow experiments restore --experiment-id {found.experiment_id}) or use another name"
                )
            experiment_id = found.experiment_id if found else client.create_experiment(experiment)
            run_tags = {MLFLOW_RUN_NAME: run_name}
            if parent_id is not None:
                run_tags[MLFLOW_PARENT_RUN_ID] = parent_id
            run_id = client.create_run(experiment_id, run_name=run_name, tags=run_tags).info.run_id
        recorder = cls(client, run_id)
        if tags:
            recorder.set_tags(tags)
        return recorder

    @property
    def active(self) -> bool:
        return self.run_id is not None

    def call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Make one MLflow call for this run now, or queue it while the server is away."""
        if not self.active:
            return
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
                    warnings.warn(f"MLflow did not take {what} ({err}); training goes on, logs kept", stacklevel=4)
                self.failed_at = time.monotonic()
                return
            self.queue.pop(0)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.active:
            return
        stamp = int(time.time() * 1000)
        batch = [Metric(key, float(value), stamp, step) for key, value in metrics.items()]
        self.call(f"{len(batch)} metrics at step {step}", self.client.log_batch, self.run_id, metrics=batch)

    def log_metric_batch(self, what: str, metrics: list[Metric]) -> None:
        if not self.active:
            return
        self.call(what, self.client.log_batch, self.run_id, metrics=metrics)

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.active:
            return
        batch = [Param(key, str(value)) for key, value in params.items()]
        self.call(f"{len(batch)} params", self.client.log_batch, self.run_id, params=batch)

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not self.active:
            return
        batch = [RunTag(key, str(value)) for key, value in tags.items()]
        self.call(f"tags {sorted(tags)}", self.client.log_batch, self.run_id, tags=batch)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        """``path`` into the run's artifacts, at their root or under ``folder``."""
        if not self.active:
            return
        self.call(f"artifact {path}", self.client.log_artifact, self.run_id, str(path), folder)

    def log_image(self, image: Any, key: str, step: int) -> None:
        if not self.active:
            return
        self.call(f"image {key} at step {step}", self.client.log_image, self.run_id, image, key=key, step=step)

    def end(self, status: str = "FINISHED") -> list[str]:
        """Close the run (FINISHED, FAILED or KILLED) and flush; returns what was never logged."""
        if self.active:
            self.call(f"the end of run {self.run_id}", self.client.set_terminated, self.run_id, status)
        return self.flush()

    def flush(self) -> list[str]:
        """Try the queue once more; warn about and return what is still not logged."""
        self._replay()
        left = [what for what, *_ in self.queue]
        if left:
            shown = "; ".join(left[:5]) + (f"; ... {len(left) - 5} more" if len(left) > 5 else "")
            warnings.warn(f"{len(left)} MLflow call(s) not logged (tracking server unreachable): {shown}", stacklevel=2)
        return left
