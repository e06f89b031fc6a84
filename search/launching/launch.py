"""Launching a study: the options a launch takes, preparing the study once, and the two local launchers.

Every launch (``mbu search`` in this process, ``--workers``, ``--slurm``) goes
the same way: the study file's settings with the flags' :class:`LaunchOptions`
over them, checked once (:func:`resolve_settings`); the study prepared under
the launch lock (data, decode cache, study, parent run: :func:`prepare_study`);
then trials, here (:func:`run_study`) or in worker processes, each handed the
resolved study as a :class:`WorkerJob` (:func:`launch_workers`, ``search.cluster.slurm``,
``search.cluster.worker_main``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import optuna

from mbu.base.urls import check_tracking_uri, missing_sqlite_file, resolve_tracking_uri
from mbu.data.files import check_writable
from mbu.data.images import AnnotatedImages, load_domain
from mbu.data.synthetic import write_dataset
from mbu.evaluate.segmentation import load_test_annotations
from mbu.search.cluster.workers import WorkersEnded, launch_lock, start_workers
from mbu.search.judging.confirm import pending, prepare_stage, run_stage
from mbu.search.judging.confirm_report import confirmation_lines
from mbu.search.judging.study_report import StudySummary, summary_text, write_study_report
from mbu.search.launching.storage import (
    check_storage_url,
    count_finished,
    count_states,
    count_taken,
    count_waiting,
    load_existing_study,
)
from mbu.search.launching.study import check_study_folder, check_tracking_store, open_study
from mbu.search.running.runner import TrialsEnded, run_trials
from mbu.search.running.tracking import open_parent_run
from mbu.search.studyfile.confirm_settings import ConfirmSettings, confirm_problem
from mbu.search.studyfile.study_file import StudyConfig
from mbu.search.studyfile.typed_tables import positive_integer_problem
from mbu.train.step import check_step_device, resolve_device
from mbu.train.stop import StopRequest
from mbu.train.tracking import Recorder


@dataclass(frozen=True, kw_only=True)
class LaunchOptions:
    """What a launch takes from its flags; None keeps the study file's value."""

    storage: str | None = None  # --storage over [study].storage
    tracking_uri: str | None = None  # --tracking-uri over [study].tracking_uri and $MLFLOW_TRACKING_URI
    n_trials: int | None = None  # --n-trials over [study].n_trials
    population: int | None = None  # --population over [study].population
    progress: bool = True  # progress bars (--no-progress turns them off)
    verbose: bool = False  # libraries' own log lines (--verbose), passed on to worker processes
    top_k: int | None = None  # --top-k over [confirm].top_k
    seeds: int | None = None  # --seeds over [confirm].seeds
    presets: bool | None = None  # --presets / --no-presets over [confirm].presets
    confirm_only: bool = False  # mbu confirm: no search trials, and the search must have its n_trials


@dataclass(frozen=True)
class WorkerJob:
    """What a launcher hands each of its workers (``--workers`` processes, SLURM tasks), pickled:
    the study with the launch's flags applied, the options, and the command that goes on after a stop."""

    config: StudyConfig  # resolved (:func:`resolve_settings`): every override already in it
    options: LaunchOptions  # the launcher's, with progress bars off (a worker writes to a log)
    relaunch: str  # what the worker's stop message tells the user to run


def positive_integer(flag: str, value: int | None) -> None:
    """A flag that must be a positive integer when given (None: not given)."""
    problem = None if value is None else positive_integer_problem(value)
    if problem is not None:
        raise ValueError(f"{flag} {problem}")


def resolve_settings(config: StudyConfig, options: LaunchOptions) -> StudyConfig:
    """The options applied over the study file, everything checked before anything is written."""
    positive_integer("--n-trials", options.n_trials)
    positive_integer("--population", options.population)
    settings = replace(
        config.study,
        storage=options.storage or config.study.storage,
        tracking_uri=resolve_tracking_uri(options.tracking_uri or config.study.tracking_uri),
        n_trials=options.n_trials or config.study.n_trials,
        population=options.population or config.study.population,
    )
    check_storage_url(settings.storage)
    check_tracking_uri(settings.tracking_uri)
    confirm = resolve_confirm(config, options, settings.n_trials)
    if options.confirm_only:
        check_search_done(replace(config, study=settings))
    check_writable(config.study_dir, "[study].runs_dir")
    # A missing GPU (or a captured step without one) fails here, not in every trial.
    sample = config.sample_at_lows()
    check_step_device(sample, resolve_device(sample.device, sample.gpu), f"{config.path}: [train].cuda_graph = true")
    return replace(config, study=settings, confirm=confirm)


