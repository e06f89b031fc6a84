"""One trial: sample its parameters, train (resuming a lost try's checkpoint), score, report.

No MLflow here: everything the trial logs goes through the :class:`Recorder`
it is handed, bound to the trial's own run.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback

from mbu.base.run_files import CHECKPOINT_FILE
from mbu.data.images import AnnotatedImages
from mbu.evaluate.report import score_and_report
from mbu.evaluate.segmentation import predict_masks, score_masks
from mbu.evaluate.tracking import log_scores
from mbu.search.judging.race import collapse_reason
from mbu.search.studyfile.race_settings import RaceSettings
from mbu.search.studyfile.study_file import StudyConfig, trial_name
from mbu.train.checkpoint import CheckpointError, check_resumable, load_checkpoint
from mbu.train.config import TrainConfig
from mbu.train.loop import Training, TrainingData
from mbu.train.model import ContentTransferModel
from mbu.train.tracking import Recorder

OBJECTIVE_KEY = "val/iou_best"  # what the study maximises: best-threshold IoU on the validation half
TRAIN_SEED_ATTR = "train_seed"  # Optuna trial attribute: a training seed fixed on the trial (confirmation runs)


class RunCollapsed(Exception):
    """A run's masks degenerated at an evaluation (:func:`mbu.search.judging.race.collapse_reason`): it ends there."""

    def __init__(self, reason: str, iteration: int) -> None:
        super().__init__(f"collapsed at iteration {iteration}: {reason}")
        self.reason = reason
        self.iteration = iteration


def trial_dir(config: StudyConfig, number: int) -> Path:
    """``runs/<study>/trial-<n>/``: the trial's checkpoint, grids and report."""
    return config.study_dir / trial_name(number)


def suggest_params(trial: optuna.Trial, config: StudyConfig) -> dict[str, float]:
    """The trial's values of the study's search space (a queued trial's fixed ones, or the sampler's draw)."""
    return {name: trial.suggest_float(name, rng.low, rng.high, log=rng.log) for name, rng in config.space.items()}


def sampled_config(trial: optuna.Trial, config: StudyConfig) -> TrainConfig:
    """The trial's sampled values over the study's fixed settings; resuming a lost try when there is one."""
    params = suggest_params(trial, config)
    cfg = config.trial_config(params, trial_dir(config, trial.number))
    if TRAIN_SEED_ATTR in trial.user_attrs:  # else [train].seed, the same for every trial of a search
        cfg = replace(cfg, seed=int(trial.user_attrs[TRAIN_SEED_ATTR]))
    resume = checkpoint_to_resume(trial, config)
    if resume is not None:
        trial.set_user_attr("resumed_from_iteration", resume[1])
        cfg = replace(cfg, load=str(resume[0].resolve()))
    return cfg


def frozen_trial(trial: optuna.Trial) -> optuna.trial.FrozenTrial:
    """The storage's record of a running trial (its system attributes: the retry history)."""
    return next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)


def checkpoint_to_resume(trial: optuna.Trial, config: StudyConfig) -> tuple[Path, int] | None:
    """For a retry of trials whose worker died: the newest readable checkpoint among them, and its iteration."""
    frozen = frozen_trial(trial)
    with warnings.catch_warnings(category=optuna.exceptions.ExperimentalWarning, action="ignore"):
        history = RetryHeartbeatStaleTrialCallback.retry_history(frozen)
    for number in reversed(history):
        run_dir = trial_dir(config, number)
        if not (run_dir / CHECKPOINT_FILE).is_file():
            continue
        try:
            state = load_checkpoint(run_dir)
            check_resumable(state, run_dir)
        except CheckpointError as err:
            warnings.warn(f"trial {trial.number}: not resuming from {run_dir}: {err}", stacklevel=2)
            continue
        return run_dir, int(state["iteration"])
    return None


def start_training(
    trial: optuna.Trial,
    cfg: TrainConfig,
    annotated: AnnotatedImages,
    recorder: Recorder,
    progress: bool,
    data: TrainingData | None = None,
    guard: RaceSettings | None = None,
    report: bool = True,
) -> Training:
    """The trial's training, ready to step; it scores the validation half every ``eval_every`` iterations.

    With ``report`` the value goes to Optuna at step = iteration, and a step raises ``optuna.TrialPruned``
    when the pruner stops the trial (a raced seed run reports per seed instead). With ``guard`` a step
    raises :class:`RunCollapsed` at an evaluation whose masks have degenerated.
    """

    def on_eval(iteration: int, model: ContentTransferModel) -> dict[str, float]:
        scores = score_masks(predict_masks(model, annotated.images), annotated.masks, annotated.names)
        value = scores.metrics[OBJECTIVE_KEY]
        logged = {OBJECTIVE_KEY: value, "val/threshold_best": scores.metrics["val/threshold_best"]}
        if report:
            trial.report(value, iteration)
            if trial.should_prune():
                recorder.log_metrics({OBJECTIVE_KEY: value}, step=iteration)
                raise optuna.TrialPruned(f"pruned at iteration {iteration} (val IoU {value:.4f})")
        reason = collapse_reason(scores.metrics, guard) if guard is not None else None
        if reason is not None:
            recorder.log_metrics(logged, step=iteration)
            raise RunCollapsed(reason, iteration)
        return logged

    if cfg.load and "resumed_from_iteration" in trial.user_attrs:
        resumed_at = trial.user_attrs["resumed_from_iteration"]
        recorder.set_tags({"resumed_from": cfg.load, "resumed_from_iteration": resumed_at})
    return Training(cfg, on_eval=on_eval, progress=progress, recorder=recorder, data=data)


def score_run(training: Training, annotated: AnnotatedImages, recorder: Recorder) -> dict[str, float]:
    """Once trained (or ended early): final checkpoint, report, scores logged to the run; returns the metrics."""
    result = training.finish()
    scores, paths = score_and_report(result.model, annotated, training.cfg, result.iterations, result.run_dir)
    for path in paths:
        recorder.log_artifact(path)
    log_scores(scores, result.iterations, recorder)
    return scores.metrics


def score_trial(trial: optuna.Trial, training: Training, annotated: AnnotatedImages, recorder: Recorder) -> float:
    """Once trained: final checkpoint, report, scores logged and kept on the trial; returns the objective."""
    metrics = score_run(training, annotated, recorder)
    for key, value in metrics.items():
        trial.set_user_attr(key, value)
    return metrics[OBJECTIVE_KEY]


def record_collapse(trial: optuna.Trial, recorder: Recorder, collapsed: RunCollapsed) -> None:
    """Say on the trial and its MLflow run that the run ended early, collapsed, and why."""
    trial.set_user_attr("collapsed", str(collapsed))
    recorder.set_tags({"collapsed": str(collapsed)})
