"""`mbu search` on a 2-trial, few-iteration study, then the Optuna and MLflow stores read back."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import optuna
from mlflow.tracking import MlflowClient

from mbu import main

STUDY = """
[study]
name = "tiny"
n_trials = 2
seed = 1

[data.synthetic]
size = 64
n_train = 8
n_test = 6
seed = 3

[train]
resize = 64
bs = 4
iters = 4
progress_iter = 2
eval_every = 2
device = "cpu"

[space.lr]
low = 1e-4
high = 1e-3
log = true

[space.gama]
low = 1.0
high = 10.0

[[enqueue]]
lr = 2e-4
gama = 7.0
"""


def test_search_records_trials_in_optuna_and_mlflow(tmp_path: Path, capsys) -> None:
    (tmp_path / "study.toml").write_text(STUDY.replace('device = "cpu"\n', ""))
    assert main(["search", "study.toml", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "best trial: #" in printed and "mlflow ui --backend-store-uri" in printed and "127.0.0.1" in printed

    # Optuna: two complete trials in the default local storage, the first one enqueued.
    study = optuna.load_study(study_name="tiny", storage="sqlite:///optuna.db")
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert trials[0].params == {"lr": 2e-4, "gama": 7.0}
    for t in trials:
        assert 0.0 <= t.value <= 1.0
        assert t.value == t.user_attrs["val/iou_best"]

    # MLflow: one experiment, one parent, two children linked to their trials.
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    assert all(r.info.status == "FINISHED" for r in runs)
    by_id = {r.info.run_id: r for r in children}
    for t in trials:
        run = by_id[t.user_attrs["mlflow_run_id"]]
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.data.tags["trial_number"] == str(t.number)
        assert run.data.tags["state"] == "COMPLETE"
        assert float(run.data.params["lr"]) == t.params["lr"] and run.data.params["bs"] == "4"
        assert run.data.metrics["val/iou_best"] == t.value
        for key in ("val/threshold_best", "test/iou", "train/loss_total", "train/loss_recon1_a"):
            assert key in run.data.metrics, key
        assert len(client.get_metric_history(run.info.run_id, "train/loss_total")) == 2  # iterations 2 and 4
        artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
        assert "report.json" in artifacts
        local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="report.json")
        report = json.loads(Path(local).read_text())
        assert report["metrics"]["val/iou_best"] == t.value
        assert (Path("runs/tiny") / f"trial-{t.number}" / "checkpoint.pt").is_file()

    # Relaunching a finished study runs nothing more and adds no run.
    assert main(["search", "study.toml", "--no-progress"]) == 0
    assert len(study.get_trials()) == 2
    assert len(client.search_runs([experiment.experiment_id])) == 3


def test_eval_command_rescoring_matches_the_trial(tmp_path: Path, capsys) -> None:
    (tmp_path / "study.toml").write_text(STUDY.replace("n_trials = 2", "n_trials = 1"))
    assert main(["search", "study.toml", "--no-progress"]) == 0
    run = Path("runs/tiny/trial-0")
    saved = json.loads((run / "report.json").read_text())
    (run / "report.json").unlink()
    assert main(["eval", "--run", str(run), "--no-progress", "--device", "cpu"]) == 0
    again = json.loads((run / "report.json").read_text())
    assert again["metrics"] == saved["metrics"]
    assert "scored 6 annotated images" in capsys.readouterr().out


def test_bad_study_file_is_a_clear_error_not_a_traceback(tmp_path: Path, capsys) -> None:
    (tmp_path / "study.toml").write_text(STUDY.replace("bs = 4", "bs = 4\nbatch_size = 4"))
    assert main(["search", "study.toml"]) == 2
    assert "unknown key [train].batch_size" in capsys.readouterr().err
