"""Run a study: Optuna samples, each trial trains and evaluates, MLflow records it."""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import mlflow
import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

from data.files import check_writable
from data.images import AnnotatedImages, load_domain
from data.synthetic import write_dataset
from evaluate.report import score_and_report
from evaluate.segmentation import figure_warnings, load_test_annotations, predict_masks, score_masks
from evaluate.tracking import RUN_FILE, log_scores
from search.study_file import StudyConfig, StudyFileError, StudySettings
from search.study_report import importance_caveat, param_importances, write_study_report
from search.tracking import PARENT_ROLE, PARENT_RUN_ATTR, RUN_ID_ATTR, ui_command
from train import tracking
from train.checkpoint import CHECKPOINT_FILE, CheckpointError, load_checkpoint, write_json
from train.config import TrainConfig
from train.loop import train
from train.model import ContentTransferModel
from train.step import resolve_device
from train.tracking import check_tracking_uri, resolve_tracking_uri, sqlite_file, train_params

OBJECTIVE_KEY = "val/iou_best"
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
TAKEN = (*FINISHED, optuna.trial.TrialState.RUNNING)  # trials that count towards n_trials
SQLITE_BUSY_TIMEOUT = 120  # seconds a worker waits for another's write lock on a SQLite file
STUDY_UID_ATTR = "mbu_study_uid"  # Optuna study attribute: tells a study from a recreated one of the same name
STUDY_RECORD = "study.json"  # in runs/<study>/: the storage and study uid the folder belongs to
FINGERPRINT_ATTR = "mbu_fingerprint"  # Optuna study attribute: the space, fixed settings and data it was made with
SUMMARY_METRICS = ("val/iou_best", "val/threshold_best", "test/iou", "test/iou_oracle", "baseline/iou_all_ones")


@dataclass
class StudySummary:
    study_name: str
    storage: str
    tracking_uri: str
    states: dict[str, int]  # trial count by state
    best_params: dict[str, float] = field(default_factory=dict)
    best_number: int | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)  # the best trial's report metrics
    wall_seconds: float = 0.0

    def format(self) -> str:
        lines = [f"study {self.study_name}: " + ", ".join(f"{n} {s}" for s, n in sorted(self.states.items()))]
        if self.best_number is None:
            lines.append("no trial has completed yet")
        else:
            lines.append(f"best trial: #{self.best_number}")
            shown = [k for k in SUMMARY_METRICS if k in self.best_metrics]
            width = max(len(k) for k in [*self.best_params, *shown])
            for key, value in sorted(self.best_params.items()):
                lines.append(f"  {key:<{width}}  {value:.6g}")
            for key in shown:
                lines.append(f"  {key:<{width}}  {self.best_metrics[key]:.4f}")
            lines += [f"warning: {note}" for note in figure_warnings(self.best_metrics)]
        lines.append(f"optuna storage: {self.storage}")
        lines.append(f"compare trials: {ui_command(self.tracking_uri)}")
        if self.wall_seconds:
            lines.append(f"wall time: {self.wall_seconds:.0f} s")
        return "\n".join(lines)


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    """The study file's sampler, seeded."""
    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed),
        "gp": lambda: optuna.samplers.GPSampler(seed=seed),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
    }
    return samplers[name]()


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    """The study file's pruner; it judges the validation IoU reported every ``eval_every`` iterations."""
    pruners = {
        "none": optuna.pruners.NopPruner,
        "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2),
        "hyperband": optuna.pruners.HyperbandPruner,
    }
    return pruners[name]()


def prepare_data(config: StudyConfig, progress: bool = True) -> Path:
    """The data root of the study, generating the synthetic set on first use."""
    root = config.resolved_data_root()
    if config.synthetic is not None:
        write_dataset(config.synthetic, root, progress)
    return root


