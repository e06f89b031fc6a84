"""A pruned trial: Optuna records PRUNED, its MLflow run ends KILLED with state=PRUNED, curves kept."""

from __future__ import annotations

import os
from pathlib import Path

import optuna
from helpers import TINY_DATA_AND_TRAIN
from mlflow.tracking import MlflowClient

from mbu.evaluate.segmentation import load_test_annotations
from mbu.search.launching.launch import LaunchOptions, prepare_data, resolve_settings
from mbu.search.running.population import Population
from mbu.search.studyfile.study_file import load_study_file
from mbu.train.tracking import Recorder

STUDY = """
[study]
name = "pruned"
n_trials = 1

{TINY_DATA_AND_TRAIN}iters = 8
progress_iter = 2
eval_every = 4
device = "cpu"
""".replace("{TINY_DATA_AND_TRAIN}", TINY_DATA_AND_TRAIN)


class PruneAtFirstReport(optuna.pruners.BasePruner):
    """Test double for the pruner's decision (the platform's reaction is under test)."""

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return bool(trial.intermediate_values)


def test_pruned_trial_is_killed_in_mlflow_with_its_curves(tmp_path: Path) -> None:
    (tmp_path / "study.toml").write_text(STUDY)
    config = load_study_file(tmp_path / "study.toml")
    config = resolve_settings(config, LaunchOptions())
    annotated = load_test_annotations(prepare_data(config, progress=False), 64, progress=False)
    study = optuna.create_study(direction="maximize", pruner=PruneAtFirstReport())
    parent = Recorder.start(os.environ["MLFLOW_TRACKING_URI"], "pruned", "launch")
    population = Population(study, config, annotated, parent, progress=False)
    assert population.start(study.ask()) is None
    outcomes = []
    while population.slots:
        outcomes += population.advance(stop=lambda: None)
    assert [o.state for o in outcomes] == [optuna.trial.TrialState.PRUNED]

    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert list(trial.intermediate_values) == [4]  # reported at eval_every, pruned there
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    run = client.get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["state"] == "PRUNED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss_total")] == [2, 4]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/iou_best")] == [4]
    assert not (tmp_path / "runs" / "pruned" / "trial-0" / "report.json").exists()