def resolve_confirm(config: StudyConfig, options: LaunchOptions, n_trials: int) -> ConfirmSettings | None:
    """``[confirm]`` with the flags over it; a flag (or ``mbu confirm``) without the table uses its defaults."""
    given = {"top_k": options.top_k, "seeds": options.seeds, "presets": options.presets}
    given = {key: value for key, value in given.items() if value is not None}
    if config.confirm is None and not given and not options.confirm_only:
        return None
    confirm = replace(config.confirm or ConfirmSettings(), **given)
    problem = confirm_problem(confirm)
    if problem is not None:
        raise ValueError(f"--{problem[0].replace('_', '-')} {problem[1]}")
    if confirm.top_k > n_trials:
        raise ValueError(
            f"[confirm].top_k = {confirm.top_k} is more than the study's n_trials ({n_trials}): "
            "it can never have that many complete trials"
        )
    return confirm


def check_search_done(config: StudyConfig) -> None:
    """``mbu confirm``: the search must have its ``n_trials`` finished trials (read without writing)."""
    finished, storage = 0, config.study.storage
    if missing_sqlite_file(storage) is None:
        try:
            finished = count_finished(optuna.load_study(study_name=config.study.name, storage=storage))
        except KeyError:
            pass  # no such study yet
    if finished < config.study.n_trials:
        raise ValueError(
            f"study {config.study.name} has {finished} of {config.study.n_trials} finished trials; "
            f"run mbu search {config.path} first"
        )


def prepare_data(config: StudyConfig, progress: bool = True) -> Path:
    """The data root of the study, generating the synthetic set on first use."""
    root = config.resolved_data_root()
    if config.synthetic is not None:
        write_dataset(config.synthetic, root, progress)
    return root


def prepare_inputs(config: StudyConfig, progress: bool) -> AnnotatedImages:
    """The data written (if synthetic) and checked, the decode cache filled, the test annotations loaded.

    The training domains are decoded here only to fill the cache (and to fail on a bad image before any
    trial starts); every trial and worker then reads them from it.
    """
    root = prepare_data(config, progress)
    resize = config.sample_at_lows().resize
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


def prepare_for_workers(config: StudyConfig, progress: bool) -> bool:
    """Prepare the study for workers in other processes; False when it already has its target.

    The parent run is closed again here: each worker reopens it through the study and logs to it.
    """
    study, _, parent = prepare_study(config, progress)
    if parent is not None:
        parent.end("FINISHED")
        return True
    if config.confirm is not None:
        with launch_lock(config.study_dir):
            if pending(prepare_stage(config, study)):  # also refuses a top_k the study cannot fill
                return True
    also = " and its confirmation runs" if config.confirm is not None else ""
    print(f"study {config.study.name} already has its {config.study.n_trials} trials{also}: nothing launched")
    return False


def run_study(
    config: StudyConfig, options: LaunchOptions | None = None, stop: StopRequest | None = None
) -> StudySummary:
    """Create or resume the study and run trials in this process until it has ``n_trials`` finished ones.

    It stops early after ``max_failures`` failed trials in a row, or once ``stop`` is requested (by the
    command's signal handlers): then its trials in flight write a checkpoint, are recorded FAIL
    (error ``stopped: <reason>; ...``) with a retry queued that resumes from it, and it asks for no more.
    """
    options = options or LaunchOptions()
    stop = stop or StopRequest()
    started = time.monotonic()
    config = resolve_settings(config, options)
    study, annotated, parent = prepare_study(config, options.progress)
    ended = TrialsEnded()
    if parent is not None:
        status = "KILLED"  # unless the trials loop ends normally
        try:
            ended = run_trials(study, config, annotated, parent, options.progress, stop)
            for path in write_study_report(study, config.study_dir):
                parent.log_artifact(path)
            status = "FINISHED"
        finally:
            parent.end(status)
    searched = not ended.stopped_by and not ended.on_failures and count_finished(study) >= config.study.n_trials
    confirmed = ConfirmEnded()
    if config.confirm is not None and searched:
        confirmed = confirm_study(config, study, annotated, options.progress, stop)
    return launch_summary(
        config,
        study,
        started,
        failed=ended.failed + confirmed.failed,
        stopped_on_failures=ended.on_failures,
        stopped_by=ended.stopped_by or confirmed.stopped_by,
        confirm_problem=confirmed.problem,
    )


