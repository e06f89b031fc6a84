"""Run a study: Optuna samples, each trial trains and evaluates, MLflow records it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import mlflow
import optuna

from data.images import AnnotatedImages
from data.synthetic import write_dataset
from evaluate.report import score_and_report
from evaluate.segmentation import load_test_annotations, predict_masks, score_masks
from evaluate.tracking import RUN_FILE, log_scores
from search.study_file import StudyConfig
from search.study_report import param_importances, write_study_report
from search.tracking import PARENT_ROLE, PARENT_RUN_ATTR, RUN_ID_ATTR, ui_command
from train.checkpoint import write_json
from train.config import TrainConfig
from train.loop import train
from train.model import ContentTransferModel
from train.tracking import resolve_tracking_uri, train_params

OBJECTIVE_KEY = "val/iou_best"
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
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
        # Not a context manager: its exit would end the parent run after ours is ended.
        run = mlflow.start_run(run_name=f"trial-{trial.number}", nested=True)
        trial.set_user_attr(RUN_ID_ATTR, run.info.run_id)
        write_json(run_dir / RUN_FILE, {"run_id": run.info.run_id, "study": config.study.name, "trial": trial.number})
        mlflow.set_tags({"trial_number": trial.number, "study": config.study.name, "state": "RUNNING"})
        mlflow.log_params(train_params(cfg))
        try:
            value = _train_and_score(trial, cfg, annotated, progress)
        except optuna.TrialPruned:
            mlflow.set_tag("state", "PRUNED")
            mlflow.end_run(status="KILLED")
            raise
        except BaseException as err:  # Ctrl-C included: never leave a run RUNNING
            mlflow.set_tags({"state": "FAIL", "error": f"{type(err).__name__}: {err}"[:5000]})
            mlflow.end_run(status="FAILED")
            raise
        mlflow.set_tag("state", "COMPLETE")
        mlflow.end_run()
        return value

    return objective


def _train_and_score(trial: optuna.Trial, cfg: TrainConfig, annotated: AnnotatedImages, progress: bool) -> float:
    def on_eval(iteration: int, model: ContentTransferModel) -> dict[str, float]:
        # Masks only: the reconstruction baseline is for the final report.
        scores = score_masks(predict_masks(model, annotated.images), annotated.masks, annotated.names)
        value = scores.metrics[OBJECTIVE_KEY]
        trial.report(value, iteration)
        if trial.should_prune():
            mlflow.log_metrics({OBJECTIVE_KEY: value}, step=iteration)
            raise optuna.TrialPruned(f"pruned at iteration {iteration} (val IoU {value:.4f})")
        return {OBJECTIVE_KEY: value, "val/threshold_best": scores.metrics["val/threshold_best"]}

    result = train(cfg, on_eval=on_eval, progress=progress)
    scores, paths = score_and_report(result.model, annotated, cfg, result.iterations, Path(cfg.out))
    for path in paths:
        mlflow.log_artifact(str(path))
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
    try:
        study = optuna.load_study(study_name=config.study.name, storage=storage)
    except KeyError as err:
        raise ValueError(f"no study named {config.study.name!r} in {storage}: launch it first") from err
    uri = resolve_tracking_uri(tracking_uri or config.study.tracking_uri)
    lines = [summarize(study, storage, uri).format(), "parameter importances:"]
    importances = param_importances(study)
    if isinstance(importances, dict):
        lines += [f"  {name:<12} {value:.3f}" for name, value in importances.items()]
    else:
        lines.append(f"  none yet: {importances}")
    lines.append(f"reports: {config.study_dir}/study_report.md and {config.study_dir}/trial-<n>/report.md")
    return "\n".join(lines)


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


def run_study(
    config: StudyConfig,
    storage: str | None = None,
    tracking_uri: str | None = None,
    n_trials: int | None = None,
    progress: bool = True,
) -> StudySummary:
    """Create or resume the study and run trials until it has ``n_trials`` finished ones."""
    started = time.monotonic()
    study_settings = replace(
        config.study,
        storage=storage or config.study.storage,
        tracking_uri=resolve_tracking_uri(tracking_uri or config.study.tracking_uri),
        n_trials=n_trials or config.study.n_trials,
    )
    config = replace(config, study=study_settings)

    # Data first: a bad data root fails before any study or run is created.
    root = prepare_data(config, progress)
    resize = config.trial_config({n: r.low for n, r in config.space.items()}, config.study_dir).resize
    annotated = load_test_annotations(root, resize, progress)

    study = optuna.create_study(
        study_name=study_settings.name,
        storage=study_settings.storage,
        direction=study_settings.direction,
        sampler=make_sampler(config.study.sampler, config.study.seed),
        pruner=make_pruner(config.study.pruner),
        load_if_exists=True,
    )
    for point in config.enqueue:
        study.enqueue_trial(point, skip_if_exists=True)

    finished = sum(t.state in FINISHED for t in study.get_trials(deepcopy=False))
    remaining = study_settings.n_trials - finished
    if remaining > 0:
        mlflow.set_tracking_uri(study_settings.tracking_uri)
        mlflow.set_experiment(study_settings.name)
        with mlflow.start_run(run_id=_existing_parent(study), run_name=f"study-{study_settings.name}") as parent:
            study.set_user_attr(PARENT_RUN_ATTR, parent.info.run_id)
            mlflow.set_tags(
                {
                    "study": study_settings.name,
                    "role": PARENT_ROLE,
                    "study_file": str(config.path),
                    "n_trials": study_settings.n_trials,
                    "last_launch": time.strftime("%Y-%m-%d %H:%M:%S"),
                }
            )
            study.optimize(
                make_objective(config, annotated, progress),
                n_trials=remaining,
                catch=(Exception,),
                callbacks=[optuna.study.MaxTrialsCallback(study_settings.n_trials, states=FINISHED)],
            )
            for path in write_study_report(study, config.study_dir):
                mlflow.log_artifact(str(path))
    summary = summarize(study, study_settings.storage, study_settings.tracking_uri)
    summary.wall_seconds = time.monotonic() - started
    return summary
