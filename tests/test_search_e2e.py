"""`mbu search` on a 2-trial, few-iteration study, then the Optuna and MLflow stores read back."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import optuna
import torch
from helpers import TINY_DATA_AND_TRAIN
from mlflow.tracking import MlflowClient

from mbu.cli import main
from mbu.evaluate.report import load_masks
from mbu.evaluate.segmentation import score_masks

STUDY = """
[study]
name = "tiny"
n_trials = 2
seed = 1

{TINY_DATA_AND_TRAIN}iters = 4
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
""".replace("{TINY_DATA_AND_TRAIN}", TINY_DATA_AND_TRAIN)


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
        assert {"report.json", "report.md", "iou_curves.png", "examples.png", "masks.npz"} <= set(artifacts)
        curve = client.get_metric_history(run.info.run_id, "val/iou_by_threshold")
        assert sorted(m.step for m in curve) == list(range(101))
        local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="report.json")
        report = json.loads(Path(local).read_text())
        assert report["metrics"]["val/iou_best"] == t.value
        assert (Path("runs/tiny") / f"trial-{t.number}" / "checkpoint.pt").is_file()

    # The launch wrote the study report and logged it to the parent run.
    assert "study_report.md" in [a.path for a in client.list_artifacts(parents[0].info.run_id)]
    study_report = json.loads(Path("runs/tiny/study_report.json").read_text())
    assert [r["trial"] for r in study_report["trials"]] == [
        t.number for t in sorted(trials, key=lambda t: t.value, reverse=True)
    ]
    assert set(study_report["importances"]) == {"lr", "gama"}

    # --summary reads the study back without running anything.
    capsys.readouterr()
    assert main(["search", "study.toml", "--summary"]) == 0
    summary = capsys.readouterr().out
    assert "study tiny: 2 COMPLETE" in summary and "parameter importances:" in summary and "gama" in summary

    # Relaunching a finished study runs nothing more and adds no run.
    assert main(["search", "study.toml", "--no-progress"]) == 0
    assert len(study.get_trials()) == 2
    assert len(client.search_runs([experiment.experiment_id])) == 3

    # Topping it up finds the same parent run again: one parent, one child per trial.
    assert main(["search", "study.toml", "--no-progress", "--n-trials", "3"]) == 0
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 3
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert sorted(c.data.tags["trial_number"] for c in children) == ["0", "1", "2"]
    assert parents[0].info.status == "FINISHED" and parents[0].data.tags["n_trials"] == "3"


def test_report_figures_match_a_recomputation_from_saved_masks(tmp_path: Path, capsys) -> None:
    (tmp_path / "study.toml").write_text(STUDY.replace("n_trials = 2", "n_trials = 1"))
    assert main(["search", "study.toml", "--no-progress"]) == 0
    run = Path("runs/tiny/trial-0")
    saved = json.loads((run / "report.json").read_text())

    # The saved masks alone reproduce every figure of the report.
    masks = load_masks(run / "masks.npz")
    names = [str(n) for n in masks["names"]]
    again = score_masks(
        torch.from_numpy(masks["masks"]),
        torch.from_numpy(masks["truth"]),
        names,
        reconstruction_error=torch.from_numpy(masks["reconstruction_error"]),
    )
    assert again.metrics == saved["metrics"]
    assert saved["metrics"]["test/iou_per_image_ci_low"] <= saved["metrics"]["test/iou_per_image"]
    assert saved["metrics"]["test/iou_per_image"] <= saved["metrics"]["test/iou_per_image_ci_high"]
    assert "baseline/iou_recon_diff" in saved["metrics"]
    md = (run / "report.md").read_text()
    assert f"{saved['metrics']['test/iou']:.4f}" in md and "iou_curves.png" in md

    # `mbu report RUN_DIR` re-scores the checkpoint to the same figures and logs to the trial's run.
    (run / "report.json").unlink()
    assert main(["report", str(run), "--no-progress", "--device", "cpu"]) == 0
    assert json.loads((run / "report.json").read_text())["metrics"] == saved["metrics"]
    assert "logged to MLflow run" in capsys.readouterr().out

    # `mbu eval` prints how many images it scored.
    assert main(["eval", "--run", str(run), "--no-progress", "--device", "cpu"]) == 0
    assert "scored 6 annotated images" in capsys.readouterr().out

    # `mbu report --study` works with one trial (importances need two) and names a missing study.
    assert main(["report", "--study", "tiny"]) == 0
    assert "needs at least 2 complete trials" in Path("runs/tiny/study_report.md").read_text()
    assert main(["report", "--study", "nope"]) == 2
    assert "no study named 'nope'" in capsys.readouterr().err


def test_bad_study_file_is_a_clear_error_not_a_traceback(tmp_path: Path, capsys) -> None:
    (tmp_path / "study.toml").write_text(STUDY.replace("bs = 4", "bs = 4\nbatch_size = 4"))
    assert main(["search", "study.toml"]) == 2
    assert "unknown key [train].batch_size" in capsys.readouterr().err
