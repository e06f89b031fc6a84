"""Run a study: prepare once, then ask Optuna for trials and tell it how each ended, until the target.

A launch (one worker) runs until the study has ``n_trials`` finished trials
(complete or pruned). Failed trials do not count; after ``max_failures``
failed trials in a row the launch stops. Several workers, here or on other
machines, may run one study at once: each takes the next trial while finished
plus running trials are short of the target, so they stop at it (two workers
asking for the very last trial at the same instant can both get one).

Where each concern lives: ``storage`` (Optuna storage, sampler, pruner,
heartbeats, counts), ``study`` (opening a study: fingerprint, presets, run
folder), ``trial`` (one trial's training and scoring, no MLflow), ``tracking``
(MLflow parent and trial runs), ``workers`` (launch lock, worker processes),
``study_report`` (summary, ranked trials, plots).
"""

from __future__ import annotations

import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import optuna
from mbu.data.files import check_writable
from mbu.data.images import AnnotatedImages, load_domain
from mbu.data.synthetic import write_dataset
from mbu.evaluate.segmentation import load_test_annotations
from mbu.search.storage import Heartbeats, check_storage_url, count_taken, load_existing_study
from mbu.search.study import check_study_folder, open_study
from mbu.search.study_file import StudyConfig
from mbu.search.study_report import StudySummary, summary_text, write_study_report
from mbu.search.tracking import close_trial_run, open_parent_run, open_trial_run
from mbu.search.trial import sampled_config, train_and_score
from mbu.search.workers import launch_lock, start_workers
from mbu.train.step import resolve_device
from mbu.train.tracking import Recorder, check_tracking_uri, resolve_tracking_uri

IN_FLIGHT = 1  # trials a worker holds at once (several per GPU process is the next capability)


def resolve_settings(
    config: StudyConfig, storage: str | None, tracking_uri: str | None, n_trials: int | None
) -> StudyConfig:
    """Command-line overrides applied over the study file, everything checked before anything is written."""
    if n_trials is not None and (isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1):
        raise ValueError(f"--n-trials must be a positive integer, got {n_trials!r}")
    settings = replace(
        config.study,
        storage=storage or config.study.storage,
        tracking_uri=resolve_tracking_uri(tracking_uri or config.study.tracking_uri),
        n_trials=n_trials or config.study.n_trials,
    )
    check_storage_url(settings.storage)
    check_tracking_uri(settings.tracking_uri)
    check_writable(config.study_dir, "[study].runs_dir")
    resolve_device(str(config.train.get("device", "auto")))  # a missing GPU fails here, not in every trial
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

    The parent run is opened only when trials remain to be run.
    """
    with launch_lock(config.study_dir):
        check_study_folder(config)
        annotated = prepare_inputs(config, progress)
        study = open_study(config)
        parent = open_parent_run(study, config) if count_taken(study) < config.study.n_trials else None
    return study, annotated, parent


def run_study(
    config: StudyConfig,
    storage: str | None = None,
    tracking_uri: str | None = None,
    n_trials: int | None = None,
    progress: bool = True,
) -> StudySummary:
    """Create or resume the study and run trials until it has ``n_trials`` finished ones (or stops on failures)."""
    started = time.monotonic()
    config = resolve_settings(config, storage, tracking_uri, n_trials)
    study, annotated, parent = prepare_study(config, progress)
    failed: list[tuple[int, str]] = []
    stopped = False
    if parent is not None:
        status = "KILLED"  # unless the trials loop ends normally
        try:
            failed, stopped = run_trials(study, config, annotated, parent, progress)
            for path in write_study_report(study, config.study_dir):
                parent.log_artifact(path)
            status = "FINISHED"
        finally:
            parent.end(status)
    summary = StudySummary.of(study, config.study.storage, config.study.tracking_uri)
    summary.failed, summary.stopped_on_failures = failed, stopped
    summary.wall_seconds = time.monotonic() - started
    return summary


def run_trials(
    study: optuna.Study, config: StudyConfig, annotated: AnnotatedImages, parent: Recorder, progress: bool
) -> tuple[list[tuple[int, str]], bool]:
    """Ask, run, tell, until the target is taken; returns this worker's failed trials and whether they stopped it."""
    settings = config.study
    failed: list[tuple[int, str]] = []
    in_a_row = 0
    with Heartbeats(study, settings.heartbeat_interval) as heartbeats:
        while count_taken(study) < settings.n_trials:
            if in_a_row >= settings.max_failures:
                return failed, True
            trials = [ask(study) for _ in range(IN_FLIGHT)]
            for trial in trials:
                heartbeats.add(trial)
            for trial in trials:
                try:
                    state, error = run_trial(study, trial, config, annotated, parent, progress)
                finally:
                    heartbeats.remove(trial)
                if state == "FAIL":
                    failed.append((trial.number, error))
                    print(f"trial {trial.number} failed: {error}", file=sys.stderr, flush=True)
                in_a_row = in_a_row + 1 if state == "FAIL" else 0
    return failed, False


def ask(study: optuna.Study) -> optuna.Trial:
    """The next trial (a queued preset or retry first); this worker beats for it itself (:class:`Heartbeats`)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        return study.ask()


def run_trial(
    study: optuna.Study,
    trial: optuna.Trial,
    config: StudyConfig,
    annotated: AnnotatedImages,
    parent: Recorder,
    progress: bool,
) -> tuple[str, str]:
    """One trial, from its MLflow run to Optuna's verdict; returns its state and, for a failure, the error."""
    run = None
    try:
        cfg = sampled_config(trial, config)
        run = open_trial_run(trial, config, cfg, parent)
        value = train_and_score(trial, cfg, annotated, run, progress)
    except optuna.TrialPruned:
        close_trial_run(run, trial, "PRUNED")
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return "PRUNED", ""
    except (Exception, KeyboardInterrupt) as err:  # recorded, never left RUNNING; Ctrl-C then stops the worker
        error = f"{type(err).__name__}: {err}"
        if run is not None:
            close_trial_run(run, trial, "FAIL", error)
        trial.set_user_attr("error", error[:1000])
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        if isinstance(err, KeyboardInterrupt):
            raise
        return "FAIL", error
    close_trial_run(run, trial, "COMPLETE")
    study.tell(trial, value)
    return "COMPLETE", ""


def launch_workers(
    config: StudyConfig,
    workers: int,
    gpus: list[str] | None = None,
    storage: str | None = None,
    tracking_uri: str | None = None,
    n_trials: int | None = None,
    progress: bool = True,
    verbose: bool = False,
) -> tuple[StudySummary, list[int]]:
    """Prepare the study here, then run ``workers`` worker processes on it; returns the summary and exit codes."""
    started = time.monotonic()
    config = resolve_settings(config, storage, tracking_uri, n_trials)
    _, _, parent = prepare_study(config, progress)
    if parent is not None:
        parent.end("FINISHED")  # each worker opens it again through the study and logs to it
    codes = start_workers(config, workers, gpus, verbose)
    study = load_existing_study(config.study.name, config.study.storage)
    summary = StudySummary.of(study, config.study.storage, config.study.tracking_uri)
    summary.wall_seconds = time.monotonic() - started
    return summary, codes


def study_summary(config: StudyConfig, storage: str | None = None, tracking_uri: str | None = None) -> str:
    """``mbu search --summary``: runs nothing."""
    storage = storage or config.study.storage
    study = load_existing_study(config.study.name, storage)
    uri = resolve_tracking_uri(tracking_uri or config.study.tracking_uri)
    return summary_text(study, storage, uri, config.study_dir)
