"""Run a study: prepare once, then ask Optuna for trials and tell it how each ended, until the target.

A launch (one worker) runs until the study has ``n_trials`` finished trials
(complete or pruned). Failed trials do not count; after ``max_failures``
failed trials in a row the launch stops. Several workers, here or on other
machines, may run one study at once: each takes the next trial while finished
plus running trials are short of the target, so they stop at it (two workers
asking for the very last trial at the same instant can both get one).

A worker holds up to ``population`` trials at once (:mod:`.population`).

Where each concern lives: ``storage`` (Optuna storage, sampler, pruner,
heartbeats, counts), ``study`` (opening a study: fingerprint, presets, run
folder), ``trial`` (one trial's training and scoring, no MLflow),
``population`` (a worker's trials in flight, stepped in turn), ``tracking``
(MLflow parent and trial runs), ``workers`` (launch lock, worker processes),
``study_report`` (summary, ranked trials, plots).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import optuna
from mbu.data.files import check_writable
from mbu.data.images import AnnotatedImages, load_domain
from mbu.data.synthetic import write_dataset
from mbu.evaluate.segmentation import load_test_annotations
from mbu.search.population import Outcome, Population
from mbu.search.sampler import record_draw
from mbu.search.storage import (
    Heartbeats,
    check_storage_url,
    count_finished,
    count_taken,
    heartbeat_ages,
    load_existing_study,
)
from mbu.search.study import check_study_folder, check_tracking_store, open_study
from mbu.search.study_file import StudyConfig, StudySettings
from mbu.search.study_report import StudySummary, summary_text, write_study_report
from mbu.search.tracking import open_parent_run
from mbu.search.workers import WorkersEnded, launch_lock, start_workers
from mbu.train.step import check_step_device, resolve_device
from mbu.train.tracking import Recorder, check_tracking_uri, resolve_tracking_uri

WORKER_ATTR = "worker"  # Optuna trial attribute: host:pid of the worker process that ran it
_stop_reason: str | None = None  # set by request_stop: this worker checkpoints its trials and ends


def request_stop(reason: str) -> None:
    """Ask this worker to stop (safe from a signal handler).

    At their next iteration its trials write a checkpoint, are recorded FAIL
    (error ``stopped: <reason>; ...``) with a retry queued that resumes from
    that checkpoint, and the worker asks for no more trials.
    """
    global _stop_reason
    _stop_reason = _stop_reason or reason


def stop_reason() -> str | None:
    return _stop_reason


@contextmanager
def stopping_on(*signals: int) -> Iterator[None]:
    """Within: these signals (e.g. SIGTERM from ``kill``, ``scancel`` or a scheduler) call :func:`request_stop`.

    The previous handlers come back on the way out.
    """
    previous = {number: signal.getsignal(number) for number in signals}
    for number in signals:
        signal.signal(number, lambda received, _frame: request_stop(signal.Signals(received).name))
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _positive(flag: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{flag} must be a positive integer, got {value!r}")


def resolve_settings(
    config: StudyConfig,
    storage: str | None,
    tracking_uri: str | None,
    n_trials: int | None,
    population: int | None = None,
) -> StudyConfig:
    """Command-line overrides applied over the study file, everything checked before anything is written."""
    _positive("--n-trials", n_trials)
    _positive("--population", population)
    settings = replace(
        config.study,
        storage=storage or config.study.storage,
        tracking_uri=resolve_tracking_uri(tracking_uri or config.study.tracking_uri),
        n_trials=n_trials or config.study.n_trials,
        population=population or config.study.population,
    )
    check_storage_url(settings.storage)
    check_tracking_uri(settings.tracking_uri)
    check_writable(config.study_dir, "[study].runs_dir")
    # A missing GPU (or a captured step without one) fails here, not in every trial.
    sample = config.trial_config({n: r.low for n, r in config.space.items()}, config.study_dir / "check")
    check_step_device(sample, resolve_device(sample.device, sample.gpu), f"{config.path}: [train].cuda_graph = true")
    return replace(config, study=settings)


def prepare_data(config: StudyConfig, progress: bool = True) -> Path:
    """The data root of the study, generating the synthetic set on first use."""
    root = config.resolved_data_root()
    if config.synthetic is not None:
        write_dataset(config.synthetic, root, progress)
    return root


def prepare_inputs(config: StudyConfig, progress: bool) -> AnnotatedImages:
    """Data generated if synthetic, training domains decoded into the cache, test annotations loaded.

    The decode cache then serves every trial and every worker.
    """
    root = prepare_data(config, progress)
    resize = config.trial_config({n: r.low for n, r in config.space.items()}, config.study_dir).resize
    skip_bad = bool(config.train.get("skip_bad", False))
    for name in ("trainA", "trainB"):
        load_domain(root, name, resize, progress, skip_bad)
    return load_test_annotations(root, resize, progress)


def prepare_study(config: StudyConfig, progress: bool) -> tuple[optuna.Study, AnnotatedImages, Recorder | None]:
    """Under the launch lock: the run folder checked, data and cache ready, the study open, its parent run.

    The parent run is opened only while the study is short of its target.
    """
    with launch_lock(config.study_dir):
        check_study_folder(config)
        check_tracking_store(config)
        annotated = prepare_inputs(config, progress)
        study = open_study(config)
        count_taken(study)  # fails (and queues retries of) trials whose worker died
        parent = open_parent_run(study, config) if count_finished(study) < config.study.n_trials else None
    return study, annotated, parent


def run_study(
    config: StudyConfig,
    storage: str | None = None,
    tracking_uri: str | None = None,
    n_trials: int | None = None,
    progress: bool = True,
    population: int | None = None,
) -> StudySummary:
    """Create or resume the study and run trials until it has ``n_trials`` finished ones (or stops).

    It stops early after ``max_failures`` failed trials in a row, or when :func:`request_stop` is called.
    """
    global _stop_reason
    _stop_reason = None  # a stop asked of an earlier run in this process is not this run's
    started = time.monotonic()
    config = resolve_settings(config, storage, tracking_uri, n_trials, population)
    study, annotated, parent = prepare_study(config, progress)
    ended = TrialsEnded()
    if parent is not None:
        status = "KILLED"  # unless the trials loop ends normally
        try:
            ended = run_trials(study, config, annotated, parent, progress)
            for path in write_study_report(study, config.study_dir):
                parent.log_artifact(path)
            status = "FINISHED"
        finally:
            parent.end(status)
    summary = StudySummary.of(study, config.study.storage, config.study.tracking_uri)
    summary.failed, summary.stopped_on_failures, summary.stopped_by = ended.failed, ended.on_failures, ended.stopped_by
    summary.wall_seconds = time.monotonic() - started
    return summary


@dataclass
class TrialsEnded:
    """What a worker's trials loop saw: its failed trials and why it stopped short of the target, if it did."""

    failed: list[tuple[int, str]] = field(default_factory=list)  # (trial number, error)
    on_failures: bool = False  # max_failures failed trials in a row
    stopped_by: str | None = None  # the reason given to request_stop


