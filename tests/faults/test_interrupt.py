"""Fault: Ctrl-C during a study. No MLflow run is left RUNNING; a relaunch resumes the study."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
from helpers import TINY_DATA_AND_TRAIN
from mlflow.tracking import MlflowClient

STUDY = """
[study]
name = "interrupted"
n_trials = 1

{TINY_DATA_AND_TRAIN}iters = {iters}
progress_iter = 2
device = "cpu"
""".replace("{TINY_DATA_AND_TRAIN}", TINY_DATA_AND_TRAIN)


def test_ctrl_c_leaves_no_running_run_and_relaunch_resumes(tmp_path: Path) -> None:
    (tmp_path / "study.toml").write_text(STUDY.format(iters=16))
    # Ctrl-C's default handler, whatever the test runner inherited (background jobs ignore SIGINT).
    code = "import signal, sys, mbu.cli; signal.signal(signal.SIGINT, signal.default_int_handler); "
    code += "sys.exit(mbu.cli.main())"
    mbu = [sys.executable, "-c", code, "search", "study.toml", "--no-progress"]
    proc = subprocess.Popen(mbu, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    run_file = tmp_path / "runs" / "interrupted" / "trial-0" / "mlflow_run.json"
    deadline = time.monotonic() + 120
    while not run_file.exists():  # the trial's MLflow run has started
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, "the trial never started"
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)  # mid-trial: its run exists, and 16 iterations are ahead of it
    output = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode != 0, output

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("interrupted")
    runs = client.search_runs([experiment.experiment_id])
    assert runs and all(r.info.status != "RUNNING" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    trial_run = next(r for r in runs if r.info.run_name == "trial-0")
    assert trial_run.info.status == "FAILED" and "KeyboardInterrupt" in trial_run.data.tags["error"]

    # The interrupted trial is recorded as failed; a relaunch finishes the study.
    relaunch = subprocess.run(mbu, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert relaunch.returncode == 0, relaunch.stdout + relaunch.stderr
    study = optuna.load_study(study_name="interrupted", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    states = [t.state for t in study.get_trials()]
    assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]
