"""Workers on "other machines": two launches join one study through PostgreSQL and an MLflow server.

Starts a throwaway PostgreSQL server (Debian's postgresql package; `.ci/run` installs it) and an
MLflow tracking server, both on loopback, then checks every trial is recorded exactly once.
Skipped where PostgreSQL is not installed, unless MBU_REQUIRE_POSTGRES=1 (set by `.ci/run`).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from conftest import TrackingServer, free_port, tiny_study
from mlflow.tracking import MlflowClient


def _postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


PG_BIN = _postgres_bin()
if PG_BIN is None and os.environ.get("MBU_REQUIRE_POSTGRES") != "1":
    pytest.skip("PostgreSQL is not installed (apt-get install postgresql)", allow_module_level=True)


def _as_postgres(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: drop to the postgres user the package creates."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@pytest.fixture
def postgres_url() -> Iterator[str]:
    assert PG_BIN is not None, "MBU_REQUIRE_POSTGRES=1 but no PostgreSQL binaries were found"
    home = Path(tempfile.mkdtemp(prefix="mbu-pg-"))
    home.chmod(0o755)
    if os.geteuid() == 0:
        shutil.chown(home, "postgres", "postgres")
    data, port = home / "data", free_port()
    run = lambda *cmd: subprocess.run(_as_postgres([str(PG_BIN / cmd[0]), *cmd[1:]]), check=True, capture_output=True)  # noqa: E731
    run("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    options = f"-p {port} -k {home} -c listen_addresses=127.0.0.1"
    run("pg_ctl", "-D", str(data), "-o", options, "-l", str(home / "log"), "-w", "start")
    try:
        run("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mbu")
        yield f"postgresql://postgres@127.0.0.1:{port}/mbu"  # as the README writes it (psycopg 3)
    finally:
        run("pg_ctl", "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(home, ignore_errors=True)


STUDY = tiny_study("shared", 4)


def test_two_workers_share_a_study_through_postgresql_and_an_mlflow_server(
    tmp_path: Path, postgres_url: str, tracking_server: TrackingServer
) -> None:
    (tmp_path / "study.toml").write_text(STUDY)
    command = [sys.executable, "-m", "mbu", "search", "study.toml", "--no-progress"]
    command += ["--storage", postgres_url, "--tracking-uri", tracking_server.uri]
    workers = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in "ab"]
    outputs = [w.communicate(timeout=400)[0].decode() for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs

    trials = optuna.load_study(study_name="shared", storage=postgres_url).get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 4
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]

    client = MlflowClient(tracking_server.uri)
    runs = client.search_runs([client.get_experiment_by_name("shared").experiment_id])
    children = [r for r in runs if r.data.tags.get("role") != "study-parent"]
    assert len(runs) - len(children) == 1  # one parent run for the study
    assert sorted(int(r.data.tags["trial_number"]) for r in children) == [0, 1, 2, 3]
    assert {r.info.run_id for r in children} == {t.user_attrs["mlflow_run_id"] for t in trials}
    assert all(r.info.status == "FINISHED" for r in runs)
    assert all(client.list_artifacts(r.info.run_id) for r in children)  # reports went through the server
