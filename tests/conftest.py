"""Fixtures only: each test isolated in its own folder, tiny data, loopback services.

Shared helpers that tests import by name are in ``helpers.py``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import PG_BIN, TINY_SYNTH, TrackingServer, create_database, running_postgres, start_tracking_server
from mlflow.tracking import MlflowClient

from mbu.data.cache import CACHE_ENV
from mbu.data.synthetic import write_dataset

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two test processes on two cores: one thread each (and in the processes they start), never four
    # threads fighting over two cores.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Long checks (``slow``) first: the two test processes then end together, on short tests,
    instead of one waiting while the other runs the long test it happened to take last."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: file order within each


@pytest.fixture(scope="session")
def _empty_mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow SQLite store, made once per test process.

    A new store runs MLflow's schema migrations (~2 s); a copy of this one opens at once.
    """
    path = tmp_path_factory.mktemp("empty-mlflow-store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(autouse=True)
def _isolated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest, _empty_mlflow_store: Path
) -> Iterator[None]:
    """Each test runs in its own folder with MLflow and the decode cache there, never the user's.

    The MLflow store starts as a copy of an empty one, except in tests marked ``fresh_mlflow_store``
    (those about what happens where no store exists yet). Global torch flags a test may change are
    put back afterwards.
    """
    monkeypatch.chdir(tmp_path)
    if request.node.get_closest_marker("fresh_mlflow_store") is None:
        shutil.copyfile(_empty_mlflow_store, tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "decode-cache"))
    torch.manual_seed(0)
    flags = (
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.are_deterministic_algorithms_enabled(),
    )
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags[0], flags[1]
    torch.use_deterministic_algorithms(flags[2])


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic data root, written once per test session."""
    return write_dataset(TINY_SYNTH, tmp_path_factory.mktemp("synth") / "data", progress=False)


@pytest.fixture
def tracking_server(tmp_path: Path) -> Iterator[TrackingServer]:
    """An MLflow tracking server on loopback, with its own SQLite store."""
    server = start_tracking_server(tmp_path)
    yield server
    server.kill()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL database; skipped where PostgreSQL is absent unless MBU_REQUIRE_POSTGRES=1."""
    if PG_BIN is None and os.environ.get("MBU_REQUIRE_POSTGRES") != "1":
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    with running_postgres() as url:
        yield url


@pytest.fixture
def postgres_tracking_server(tmp_path: Path, postgres_url: str) -> Iterator[TrackingServer]:
    """An MLflow tracking server on loopback whose store is a database of the PostgreSQL server."""
    store = create_database(postgres_url, "mlflow").replace("postgresql://", "postgresql+psycopg://", 1)
    server = start_tracking_server(tmp_path, store)
    yield server
    server.kill()