def launch_summary(config: StudyConfig, study: optuna.Study, started: float, **ended: object) -> StudySummary:
    """What every launch prints at its end: the study as its storage holds it, and how this launch ``ended``
    (:class:`StudySummary` fields: failed trials, the stop, a confirmation problem)."""
    summary = StudySummary.of(study, config.study.storage, config.study.tracking_uri)
    summary.target = config.study.n_trials
    summary.confirmation = confirmation_lines(config.study_dir, config.path)
    summary.wall_seconds = time.monotonic() - started
    return replace(summary, **ended)


@dataclass
class ConfirmEnded:
    """How a worker's confirmation stage ended."""

    failed: list[tuple[int, str]] = field(default_factory=list)  # its failed runs: (number, "confirmation run: ...")
    stopped_by: str | None = None  # the signal that stopped it
    problem: str | None = None  # it ended short of its runs: said on stderr, exit 1


def confirm_study(
    config: StudyConfig, study: optuna.Study, annotated: AnnotatedImages, progress: bool, stop: StopRequest
) -> ConfirmEnded:
    """The confirmation stage in this worker, once the search has its target."""
    stage, ended, _ = run_stage(config, study, annotated, progress, stop)
    write_study_report(study, config.study_dir)  # now with its confirmation section
    outcome = ConfirmEnded([(number, f"confirmation run: {error}") for number, error in ended.failed], ended.stopped_by)
    finished, target = count_finished(stage.study), stage.config.study.n_trials
    live = count_states(stage.study).get("RUNNING", 0) + count_waiting(stage.study)
    if ended.stopped_by is None and ((finished < target and not live) or stage.abandoned):
        given_up = f"; given up after repeated failures: {stage.abandoned}" if stage.abandoned else ""
        outcome.problem = (
            f"the confirmation ended with {finished} of {target} runs finished{given_up}; launching it again "
            f"queues failed runs again (up to [study].max_retry times): mbu confirm {config.path}"
        )
    return outcome


def launch_workers(
    config: StudyConfig, options: LaunchOptions, workers: int, gpus: list[str] | None = None, relaunch: str = ""
) -> tuple[StudySummary, WorkersEnded]:
    """Prepare the study here, then run ``workers`` worker processes on it; the summary and how they ended.

    ``relaunch`` is the command that goes on after a stop, which each worker's log repeats.
    """
    started = time.monotonic()
    config = resolve_settings(config, options)
    ended = WorkersEnded([])
    if prepare_for_workers(config, options.progress):
        job = WorkerJob(config, replace(options, progress=False), relaunch or f"mbu search {config.path}")
        ended = start_workers(job, config.study_dir, workers, gpus)
    study = load_existing_study(config.study.name, config.study.storage)
    return launch_summary(config, study, started, stopped_by=ended.stopped_by), ended


def study_summary(config: StudyConfig, options: LaunchOptions) -> str:
    """``mbu search --summary``: runs nothing."""
    storage = options.storage or config.study.storage
    study = load_existing_study(config.study.name, storage)
    uri = resolve_tracking_uri(options.tracking_uri or config.study.tracking_uri)
    confirmation = confirmation_lines(config.study_dir, config.path)
    from mbu.search.judging.registry import champion_line  # imports MLflow's model code: only --summary needs it

    champion = champion_line(config, uri)
    lines = [summary_text(study, storage, uri, config.study_dir), *confirmation]
    return "\n".join([*lines, champion] if champion else lines)
