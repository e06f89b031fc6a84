"""Faults at launch: a study file edited between launches, and an MLflow server that is not there."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from helpers import changed, free_port, tiny_tables, toml_text

from mbu.cli import main
from mbu.search.launching.launch import LaunchOptions, run_study
from mbu.search.studyfile.study_file import StudyFileError, load_study_file

EDITED = tiny_tables("edited", train={"iters": 2, "progress_iter": 1})  # its [space.lr] has high = 1e-3
STUDY = toml_text(EDITED)


def test_edited_search_space_is_refused_and_compatible_edits_are_accepted(tmp_path: Path) -> None:
    study_file = tmp_path / "study.toml"
    study_file.write_text(STUDY)
    run_study(load_study_file(study_file), LaunchOptions(progress=False))

    study_file.write_text(toml_text(changed(EDITED, {"space": {"lr": {"high": 1e-2}}})))  # the space changed
    with pytest.raises(StudyFileError, match=r"study 'edited' .* different space.*new name"):
        run_study(load_study_file(study_file), LaunchOptions(n_trials=2, progress=False))
    study = optuna.load_study(study_name="edited", storage="sqlite:///optuna.db")
    assert len(study.get_trials()) == 1  # nothing was added

    # Logging cadence is not what a trial learns: editing it is accepted.
    study_file.write_text(toml_text(changed(EDITED, {"train": {"progress_iter": 2}})))
    summary = run_study(load_study_file(study_file), LaunchOptions(n_trials=2, progress=False))
    assert summary.states == {"COMPLETE": 2}


def test_unreachable_tracking_server_is_a_clear_error_before_training(
    tmp_path: Path, tiny_root: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "study.toml").write_text(STUDY)
    uri = f"http://127.0.0.1:{free_port()}"
    assert main(["search", "study.toml", "--tracking-uri", uri, "--no-progress"]) == 2
    assert f"MLflow tracking server {uri} is unreachable" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "optuna.db").exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main(["train", "--root", str(tiny_root), "--out", "run", "--iters", "2", "--resize", "64"]) == 2
    assert "is unreachable" in capsys.readouterr().err and not (tmp_path / "run").exists()