def make_objective(
    config: StudyConfig, annotated: AnnotatedImages, progress: bool = True
) -> Callable[[optuna.Trial], float]:
    """The function Optuna calls per trial: sample, train, evaluate, record."""

    def objective(trial: optuna.Trial) -> float:
        params = {name: trial.suggest_float(name, rng.low, rng.high, log=rng.log) for name, rng in config.space.items()}
        run_dir = config.study_dir / f"trial-{trial.number}"
        cfg = config.trial_config(params, run_dir)
        resume = checkpoint_to_resume(trial, config.study_dir)
        if resume is not None:
            cfg = replace(cfg, load=str(resume[0]))
        # Not a context manager: its exit would end the parent run after ours is ended.
        run = mlflow.start_run(run_name=f"trial-{trial.number}", nested=True)
        trial.set_user_attr(RUN_ID_ATTR, run.info.run_id)
        write_json(run_dir / RUN_FILE, {"run_id": run.info.run_id, "study": config.study.name, "trial": trial.number})
        tracking.set_tags({"trial_number": trial.number, "study": config.study.name, "state": "RUNNING"})
        if resume is not None:
            trial.set_user_attr("resumed_from_iteration", resume[1])
            tracking.set_tags({"resumed_from": str(resume[0]), "resumed_from_iteration": resume[1]})
        tracking.log_params(train_params(cfg))
        try:
            value = _train_and_score(trial, cfg, annotated, progress)
        except optuna.TrialPruned:
            tracking.set_tags({"state": "PRUNED"})
            _end_trial_run(trial, "KILLED")
            raise
        except BaseException as err:  # Ctrl-C included: never leave a run RUNNING
            tracking.set_tags({"state": "FAIL", "error": f"{type(err).__name__}: {err}"[:5000]})
            _end_trial_run(trial, "FAILED")
            raise
        tracking.set_tags({"state": "COMPLETE"})
        _end_trial_run(trial, "FINISHED")
        return value

    return objective


def _end_trial_run(trial: optuna.Trial, status: str) -> None:
    """End the trial's run; what the tracking server never took is counted on the Optuna trial."""
    tracking.PENDING.end_run(status)
    unlogged = tracking.PENDING.flush()
    if unlogged:
        trial.set_user_attr("mlflow_unlogged", len(unlogged))


def checkpoint_to_resume(trial: optuna.Trial, study_dir: Path) -> tuple[Path, int] | None:
    """For a retry of trials whose worker died: the newest readable checkpoint among them, and its iteration."""
    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    with warnings.catch_warnings(category=optuna.exceptions.ExperimentalWarning, action="ignore"):
        history = RetryHeartbeatStaleTrialCallback.retry_history(frozen)
    for number in reversed(history):
        run_dir = study_dir / f"trial-{number}"
        if not (run_dir / CHECKPOINT_FILE).is_file():
            continue
        try:
            state = load_checkpoint(run_dir)
        except CheckpointError as err:
            warnings.warn(f"trial {trial.number}: not resuming from {run_dir}: {err}", stacklevel=2)
            continue
        return run_dir, int(state["iteration"])
    return None


class RetryLostTrial:
    """Run by a live worker for each trial whose worker stopped beating: close its run, queue a retry."""

    def __init__(self, max_retry: int, tracking_uri: str) -> None:
        with warnings.catch_warnings(category=optuna.exceptions.ExperimentalWarning, action="ignore"):
            self.retry = RetryHeartbeatStaleTrialCallback(max_retry)
        self.tracking_uri = tracking_uri

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        if run_id is not None:
            try:
                client = mlflow.MlflowClient(self.tracking_uri)
                client.set_tag(run_id, "state", "FAIL")
                client.set_tag(run_id, "error", "worker lost: no heartbeat within the grace period; retried")
                client.set_terminated(run_id, "FAILED")
            except mlflow.exceptions.MlflowException as err:
                note = f"could not mark the MLflow run {run_id} of lost trial {trial.number} FAILED: {err}"
                warnings.warn(note, stacklevel=2)
        self.retry(study, trial)


