"""One trial: sample its parameters, train (resuming a lost try's checkpoint), score, report.

No MLflow here: everything the trial logs goes through the :class:`Recorder`
it is handed, bound to the trial's own run.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import optuna
from mbu.data.images import AnnotatedImages
from mbu.evaluate.report import score_and_report
from mbu.evaluate.segmentation import predict_masks, score_masks
from mbu.evaluate.tracking import log_scores
from mbu.search.study_file import StudyConfig, trial_name
from mbu.train.checkpoint import CHECKPOINT_FILE, CheckpointError, check_resumable, load_checkpoint
from mbu.train.config import TrainConfig
from mbu.train.loop import Training, TrainingData
from mbu.train.model import ContentTransferModel
from mbu.train.tracking import Recorder
from optuna.storages import RetryHeartbeatStaleTrialCallback

OBJECTIVE_KEY = "val/iou_best"  # what the study maximises: best-threshold IoU on the validation half
TRAIN_SEED_ATTR = "train_seed"  # Optuna trial attribute: a training seed fixed on the trial (confirmation runs)


def trial_dir(config: StudyConfig, number: int) -> Path:
    """``runs/<study>/trial-<n>/``: the trial's checkpoint, grids and report."""
    return config.study_dir / trial_name(number)


def sampled_config(trial: optuna.Trial, config: StudyConfig) -> TrainConfig:
    """The trial's sampled values over the study's fixed settings; resuming a lost try when there is one."""
    params = {name: trial.suggest_float(name, rng.low, rng.high, log=rng.log) for name, rng in config.space.items()}
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
) -> Training:
    """The trial's training, ready to step; it reports the validation IoU every ``eval_every`` iterations.

    A step raises ``optuna.TrialPruned`` when the pruner stops the trial.
    """

    def on_eval(iteration: int, model: ContentTransferModel) -> dict[str, float]:
        scores = score_masks(predict_masks(model, annotated.images), annotated.masks, annotated.names)
        value = scores.metrics[OBJECTIVE_KEY]
        trial.report(value, iteration)
        if trial.should_prune():
            recorder.log_metrics({OBJECTIVE_KEY: value}, step=iteration)
            raise optuna.TrialPruned(f"pruned at iteration {iteration} (val IoU {value:.4f})")
        return {OBJECTIVE_KEY: value, "val/threshold_best": scores.metrics["val/threshold_best"]}

    if cfg.load:
        resumed_at = trial.user_attrs["resumed_from_iteration"]
        recorder.set_tags({"resumed_from": cfg.load, "resumed_from_iteration": resumed_at})
    return Training(cfg, on_eval=on_eval, progress=progress, recorder=recorder, data=data)


def score_trial(trial: optuna.Trial, training: Training, annotated: AnnotatedImages, recorder: Recorder) -> float:
    """Once trained: final checkpoint, report, scores logged and kept on the trial; returns the objective."""
    result = training.finish()
    scores, paths = score_and_report(result.model, annotated, training.cfg, result.iterations, result.run_dir)
    for path in paths:
        recorder.log_artifact(path)
    log_scores(scores, result.iterations, recorder)
    for key, value in scores.metrics.items():
        trial.set_user_attr(key, value)
    return scores.metrics[OBJECTIVE_KEY]
