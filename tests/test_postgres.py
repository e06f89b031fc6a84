"""Workers on "other machines": two launches join one study through PostgreSQL and an MLflow server.

Starts a throwaway PostgreSQL server (Debian's postgresql package; `.ci/run` installs it) and an
MLflow tracking server whose store is another database of it, both on loopback, then checks
every trial is recorded exactly once and the champion is registered once and used by its URI.
Skipped where PostgreSQL is not installed, unless MBU_REQUIRE_POSTGRES=1 (set by `.ci/run`).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import optuna
import pytest
from helpers import DROP, TrackingServer, mbu_command, study_runs, tiny_study
from mlflow.tracking import MlflowClient

from mbu.cli import main

MODEL = "models:/shared@champion"
STUDY = tiny_study("shared", 4, study={"registered_model": DROP})  # the registry on


@pytest.mark.slow
def test_two_workers_share_a_study_through_postgresql_and_an_mlflow_server(
    tmp_path: Path, postgres_url: str, postgres_tracking_server: TrackingServer
) -> None:
    tracking_server = postgres_tracking_server
    (tmp_path / "study.toml").write_text(STUDY)
    command = mbu_command("search", "study.toml", "--no-progress")
    command += ["--storage", postgres_url, "--tracking-uri", tracking_server.uri]
    workers = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in "ab"]
    outputs = [w.communicate(timeout=400)[0].decode() for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs

    trials = optuna.load_study(study_name="shared", storage=postgres_url).get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 4
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]

    client = MlflowClient(tracking_server.uri)
    parents, children = study_runs(client, "shared")
    runs = parents + children
    assert len(parents) == 1  # one parent run for the study
    assert sorted(int(r.data.tags["trial_number"]) for r in children) == [0, 1, 2, 3]
    assert {r.info.run_id for r in children} == {t.user_attrs["mlflow_run_id"] for t in trials}
    assert all(r.info.status == "FINISHED" for r in runs)
    assert all(client.list_artifacts(r.info.run_id) for r in children)  # reports went through the server

    # The champion: registered once (both launches publish), in the PostgreSQL-backed registry, usable by URI.
    best = optuna.load_study(study_name="shared", storage=postgres_url).best_trial
    versions = client.search_model_versions("name='shared'")
    assert len(versions) == 1 and versions[0].run_id == best.user_attrs["mlflow_run_id"], outputs
    assert client.get_model_version_by_alias("shared", "champion").version == versions[0].version
    image = sorted((tmp_path / "runs" / "shared").glob("synthetic-*/testA/*"))[0]
    for flag, value, out in (("--run", f"runs/shared/trial-{best.number}", "by-run"), ("--model", MODEL, "by-uri")):
        command = ["remove", flag, value, "--input", str(image), "--out", out, "--threshold", "0.5", "--device", "cpu"]
        command += ["--tracking-uri", tracking_server.uri] if flag == "--model" else []
        assert main(command) == 0
    assert (tmp_path / "by-uri" / f"{image.stem}.png").read_bytes() == (
        tmp_path / "by-run" / f"{image.stem}.png"
    ).read_bytes()
