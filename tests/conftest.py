"""Shared fixtures: real configs shrunk to seconds (64 px, a handful of images, few iterations)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from mbu.data.cache import CACHE_ENV
from mbu.data.synthetic import SynthConfig, write_dataset
from mbu.train.config import TrainConfig

TINY_SYNTH = SynthConfig(size=64, n_train=8, n_test=6, seed=3)
# The same tiny data and training size as a study-file fragment; [train] stays open for more keys.
TINY_DATA_AND_TRAIN = f"""[data.synthetic]
size = {TINY_SYNTH.size}
n_train = {TINY_SYNTH.n_train}
n_test = {TINY_SYNTH.n_test}
seed = {TINY_SYNTH.seed}

[train]
resize = 64
bs = 4
"""


def tiny_study(
    name: str, n_trials: int = 1, study: str = "", train: str = "iters = 4\nprogress_iter = 2\n", lr_space: bool = True
) -> str:
    """A study file on the tiny data: ``study`` and ``train`` lines are added to those tables."""
    text = f'[study]\nname = "{name}"\nn_trials = {n_trials}\n{study}\n{TINY_DATA_AND_TRAIN}{train}device = "cpu"\n'
    if lr_space:
        text += "\n[space.lr]\nlow = 1e-4\nhigh = 1e-3\nlog = true\n"
    return text


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test runs in its own folder with MLflow and the decode cache there, never the user's."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "decode-cache"))
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic data root, written once per test session."""
    return write_dataset(TINY_SYNTH, tmp_path_factory.mktemp("synth") / "data", progress=False)


def tiny_train_config(root: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(root=str(root), out=str(out), resize=64, bs=4, iters=4, progress_iter=2, save_iter=100, device="cpu")
    values.update(overrides)
    return TrainConfig(**values)


def free_port() -> int:
    """A loopback port nothing listens on (once the probe socket closes)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class TrackingServer:
    uri: str
    process: subprocess.Popen

    def kill(self) -> None:
        """SIGKILL the server and the web workers it started (its own process group)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


@pytest.fixture
def tracking_server(tmp_path: Path) -> Iterator[TrackingServer]:
    """An MLflow tracking server on loopback, with its own SQLite store."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
        + ["--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--workers", "1"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its web workers are children: one group to stop them all
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(uri + "/health", timeout=2).read()
            break
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, "the MLflow server did not start"
            time.sleep(0.5)
    yield TrackingServer(uri, server)
    TrackingServer(uri, server).kill()
