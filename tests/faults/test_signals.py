"""Fault: SIGTERM (``kill``, ``timeout``, a scheduler) of ``mbu train`` and of the ``--workers`` launcher.

Each stops as Ctrl-C does: checkpoint, MLflow run closed (never left RUNNING),
one line saying how to go on, and no process left behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from helpers import DROP, mbu_command, tiny_study
from mlflow.tracking import MlflowClient

from mbu.cli import main
from mbu.train.checkpoint import load_checkpoint


def wait_for(paths: list[Path], process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not all(path.exists() for path in paths):
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline, f"never appeared: {paths}"
        time.sleep(0.2)


def wait_for_first_loss(run_file: Path, process: subprocess.Popen, seconds: float = 120) -> None:
    """Until the run named in ``run_file`` has logged a loss: training is under way (a fixed sleep was not
    always enough)."""
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    deadline = time.monotonic() + seconds

    def logged() -> bool:
        try:
            run_id = json.loads(run_file.read_text())["run_id"]
        except json.JSONDecodeError:  # caught while it is being written
            return False
        return "train/loss_total" in client.get_run(run_id).data.metrics

    while not logged():
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "no loss was logged"
        time.sleep(0.2)


def runs_of(experiment: str) -> list:
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def test_sigterm_in_train_checkpoints_closes_the_run_and_resumes(tiny_root: Path, tmp_path: Path, capsys) -> None:
    argv = ["train", "--root", str(tiny_root), "--out", "run", "--resize", "64", "--bs", "4", "--no-progress"]
    argv += ["--iters", "2000", "--save_iter", "5000", "--progress_iter", "2"]
    proc = subprocess.Popen(mbu_command(*argv), cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    wait_for([tmp_path / "run" / "mlflow_run.json"], proc)
    wait_for_first_loss(tmp_path / "run" / "mlflow_run.json", proc)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 75, err
    lines = [line for line in err.splitlines() if line.startswith("mbu train:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    found = re.fullmatch(r"mbu train: stopped by SIGTERM at iteration (\d+); checkpoint at iteration (\d+) in (.+); "
                         r"resume with: mbu train --out (.+) --load (.+)", lines[0])  # fmt: skip
    assert found, lines[0]
    stopped_at = int(found[1])
    assert 0 < stopped_at < 2000 and int(found[2]) == stopped_at
    assert load_checkpoint(tmp_path / "run")["iteration"] == stopped_at  # written by the stop itself
    (run,) = runs_of("mbu-train")
    assert run.info.status == "KILLED" and run.data.tags["stopped"] == f"SIGTERM at iteration {stopped_at}"

    assert main(["train", "--out", "run", "--load", "run", "--iters", str(stopped_at + 2)]) == 0  # in this process
    assert f"resumed at {stopped_at}, trained to {stopped_at + 2}" in capsys.readouterr().out


@pytest.mark.slow
def test_sigterm_of_the_workers_launcher_stops_every_worker_and_exits_75(tmp_path: Path) -> None:
    study = tiny_study("term", 2, study={"seed": 1}, train={"iters": 2000, "progress_iter": 2, "save_iter": 5000})
    (tmp_path / "study.toml").write_text(study)
    command = mbu_command("search", "study.toml", "--workers", "2", "--no-progress")
    launcher = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs = tmp_path / "runs" / "term"
    wait_for([runs / "trial-0" / "mlflow_run.json", runs / "trial-1" / "mlflow_run.json"], launcher, 180)
    time.sleep(3)  # both workers are training
    launcher.send_signal(signal.SIGTERM)
    out, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 75, out + err
    assert "mbu search: stopped by SIGTERM" in err and "mbu search study.toml" in err, err

    pids = [int(pid) for pid in re.findall(r"worker \d: pid (\d+)", out)]
    assert len(pids) == 2
    for pid in pids:  # no worker left training on its own
        try:
            os.kill(pid, 0)
            raise AssertionError(f"worker {pid} is still running")
        except ProcessLookupError:
            pass

    trials = optuna.load_study(study_name="term", storage="sqlite:///optuna.db").get_trials()
    stopped = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(stopped) == 2 and all(t.user_attrs["error"].startswith("stopped: SIGTERM") for t in stopped)
    assert sum(t.state == optuna.trial.TrialState.WAITING for t in trials) == 2  # queued to resume
    assert all(r.info.status != "RUNNING" for r in runs_of("term"))
    for log in (runs / "workers").glob("worker-*.log"):
        assert "stopped by SIGTERM" in log.read_text()


def sigterm_after_line(command: list[str], text: str, cwd: Path, tmp: Path) -> tuple[int, str]:
    """Run ``command`` with its temporary files in ``tmp``; SIGTERM it as soon as a line of its output holds
    ``text``. Its exit code and stderr."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp), "TORCHINDUCTOR_CACHE_DIR": str(cwd / "inductor")}
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if text in line:
            process.send_signal(signal.SIGTERM)
            break
    _, err = process.communicate(timeout=300)
    return process.returncode, err


def test_sigterm_while_logging_the_model_exits_75_and_says_how_to_log_it(tiny_root: Path, tmp_path: Path) -> None:
    """The run is trained and FINISHED when --log-model starts: a SIGTERM then leaves no temporary folder, exits
    75 with the command that logs the model, and that command logs it into the same run without training."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    argv = ["train", "--root", str(tiny_root), "--out", "run", "--resize", "64", "--bs", "4", "--iters", "2"]
    code, err = sigterm_after_line(
        mbu_command(*argv, "--no-progress", "--log-model"), "trained 2 iterations", tmp_path, tmp
    )
    assert code == 75, err
    line = next(line for line in err.splitlines() if "while logging the model" in line)
    assert line.startswith("mbu train: stopped by SIGTERM while logging the model; the run is trained")
    run = tmp_path / "run"
    assert line.endswith(f"log its model with: mbu train --out {run} --load {run} --log-model")
    assert not list(tmp.iterdir())  # the model's temporary folders went with the signal

    run_id = json.loads((run / "mlflow_run.json").read_text())["run_id"]
    assert main(["train", "--out", str(run), "--load", str(run), "--log-model", "--no-progress"]) == 0
    assert load_checkpoint(run)["iteration"] == 2  # nothing trained
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    logged = {item.path for item in client.list_artifacts(run_id, "model/artifacts")}
    assert {"model/artifacts/weights.pt", "model/artifacts/model.json"} <= logged


def test_sigterm_while_registering_the_champion_exits_75_and_a_relaunch_registers_it(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    (tmp_path / "study.toml").write_text(tiny_study("pub", 1, study={"registered_model": DROP}))
    code, err = sigterm_after_line(mbu_command("search", "study.toml", "--no-progress"), "wall time", tmp_path, tmp)
    assert code == 75, err
    assert "mbu search: stopped by SIGTERM at the end of the launch, before the champion was registered" in err
    assert err.rstrip().endswith("to register it: mbu search study.toml")
    assert not list(tmp.iterdir())

    assert main(["search", "study.toml", "--no-progress"]) == 0
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    assert str(client.get_model_version_by_alias("pub", "champion").version) == "1"