class StopAtTarget:
    """Stop a worker once finished plus running trials reach the target, so workers never overshoot it."""

    def __init__(self, target: int) -> None:
        self.target = target

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if count_taken(study) >= self.target:
            study.stop()


def count_taken(study: optuna.Study) -> int:
    """Finished plus running trials, after failing (and queueing retries of) those whose worker died."""
    with warnings.catch_warnings(category=optuna.exceptions.ExperimentalWarning, action="ignore"):
        optuna.storages.fail_stale_trials(study)  # a dead worker's trial must not count as running
    return sum(t.state in TAKEN for t in study.get_trials(deepcopy=False))


def make_storage(settings: StudySettings) -> RDBStorage:
    """The study's storage with heartbeats: a trial whose worker dies is failed and retried."""
    url = settings.storage
    # SQLite: wait for another worker's write lock instead of failing at once ("database is locked").
    engine_kwargs = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT}} if url.startswith("sqlite") else {}
    if url.startswith(("postgresql", "mysql")):
        engine_kwargs["pool_pre_ping"] = True  # connections that a server closed are replaced, not used
    return RDBStorage(
        url,
        engine_kwargs=engine_kwargs,
        heartbeat_interval=settings.heartbeat_interval,
        grace_period=settings.grace_period,
        heartbeat_stale_trial_callback=RetryLostTrial(settings.max_retry, settings.tracking_uri),
    )


def _train_and_score(trial: optuna.Trial, cfg: TrainConfig, annotated: AnnotatedImages, progress: bool) -> float:
    def on_eval(iteration: int, model: ContentTransferModel) -> dict[str, float]:
        # Masks only: the reconstruction baseline is for the final report.
        scores = score_masks(predict_masks(model, annotated.images), annotated.masks, annotated.names)
        value = scores.metrics[OBJECTIVE_KEY]
        trial.report(value, iteration)
        if trial.should_prune():
            tracking.log_metrics({OBJECTIVE_KEY: value}, step=iteration)
            raise optuna.TrialPruned(f"pruned at iteration {iteration} (val IoU {value:.4f})")
        return {OBJECTIVE_KEY: value, "val/threshold_best": scores.metrics["val/threshold_best"]}

    result = train(cfg, on_eval=on_eval, progress=progress)
    scores, paths = score_and_report(result.model, annotated, cfg, result.iterations, Path(cfg.out))
    for path in paths:
        tracking.log_artifact(str(path))
    log_scores(scores, result.iterations)
    for key, value in scores.metrics.items():
        trial.set_user_attr(key, value)
    return scores.metrics[OBJECTIVE_KEY]


def summarize(study: optuna.Study, storage: str, tracking_uri: str) -> StudySummary:
    trials = study.get_trials(deepcopy=False)
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    summary = StudySummary(study.study_name, storage, tracking_uri, states)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if complete:
        best = study.best_trial
        summary.best_number = best.number
        summary.best_params = dict(best.params)
        summary.best_metrics = {k: v for k, v in best.user_attrs.items() if isinstance(v, float)}
    return summary


def study_summary(config: StudyConfig, storage: str | None = None, tracking_uri: str | None = None) -> str:
    """The summary of an existing study, with importances and report locations; runs nothing."""
    storage = storage or config.study.storage
    study = load_existing_study(config.study.name, storage)
    uri = resolve_tracking_uri(tracking_uri or config.study.tracking_uri)
    lines = [summarize(study, storage, uri).format(), "parameter importances:"]
    importances = param_importances(study)
    if isinstance(importances, dict):
        caveat = importance_caveat(study)
        lines += [f"  warning: {caveat}"] if caveat else []
        lines += [f"  {name:<12} {value:.3f}" for name, value in importances.items()]
    else:
        lines.append(f"  none yet: {importances}")
    lines.append(f"reports: {config.study_dir}/study_report.md and {config.study_dir}/trial-<n>/report.md")
    return "\n".join(lines)


