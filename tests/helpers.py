"""Helpers the tests share (imported as ``helpers``): tiny configs and study files, loopback services.

Fixtures live in ``conftest.py``; everything a test imports by name lives here.
"""

from __future__ import annotations

import copy
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from mbu.data.synthetic import SynthConfig
from mbu.train.config import TrainConfig

TINY_SYNTH = SynthConfig(size=64, n_train=8, n_test=6, seed=3)
TINY_DATA = {"synthetic": {"size": TINY_SYNTH.size, "n_train": TINY_SYNTH.n_train, "n_test": TINY_SYNTH.n_test,
                           "seed": TINY_SYNTH.seed}}  # fmt: skip
# The same tiny data and training size as a study-file fragment, for tests that write a study file out in full.
TINY_DATA_AND_TRAIN = f"""[data.synthetic]
size = {TINY_SYNTH.size}
n_train = {TINY_SYNTH.n_train}
n_test = {TINY_SYNTH.n_test}
seed = {TINY_SYNTH.seed}

[train]
resize = 64
bs = 4
"""
# Iterations of a tiny study's trial: each costs ~0.5 s on one core of a 2-core CPU, and the suite runs
# hundreds of trials; what a test needs beyond this (a signal landing mid-training) it sets itself.
TINY_ITERS = 2
LR_SPACE = {"lr": {"low": 1e-4, "high": 1e-3, "log": True}}
DROP = object()  # a value in ``changed``'s changes: remove that key


def changed(tables: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of nested ``tables`` with ``changes`` merged in, table by table (``DROP`` removes a key)."""
    out = copy.deepcopy(dict(tables))
    for key, value in changes.items():
        if value is DROP:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = changed(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def tiny_tables(name: str, n_trials: int = 1, lr_space: bool = True, **changes: Any) -> dict[str, Any]:
    """A study on the tiny data as nested tables (2 iterations at 64 px, batch 4), with ``changes`` merged in.

    It registers no champion (``registered_model = ""``: a few seconds per launch); the tests of the
    registry, and those of concurrent launches, turn it on with ``study={"registered_model": DROP}``.
    """
    tables = {
        "study": {"name": name, "n_trials": n_trials, "registered_model": ""},
        "data": TINY_DATA,
        "train": {"resize": 64, "bs": 4, "iters": TINY_ITERS, "progress_iter": 2, "device": "cpu"},
        **({"space": LR_SPACE} if lr_space else {}),
    }
    return changed(tables, changes)


def tiny_study(name: str, n_trials: int = 1, lr_space: bool = True, **changes: Any) -> str:
    """The text of :func:`tiny_tables`' study file, e.g. ``tiny_study("s", 2, study={"seed": 1})``."""
    return toml_text(tiny_tables(name, n_trials, lr_space, **changes))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def toml_text(tables: Mapping[str, Any], prefix: str = "") -> str:
    """TOML for nested dicts: scalars and lists as keys, dicts as ``[a.b]`` tables, lists of dicts as ``[[a]]``."""
    is_table_list = lambda v: isinstance(v, list) and v and all(isinstance(x, Mapping) for x in v)  # noqa: E731
    lines = lambda row: "".join(f"{k} = {_toml_value(v)}\n" for k, v in row.items())  # noqa: E731
    keys = lines({k: v for k, v in tables.items() if not isinstance(v, Mapping) and not is_table_list(v)})
    has_tables = any(isinstance(v, Mapping) or is_table_list(v) for v in tables.values())
    header = prefix and (keys or not has_tables)  # no bare [a] above [a.b]; an empty table still shows
    text = (f"[{prefix}]\n" if header else "") + "".join(keys)
    for key, value in tables.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, Mapping):
            text += ("\n" if text else "") + toml_text(value, name)
        elif is_table_list(value):
            for row in value:
                text += ("\n" if text else "") + f"[[{name}]]\n" + lines(row)
    return text


def tiny_train_config(root: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(root=str(root), out=str(out), resize=64, bs=4, iters=4, progress_iter=2, save_iter=100, device="cpu")
    values.update(overrides)
    return TrainConfig(**values)


class StudyRuns(NamedTuple):
    parents: list[Run]  # the study's parent run (one per study, whatever the launches)
    trials: list[Run]  # every other run: one per try of a trial


def study_runs(client: MlflowClient, study: str) -> StudyRuns:
    """The MLflow runs of a study's experiment, split by the ``role`` tag the platform sets on the parent."""
    runs = client.search_runs([client.get_experiment_by_name(study).experiment_id])
    is_parent = lambda r: r.data.tags.get("role") == "study-parent"  # noqa: E731
    return StudyRuns([r for r in runs if is_parent(r)], [r for r in runs if not is_parent(r)])


def mbu_command(*args: str) -> list[str]:
    """``python -m mbu ARGS`` with the interpreter running the tests: what a user's shell runs, in a process."""
    return [sys.executable, "-m", "mbu", *args]


def mbu_command_with_ctrl_c(*args: str) -> list[str]:
    """:func:`mbu_command` with Ctrl-C's default handler, whatever the test runner inherited (background
    jobs ignore SIGINT): a SIGINT sent to the process then acts as Ctrl-C in a terminal."""
    code = "import signal, sys, mbu.cli; signal.signal(signal.SIGINT, signal.default_int_handler); "
    return [sys.executable, "-c", code + "sys.exit(mbu.cli.main())", *args]


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


def start_tracking_server(folder: Path, backend_store_uri: str | None = None) -> TrackingServer:
    """An MLflow server on loopback, once it answers (store: ``backend_store_uri``, else SQLite in ``folder``)."""
    port = free_port()
    store = backend_store_uri or f"sqlite:///{folder / 'server.db'}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
        + ["--backend-store-uri", store, "--workers", "1"],
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its web workers are children: one group to stop them all
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(uri + "/health", timeout=2).read()
            return TrackingServer(uri, server)
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, "the MLflow server did not start"
            time.sleep(0.5)


def _postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


PG_BIN = _postgres_bin()


def _as_postgres(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: drop to the postgres user the package creates."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def create_database(url: str, name: str) -> str:
    """A new empty database on the server of ``url``; its URL."""
    parts = urllib.parse.urlsplit(url)
    createdb = [str(PG_BIN / "createdb"), "-h", str(parts.hostname), "-p", str(parts.port), "-U", "postgres", name]
    subprocess.run(_as_postgres(createdb), check=True, capture_output=True)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))


@contextmanager
def running_postgres() -> Iterator[str]:
    """A throwaway PostgreSQL server on loopback with an empty database; its URL, as the README writes it."""
    assert PG_BIN is not None, "no PostgreSQL binaries were found (apt-get install postgresql)"
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
        yield f"postgresql://postgres@127.0.0.1:{port}/mbu"  # psycopg 3
    finally:
        run("pg_ctl", "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(home, ignore_errors=True)
