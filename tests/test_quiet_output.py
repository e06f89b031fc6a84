"""Normal output carries mbu's own lines only: the libraries' notices stay off it (``mbu search -v`` shows them)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import mlflow
import optuna
import pytest

from mbu.cli import main
from mbu.search.judging.study_report import param_importances, write_study_report
from mbu.search.running.tracking import quiet_libraries

TABLES_MESSAGE = "Creating initial MLflow database tables"
NO_COMPLETE = "There are no complete trials."
LOUD_LOGGERS = {"mlflow": logging.INFO, "mlflow.store.db.utils": logging.NOTSET, "alembic": logging.NOTSET}


@pytest.fixture
def loud_libraries() -> Iterator[None]:
    """MLflow and Optuna as a fresh process has them (an earlier test may have quietened them); restored after."""
    levels = {name: logging.getLogger(name).level for name in LOUD_LOGGERS}
    verbosity = optuna.logging.get_verbosity()
    for name, level in LOUD_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    optuna.logging.set_verbosity(optuna.logging.INFO)
    optuna.logging.enable_propagation()  # so that caplog sees Optuna's records
    yield
    optuna.logging.disable_propagation()
    optuna.logging.set_verbosity(verbosity)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.mark.fresh_mlflow_store  # the messages come from creating a new store
def test_train_prints_no_mlflow_table_messages(tiny_root: Path, tmp_path: Path, capsys, loud_libraries) -> None:
    mlflow.MlflowClient(f"sqlite:///{tmp_path / 'probe.db'}").search_experiments()  # a new store, loud
    assert TABLES_MESSAGE in capsys.readouterr().err  # what a new store prints when nobody quietens it

    argv = ["train", "--root", str(tiny_root), "--out", "r", "--resize", "64", "--bs", "4", "--iters", "1"]
    assert main([*argv, "--device", "cpu", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert (tmp_path / "mlflow.db").is_file() and TABLES_MESSAGE not in err, err


def _study(values: list[float | None]) -> optuna.Study:
    """An in-memory study with one trial per value (None: a failed trial)."""
    study = optuna.create_study(direction="maximize")
    lr = optuna.distributions.FloatDistribution(1e-4, 1e-3, log=True)
    gama = optuna.distributions.FloatDistribution(1.0, 10.0)
    for i, value in enumerate(values):
        state = optuna.trial.TrialState.FAIL if value is None else optuna.trial.TrialState.COMPLETE
        params = {"lr": 1e-4 * (i + 1), "gama": 1.0 + i}
        study.add_trial(
            optuna.trial.create_trial(state=state, value=value, params=params, distributions={"lr": lr, "gama": gama})
        )
    return study


def test_study_report_of_no_complete_trial_logs_nothing_unless_verbose(tmp_path: Path, caplog, loud_libraries) -> None:
    study = _study([None])
    write_study_report(study, tmp_path / "verbose")  # as with -v: Optuna at INFO
    assert NO_COMPLETE in caplog.text
    caplog.clear()

    quiet_libraries()  # what mbu search does without -v
    write_study_report(study, tmp_path / "normal")
    assert caplog.records == [] and (tmp_path / "normal" / "study_report.md").is_file()


def test_importances_raise_no_user_warning_unless_verbose(loud_libraries) -> None:
    study = _study([0.05, 0.05])  # equal values, as when every mask is all ones: ped-ANOVA warns
    with warnings.catch_warnings(record=True) as verbose:
        warnings.simplefilter("always")
        assert isinstance(param_importances(study), dict)
    assert any(issubclass(w.category, UserWarning) for w in verbose)

    quiet_libraries()
    with warnings.catch_warnings(record=True) as normal:
        warnings.simplefilter("always")
        assert set(param_importances(study)) == {"lr", "gama"}
    assert normal == []