def load_existing_study(name: str, storage: str) -> optuna.Study:
    """A study that must already exist: a missing SQLite file or study name is an error, and nothing is created."""
    check_storage_url(storage)
    database = sqlite_file(storage)
    if storage.startswith("sqlite") and database is not None and not database.is_file():
        raise ValueError(f"no Optuna storage at {database} ({storage}): launch the study first, or pass --storage")
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError as err:
        raise ValueError(f"no study named {name!r} in {storage}: launch it first") from err


def _existing_parent(study: optuna.Study) -> str | None:
    """The parent run of the study's earlier launches, if it is still in the tracking store."""
    run_id = study.user_attrs.get(PARENT_RUN_ATTR)
    if run_id is None:
        return None
    try:
        mlflow.MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return None  # e.g. the study moved to another tracking store: start a new parent
    return run_id


def resolve_settings(
    config: StudyConfig, storage: str | None, tracking_uri: str | None, n_trials: int | None
) -> StudyConfig:
    """Command-line overrides applied over the study file, and both stores checked before anything is written."""
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


STORAGE_SCHEMES = ("sqlite", "postgresql", "mysql")


def check_storage_url(url: str) -> None:
    """Refuse, naming it, an Optuna storage URL that cannot be opened, before any study is created."""
    scheme = url.split("://", 1)[0].split("+", 1)[0] if "://" in url else ""
    if scheme not in STORAGE_SCHEMES:
        raise ValueError(
            f"Optuna storage {url!r} is not a database URL: give sqlite:///FILE.db or postgresql://USER@HOST/DB"
        )
    database = sqlite_file(url) if scheme == "sqlite" else None
    if database is not None and not database.resolve().parent.is_dir():
        raise ValueError(f"Optuna storage {url}: folder {database.resolve().parent} does not exist")


# Fixed settings that change how a trial runs or logs, not what it learns: free to edit between launches.
OPERATIONAL_KEYS = {"device", "progress_iter", "display_iter", "save_iter", "num_display", "compile", "channels_last"}


def fingerprint(config: StudyConfig) -> dict:
    """What makes two launches' trials comparable: the search space, fixed settings and data."""
    value = {
        "space": {name: [r.low, r.high, r.log] for name, r in sorted(config.space.items())},
        "train": {k: v for k, v in config.train.items() if k not in OPERATIONAL_KEYS},
        "data": config.data_root if config.synthetic is None else vars(config.synthetic),
    }
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def open_study(config: StudyConfig) -> optuna.Study:
    """Create or load the study, refuse a study file whose space changed, queue the first trials."""
    settings = config.study
    study = optuna.create_study(
        study_name=settings.name,
        storage=make_storage(settings),
        direction=settings.direction,
        sampler=make_sampler(settings.sampler, settings.seed),
        pruner=make_pruner(settings.pruner),
        load_if_exists=True,
    )
    current, stored = fingerprint(config), study.user_attrs.get(FINGERPRINT_ATTR)
    if stored is None:
        study.set_user_attr(FINGERPRINT_ATTR, current)
    elif stored != current:
        changed = sorted(k for k in current if current[k] != stored.get(k))
        raise StudyFileError(
            f"{config.path}: study {settings.name!r} in {settings.storage} was created with a different "
            f"{' and '.join(changed)} (stored: {json.dumps({k: stored.get(k) for k in changed})}); its trials would "
            "not be comparable. Restore the file, or give [study].name a new name for a new study."
        )
    if STUDY_UID_ATTR not in study.user_attrs:
        study.set_user_attr(STUDY_UID_ATTR, uuid.uuid4().hex)
    record_study_folder(config, study)
    queue_presets(study, config.enqueue, settings.max_retry)
    return study


