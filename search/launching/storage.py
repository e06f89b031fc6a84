"""The Optuna side of a study: storage URLs, heartbeats and trial counts (samplers: ``search.launching.sampler``).

A study lives in an RDB storage (SQLite by default, PostgreSQL for several
machines) with heartbeats: a running trial beats every ``heartbeat_interval``
seconds, and one silent for ``grace_period`` is failed by the next worker that
looks, which calls the storage's stale-trial callback (``search.running.tracking``
closes its MLflow run and queues a retry).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from types import TracebackType

import optuna
import sqlalchemy
from optuna.storages import RDBStorage

from mbu.base.urls import check_database_folder, check_database_server, missing_sqlite_file, url_scheme
from mbu.search.studyfile.study_file import StudySettings

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)  # count towards n_trials
TAKEN = (*FINISHED, optuna.trial.TrialState.RUNNING)  # finished, or being worked on by some worker
SQLITE_BUSY_TIMEOUT = 120  # seconds a worker waits for another's write lock on a SQLite file
STORAGE_SCHEMES = ("sqlite", "postgresql", "mysql")

StaleTrialCallback = Callable[[optuna.Study, optuna.trial.FrozenTrial], None]


def check_storage_url(url: str) -> None:
    """Refuse, naming it, an Optuna storage URL that cannot be opened, before any study is created."""
    if url_scheme(url) not in STORAGE_SCHEMES:
        raise ValueError(
            f"Optuna storage {url!r} is not a database URL: give sqlite:///FILE.db or postgresql://USER@HOST/DB"
        )
    check_database_folder(url, "Optuna storage")
    check_database_server(url, "Optuna storage")


def make_storage(settings: StudySettings, on_stale_trial: StaleTrialCallback | None = None) -> RDBStorage:
    """The study's storage with heartbeats; ``on_stale_trial`` handles a trial whose worker died."""
    url = settings.storage
    # SQLite: wait for another worker's write lock instead of failing at once ("database is locked").
    engine_kwargs = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT}} if url.startswith("sqlite") else {}
    if url.startswith(("postgresql", "mysql")):
        engine_kwargs["pool_pre_ping"] = True  # connections that a server closed are replaced, not used
    with warnings.catch_warnings(category=optuna.exceptions.ExperimentalWarning, action="ignore"):
        return RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=settings.heartbeat_interval,
            grace_period=settings.grace_period,
            heartbeat_stale_trial_callback=on_stale_trial,
        )


def load_existing_study(name: str, storage: str) -> optuna.Study:
    """A study that must already exist: a missing SQLite file or study name is an error, and nothing is created."""
    check_storage_url(storage)
    database = missing_sqlite_file(storage)
    if database is not None:
        raise ValueError(f"no Optuna storage at {database} ({storage}): launch the study first, or pass --storage")
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError as err:
        raise ValueError(f"no study named {name!r} in {storage}: launch it first") from err


def heartbeat_ages(study: optuna.Study) -> dict[int, float]:
    """Seconds since the last heartbeat of each RUNNING trial of the study, by trial number.

    Optuna keeps heartbeats in its own table and offers no reader for them; this reads that table
    the way its stale-trial check does, with the database's clock on both sides.
    """
    from optuna.storages._rdb import models  # private, but the only record of when a worker last beat

    backend = getattr(study._storage, "_backend", study._storage)  # the RDBStorage under Optuna's cache
    session = backend.scoped_session()
    try:
        now = session.execute(sqlalchemy.func.now()).scalar_one().replace(tzinfo=None)
        rows = (
            session.query(models.TrialModel.number, models.TrialHeartbeatModel.heartbeat)
            .join(models.TrialHeartbeatModel, models.TrialHeartbeatModel.trial_id == models.TrialModel.trial_id)
            .filter(models.TrialModel.study_id == study._study_id)
            .filter(models.TrialModel.state == optuna.trial.TrialState.RUNNING)
            .all()
        )
    finally:
        session.close()
    return {number: (now - beat.replace(tzinfo=None)).total_seconds() for number, beat in rows}


def count_states(study: optuna.Study) -> dict[str, int]:
    """Trials by state name (COMPLETE, PRUNED, FAIL, RUNNING, WAITING)."""
    states: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        states[trial.state.name] = states.get(trial.state.name, 0) + 1
    return states


def count_taken(study: optuna.Study) -> int:
    """Finished plus running trials, after failing (and queueing retries of) those whose worker died."""
    with warnings.catch_warnings(category=optuna.exceptions.ExperimentalWarning, action="ignore"):
        optuna.storages.fail_stale_trials(study)  # a dead worker's trial must not count as running
    return len(study.get_trials(deepcopy=False, states=TAKEN))


def count_waiting(study: optuna.Study) -> int:
    """Queued trials (presets, retries, confirmation runs) not yet taken by a worker."""
    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))


def count_finished(study: optuna.Study) -> int:
    """Complete plus pruned trials: what counts towards ``n_trials``."""
    return len(study.get_trials(deepcopy=False, states=FINISHED))


class Heartbeats:
    """Beat for every trial in flight, from a thread (Optuna beats only inside its own ``optimize``).

    Use as a context manager; :meth:`add` a trial when it is asked, :meth:`remove` it once told.
    """

    def __init__(self, study: optuna.Study, interval: float) -> None:
        self.storage = study._storage
        self.interval = interval
        self.in_flight: set[int] = set()  # storage ids of the trials this worker runs
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="optuna-heartbeats", daemon=True)

    def add(self, trial: optuna.Trial) -> None:
        self.storage.record_heartbeat(trial._trial_id)  # at once: a trial is never silent from its start
        with self._lock:
            self.in_flight.add(trial._trial_id)

    def remove(self, trial: optuna.Trial) -> None:
        with self._lock:
            self.in_flight.discard(trial._trial_id)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                ids = sorted(self.in_flight)
            for trial_id in ids:
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception as err:  # a storage hiccup: the next beat tries again; the grace period absorbs it
                    warnings.warn(f"heartbeat of trial id {trial_id} not recorded: {err}", stacklevel=2)

    def __enter__(self) -> Heartbeats:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