def run_trials(
    study: optuna.Study, config: StudyConfig, annotated: AnnotatedImages, parent: Recorder, progress: bool
) -> TrialsEnded:
    """Ask, run, tell, with up to ``population`` trials in flight, until the target is taken (or a stop)."""
    settings = config.study
    ended = TrialsEnded()
    in_a_row = 0

    def record(outcome: Outcome) -> None:
        nonlocal in_a_row
        heartbeats.remove(outcome.trial)
        if outcome.state == "FAIL":
            ended.failed.append((outcome.number, outcome.error))
            print(f"trial {outcome.number} failed: {outcome.error}", file=sys.stderr, flush=True)
        in_a_row = in_a_row + 1 if outcome.state == "FAIL" else 0
        # Once that many failed in a row the worker asks for no more, even if a trial in flight completes.
        ended.on_failures = ended.on_failures or in_a_row >= settings.max_failures

    told: set[tuple] = set()  # trials running elsewhere that this worker has already spoken of
    population = Population(study, config, annotated, parent, progress)
    with Heartbeats(study, settings.heartbeat_interval) as heartbeats:
        try:
            while True:
                while not population.full and stop_reason() is None and not ended.on_failures:
                    if count_taken(study) >= settings.n_trials:
                        break
                    trial = ask(study)
                    heartbeats.add(trial)
                    outcome = population.start(trial)
                    if outcome is not None:
                        record(outcome)
                if stop_reason() is not None:
                    for outcome in population.stop(stop_reason()):
                        record(outcome)
                    ended.stopped_by = stop_reason()
                    break
                if not population.slots:
                    wait = None if ended.on_failures else wait_for_lost_workers(study, settings, told)
                    if wait is None:
                        break
                    pause(wait, stop_reason)
                    continue
                for outcome in population.advance(stop_reason):
                    record(outcome)
        except BaseException as err:  # Ctrl-C, a storage error: no trial of this worker is left RUNNING
            population.abandon(err)
            raise
        finally:
            population.close()
    ended.on_failures = ended.on_failures and ended.stopped_by is None and count_taken(study) < settings.n_trials
    return ended