def queue_presets(study: optuna.Study, points: list[dict[str, float]], max_retry: int) -> None:
    """Queue each enqueued point that has no live trial; one whose trials failed is queued again, ``max_retry`` times.

    So a preset interrupted by Ctrl-C, a crash or a lost worker still runs on a later launch.
    """
    trials = study.get_trials(deepcopy=False)
    for point in points:
        same = [t for t in trials if _runs_point(t, point)]
        failures = sum(t.state == optuna.trial.TrialState.FAIL for t in same)
        if len(same) == failures and failures <= max_retry:
            study.enqueue_trial(point)


def _runs_point(trial: optuna.trial.FrozenTrial, point: dict[str, float]) -> bool:
    params = trial.system_attrs.get("fixed_params") or trial.params
    return all(params.get(name) == value for name, value in point.items())


def _storage_identity(url: str) -> str:
    """The storage URL as the study folder records it: SQLite files absolute, passwords hidden."""
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        return "sqlite:///" + str(Path(url.removeprefix("sqlite:///")).resolve())
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def check_study_folder(config: StudyConfig) -> None:
    """Refuse a run folder that holds another study's trials (same name, other storage, or recreated).

    Runs before anything is written, so the other study's checkpoints and reports stay as they are.
    """
    record = config.study_dir / STUDY_RECORD
    if not record.is_file():
        return
    saved = json.loads(record.read_text())
    storage, name = config.study.storage, config.study.name
    advice = f"set [study].runs_dir to another folder (or move {config.study_dir} away) for this study"
    if saved["storage"] != _storage_identity(storage):
        raise StudyFileError(
            f"{config.study_dir} holds the trials of study {name!r} in {saved['storage']}, not {storage}; {advice}"
        )
    try:
        stored = optuna.load_study(study_name=name, storage=storage).user_attrs.get(STUDY_UID_ATTR)
    except KeyError:
        stored = None  # the study was deleted from the storage
    if stored != saved["uid"]:
        raise StudyFileError(
            f"{config.study_dir} holds the trials of an earlier study {name!r} in {storage} that no longer "
            f"exists there; {advice}"
        )


def record_study_folder(config: StudyConfig, study: optuna.Study) -> None:
    """Write which storage and study the run folder belongs to (checked by :func:`check_study_folder`)."""
    record = config.study_dir / STUDY_RECORD
    if not record.is_file():
        write_json(record, {"storage": _storage_identity(config.study.storage), "study": config.study.name,
                            "uid": study.user_attrs[STUDY_UID_ATTR]})  # fmt: skip


