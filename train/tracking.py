"""Where MLflow records go, how a training config becomes MLflow params, and the one recorder that writes them."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from mbu.train.config import TrainConfig


def quiet_store_messages() -> None:
    """Keep MLflow's messages about creating and upgrading a store's tables off the terminal (warnings stay)."""
    for name in ("mlflow.store.db.utils", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


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

    def log_folder_now(self, folder: str | Path, artifact_path: str) -> None:
        """``folder``'s files into the run's artifacts under ``artifact_path``, now: a failure raises instead of
        being queued, since the folder is usually temporary and gone before a retry could read it."""
        if self.active:
            self.client.log_artifacts(self.run_id, str(folder), artifact_path)

    def artifact_size(self, path: str) -> int | None:
        """The size in bytes of one of the run's artifacts as the store holds it; None where it is not listed."""
        if not self.active:
            return None
        folder = path.rsplit("/", 1)[0] if "/" in path else None
        listed = {item.path: item.file_size for item in self.client.list_artifacts(self.run_id, folder)}
        return listed.get(path)

    def log_image(self, image: Any, key: str, step: int) -> None:
        if not self.active:
            return
        self.call(f"image {key} at step {step}", self.client.log_image, self.run_id, image, key=key, step=step)

    def delete(self) -> None:
        """Mark the run deleted (hidden from the UI and from searches): work that never counted, e.g. a seed run
        a race trained ahead and then did not grant."""
        if self.active:
            self.call(f"the deletion of run {self.run_id}", self.client.delete_run, self.run_id)

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