def wait_for_lost_workers(study: optuna.Study, settings: StudySettings, told: set[tuple]) -> float | None:
    """Seconds to wait for a silent worker's trial to become retryable; None when this worker is done.

    Reached when the target is taken but not finished: the missing trials run in other workers. A
    trial whose worker is alive is left to it; one whose worker has been silent (killed, say) is
    retried once the grace period has passed, and this worker waits for that rather than exiting
    short of the target.
    """
    if count_finished(study) >= settings.n_trials:
        return None
    ages = heartbeat_ages(study)
    silent = {number: age for number, age in ages.items() if age > 2 * settings.heartbeat_interval}
    if not silent:
        if not ages:
            return None
        # A fresh heartbeat may be a worker's last: look again once a silent one would show.
        if ("checked", *sorted(ages)) not in told:
            told.add(("checked", *sorted(ages)))
            return 2 * settings.heartbeat_interval - max(ages.values()) + 1
        running = ", ".join(str(n) for n in sorted(ages))
        print(f"mbu search: trial {running} running in another worker (heartbeats fresh); it finishes the study")
        return None
    number = min(silent, key=lambda n: settings.grace_period - silent[n])
    left = max(1.0, settings.grace_period - silent[number] + 1)
    if ("silent", number) not in told:
        told.add(("silent", number))
        print(
            f"mbu search: trial {number} is RUNNING but its worker has been silent for {silent[number]:.0f} s; "
            f"it is failed and retried after the grace period ([study].grace_period = {settings.grace_period} s), "
            f"in about {left:.0f} s: waiting",
            flush=True,
        )
    return left


def pause(seconds: float, stop: Callable[[], str | None]) -> None:
    """Sleep, waking early for a stop."""
    deadline = time.monotonic() + seconds
    while stop() is None and time.monotonic() < deadline:
        time.sleep(min(1.0, deadline - time.monotonic()))


def ask(study: optuna.Study) -> optuna.Trial:
    """The next trial (a queued preset or retry first); this worker beats for it itself (:class:`Heartbeats`)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        trial = study.ask()
    trial.set_user_attr(WORKER_ATTR, f"{socket.gethostname()}:{os.getpid()}")
    record_draw(trial)
    return trial


def launch_workers(
    config: StudyConfig,
    workers: int,
    gpus: list[str] | None = None,
    storage: str | None = None,
    tracking_uri: str | None = None,
    n_trials: int | None = None,
    progress: bool = True,
    verbose: bool = False,
    population: int | None = None,
) -> tuple[StudySummary, WorkersEnded]:
    """Prepare the study here, then run ``workers`` worker processes on it; the summary and how they ended."""
    started = time.monotonic()
    config = resolve_settings(config, storage, tracking_uri, n_trials, population)
    _, _, parent = prepare_study(config, progress)
    if parent is not None:
        parent.end("FINISHED")  # each worker opens it again through the study and logs to it
    ended = start_workers(config, workers, gpus, verbose)
    study = load_existing_study(config.study.name, config.study.storage)
    summary = StudySummary.of(study, config.study.storage, config.study.tracking_uri)
    summary.wall_seconds = time.monotonic() - started
    summary.stopped_by = ended.stopped_by
    return summary, ended


def study_summary(config: StudyConfig, storage: str | None = None, tracking_uri: str | None = None) -> str:
    """``mbu search --summary``: runs nothing."""
    storage = storage or config.study.storage
    study = load_existing_study(config.study.name, storage)
    uri = resolve_tracking_uri(tracking_uri or config.study.tracking_uri)
    return summary_text(study, storage, uri, config.study_dir)