def ensure_parent_run(study: optuna.Study, config: StudyConfig) -> str:
    """Open the study's parent MLflow run (found again on every launch) and tag this launch."""
    settings = config.study
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_experiment(settings.name)
    parent = mlflow.start_run(run_id=_existing_parent(study), run_name=f"study-{settings.name}")
    study.set_user_attr(PARENT_RUN_ATTR, parent.info.run_id)
    mlflow.set_tags(
        {
            "study": settings.name,
            "role": PARENT_ROLE,
            "study_file": str(config.path),
            "n_trials": settings.n_trials,
            "last_launch": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
    )
    return parent.info.run_id


def prepare_inputs(config: StudyConfig, progress: bool) -> AnnotatedImages:
    """Data generated if synthetic, training domains decoded into the cache, test annotations loaded.

    Done before any study or run exists, so a bad data root fails first; the
    decode cache then serves every trial and every worker.
    """
    root = prepare_data(config, progress)
    resize = config.trial_config({n: r.low for n, r in config.space.items()}, config.study_dir).resize
    skip_bad = bool(config.train.get("skip_bad", False))
    for name in ("trainA", "trainB"):
        load_domain(root, name, resize, progress, skip_bad)
    return load_test_annotations(root, resize, progress)


@contextmanager
def launch_lock(study_dir: Path) -> Iterator[None]:
    """One launch at a time through data preparation, study creation and the parent run.

    Two launches of one study on this machine would otherwise both write the
    synthetic data, queue the first trials twice or open two parent runs.
    """
    study_dir.mkdir(parents=True, exist_ok=True)
    with open(study_dir / ".launch.lock", "a") as lock:  # "a": taking the lock leaves the file as it is
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        yield


def run_study(
    config: StudyConfig,
    storage: str | None = None,
    tracking_uri: str | None = None,
    n_trials: int | None = None,
    progress: bool = True,
) -> StudySummary:
    """Create or resume the study and run trials until it has ``n_trials`` finished ones.

    Several processes may run this on one study at once (``launch_workers``, or
    workers on other machines sharing a PostgreSQL storage): each takes the next
    trial until finished plus running trials reach the target.
    """
    started = time.monotonic()
    config = resolve_settings(config, storage, tracking_uri, n_trials)
    settings = config.study
    with launch_lock(config.study_dir):
        check_study_folder(config)
        annotated = prepare_inputs(config, progress)
        study = open_study(config)
        remaining = settings.n_trials - count_taken(study)
        if remaining > 0:
            ensure_parent_run(study, config)
    if remaining > 0:
        try:
            study.optimize(
                make_objective(config, annotated, progress),
                n_trials=remaining,
                catch=(Exception,),
                callbacks=[StopAtTarget(settings.n_trials)],
            )
            for path in write_study_report(study, config.study_dir):
                tracking.log_artifact(str(path))
        finally:
            tracking.PENDING.end_run()  # the parent run, however the trials went
            tracking.PENDING.flush()
    summary = summarize(study, settings.storage, settings.tracking_uri)
    summary.wall_seconds = time.monotonic() - started
    return summary


def launch_workers(
    config: StudyConfig,
    workers: int,
    gpus: list[str] | None = None,
    storage: str | None = None,
    tracking_uri: str | None = None,
    n_trials: int | None = None,
    progress: bool = True,
) -> tuple[StudySummary, list[int]]:
    """Run ``workers`` processes of ``mbu search`` on one study; returns the summary and their exit codes.

    Data, decode cache, study and parent run are prepared here first, so the
    workers start with nothing to race over. Workers are spread round-robin
    over ``gpus`` (``CUDA_VISIBLE_DEVICES``); CPU threads are shared out.
    Each worker's output goes to ``runs/<study>/workers/worker-<i>.log``.
    """
    started = time.monotonic()
    config = resolve_settings(config, storage, tracking_uri, n_trials)
    settings = config.study
    with launch_lock(config.study_dir):
        check_study_folder(config)
        prepare_inputs(config, progress)
        study = open_study(config)
        ensure_parent_run(study, config)
        mlflow.end_run()

    logs = config.study_dir / "workers"
    logs.mkdir(parents=True, exist_ok=True)
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    command = [sys.executable, "-m", "mbu", "search", str(config.path), "--no-progress"]
    command += ["--storage", settings.storage, "--tracking-uri", settings.tracking_uri]
    command += ["--n-trials", str(settings.n_trials)]
    processes = []
    for i in range(workers):
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads)}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
        log = open(logs / f"worker-{i}.log", "w")  # closed once the worker has ended
        processes.append((subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), log))
        where = f" on GPU {env['CUDA_VISIBLE_DEVICES']}" if gpus else ""
        print(f"worker {i}: pid {processes[-1][0].pid}{where}, log {log.name}", flush=True)
    try:
        codes = [process.wait() for process, _ in processes]
    except KeyboardInterrupt:
        # The terminal sent SIGINT to the workers too: let them close their trials and runs.
        codes = [process.wait(timeout=60) for process, _ in processes]
        raise
    finally:
        for process, log in processes:
            if process.poll() is None:
                process.terminate()
            log.close()
    summary = summarize(
        optuna.load_study(study_name=settings.name, storage=make_storage(settings)),
        settings.storage,
        settings.tracking_uri,
    )
    summary.wall_seconds = time.monotonic() - started
    return summary, codes
