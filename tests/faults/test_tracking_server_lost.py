"""Fault: the MLflow tracking server goes away mid-trial. Training goes on, the Optuna result is
recorded, and a warning says what was not logged."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from helpers import TrackingServer, mbu_command, tiny_study

STUDY = tiny_study(
    "lost", train={"iters": 30, "progress_iter": 2, "display_iter": 10, "eval_every": 10}, lr_space=False
)


@pytest.mark.slow
def test_training_survives_the_tracking_server_going_away(tmp_path: Path, tracking_server: TrackingServer) -> None:
    (tmp_path / "study.toml").write_text(STUDY)
    command = mbu_command("search", "study.toml", "--no-progress")
    command += ["--tracking-uri", tracking_server.uri]
    # Retried at once: waiting between retries of a refused connection would only make the test slower.
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0"}
    search = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    run_file = tmp_path / "runs" / "lost" / "trial-0" / "mlflow_run.json"
    deadline = time.monotonic() + 120
    while not run_file.exists():  # the trial's run exists on the server: training is starting
        assert search.poll() is None, search.stdout.read().decode()
        assert time.monotonic() < deadline, "the trial never started"
        time.sleep(0.2)
    tracking_server.kill()

    output = search.communicate(timeout=600)[0].decode()
    assert search.returncode == 0, output
    trial = optuna.load_study(study_name="lost", storage=f"sqlite:///{tmp_path / 'optuna.db'}").get_trials()[0]
    assert trial.state == optuna.trial.TrialState.COMPLETE and 0.0 <= trial.value <= 1.0
    assert trial.user_attrs.get("mlflow_unlogged", 0) > 0, output
    assert "MLflow call(s) not logged (tracking server unreachable)" in output
    assert "metrics at step" in output  # the warning names what was lost
    assert (tmp_path / "runs" / "lost" / "trial-0" / "report.json").is_file()  # files on disk are complete
