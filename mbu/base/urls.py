"""Store URLs checked before anything is written: MLflow tracking URIs and Optuna storages.

Each check is one line naming the URL (password hidden) instead of a traceback from SQLAlchemy, a
driver or MLflow, or minutes of MLflow's own retries.
"""

from __future__ import annotations

import os
import re
import sqlite3
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # MLflow 3's own default store


def resolve_tracking_uri(configured: str = "") -> str:
    """The given URI first, then ``$MLFLOW_TRACKING_URI``, then the local SQLite store."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


TRACKING_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")


def url_scheme(url: str) -> str:
    """``sqlite``, ``postgresql`` (driver suffix dropped), ...; a URL without ``://`` is its own scheme."""
    return url.split("://", 1)[0].split("+", 1)[0] if "://" in url else url


def sqlite_file(url: str) -> Path | None:
    """The database file of a ``sqlite:///PATH`` URL (None for another scheme or an in-memory database)."""
    path = url.split(":///", 1)[1] if url_scheme(url) == "sqlite" and ":///" in url else ""
    return Path(path) if path and path != ":memory:" else None


def missing_sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL when it does not exist (opening it would create it)."""
    database = sqlite_file(url)
    return database if database is not None and not database.is_file() else None


def check_database_folder(url: str, what: str) -> None:
    """A SQLite URL whose folder is missing is an error naming it (``what``: the store's role)."""
    database = sqlite_file(url)
    if database is not None and not database.resolve().parent.is_dir():
        raise ValueError(f"{what} {url}: folder {database.resolve().parent} does not exist")


SERVER_SCHEMES = ("postgresql", "mysql", "mssql")  # database URLs that name a server (not a local file)


def check_database_server(url: str, what: str, timeout: int = 10) -> None:
    """A database-server URL must parse, have its driver installed and reach a server that answers.

    Checked before anything is written, so each of these is one line naming the URL (password hidden)
    instead of a traceback from SQLAlchemy, the driver or the library that opened it.
    """
    if url_scheme(url) not in SERVER_SCHEMES:
        return
    import sqlalchemy

    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError as err:
        raise ValueError(f"{what} {url!r} is not a database URL: {err}") from err
    shown = parsed.render_as_string(hide_password=True)
    try:
        parsed.get_dialect().import_dbapi()
    except (ImportError, sqlalchemy.exc.NoSuchModuleError) as err:
        raise ValueError(
            f"{what} {shown}: its database driver is not installed ({err}); for PostgreSQL run "
            'pip install -e ".[postgres]" (psycopg 3, what postgresql:// uses), or name an installed driver '
            "in the URL (postgresql+psycopg2://...)"
        ) from err
    engine = sqlalchemy.create_engine(parsed, connect_args={"connect_timeout": timeout})
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.SQLAlchemyError as err:
        reason = " ".join(str(getattr(err, "orig", None) or err).split())
        raise ValueError(
            f"{what} {shown}: cannot connect ({reason}); check that the server runs, the database exists "
            "and the user may log in"
        ) from err
    finally:
        engine.dispose()


def check_tracking_uri(uri: str) -> None:
    """Refuse, naming the URI, a tracking store MLflow cannot open, before anything is created in it."""
    check_tracking_scheme(uri)
    check_database_folder(uri, "tracking URI")
    check_database_writable(uri, "tracking URI")
    check_database_server(uri, "tracking URI")
    check_tracking_server(uri)


def check_tracking_scheme(uri: str) -> None:
    if url_scheme(uri) not in TRACKING_SCHEMES:  # a bare "databricks" included
        raise ValueError(
            f"tracking URI {uri!r} is not one MLflow can use here: give sqlite:///FILE.db, "
            "http(s)://HOST:PORT of an MLflow server, or a database URL (postgresql://...)"
        )


def check_store_to_read(uri: str, what: str = "--tracking-uri") -> None:
    """A store a command reads a model or a run from (``--model``, ``mbu report``): it must exist and be an MLflow
    store; it is never created or migrated. Each problem is one line naming ``what`` and the URI."""
    check_tracking_scheme(uri)
    check_database_server(uri, what)
    check_tracking_server(uri)
    database = sqlite_file(uri)
    if database is None:
        return
    if not database.is_file():
        raise ValueError(f"{what} {uri}: no MLflow store at {database}")
    try:
        # as_uri() percent-encodes the path: a "#" or "?" in it would otherwise cut the URI and open (and create)
        # another file, read-write
        with sqlite3.connect(database.resolve().as_uri() + "?mode=ro", uri=True) as connection:
            tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as err:
        raise ValueError(f"{what} {uri}: {database} is not a database ({err})") from err
    if not {"experiments", "runs"} <= tables:
        held = ", ".join(sorted(tables)[:4]) or "no tables"
        raise ValueError(f"{what} {uri}: {database} is a database but not an MLflow store (it holds {held})")


def check_database_writable(url: str, what: str) -> None:
    """A SQLite URL whose file or folder cannot be written is an error naming it (``what``: the store's role).

    SQLite creates the database, and its journal beside it, in that folder: without write permission
    there, MLflow retries for minutes before it fails.
    """
    database = sqlite_file(url)
    if database is None:
        return
    database = database.resolve()
    if not os.access(database.parent, os.W_OK | os.X_OK):
        raise PermissionError(
            f"{what} {url}: no permission to write in {database.parent} (SQLite writes the database and its "
            "journal there); run from a folder you can write, or point the URI elsewhere"
        )
    if database.exists() and not os.access(database, os.W_OK):
        raise PermissionError(f"{what} {url}: {database} is read-only; make it writable or point the URI elsewhere")


def check_tracking_server(uri: str, timeout: float = 10.0) -> None:
    """Fail now, with the reason, when an http(s) tracking URI has no MLflow server answering.

    MLflow's own client retries for minutes before giving up; this check runs
    before any data is decoded or any training starts.
    """
    if not uri.startswith(("http://", "https://")):
        return
    # MLflow's client retries a failed request for minutes by default; a trial should not stall that long.
    for name, value in (("MAX_RETRIES", "2"), ("BACKOFF_FACTOR", "1"), ("TIMEOUT", "30")):
        os.environ.setdefault(f"MLFLOW_HTTP_REQUEST_{name}", value)
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            response.read()
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ValueError(
            f"MLflow tracking server {uri} is unreachable ({reason}); start it "
            "(mlflow server --host 127.0.0.1 --port PORT ...) or pass another --tracking-uri"
        ) from err


def storage_identity(url: str) -> str:
    """A store URL as a record keeps it: SQLite files absolute (the same store from any folder), passwords hidden."""
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        return "sqlite:///" + str(Path(url.removeprefix("sqlite:///")).resolve())
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def recorded_store(record: dict, given: str = "") -> str:
    """The MLflow store of a run folder's record (``mlflow_run.json``): ``given`` first, then the store the run
    recorded (unless its password is hidden there), then ``$MLFLOW_TRACKING_URI`` or the default."""
    recorded = record.get("tracking_uri", "")
    return resolve_tracking_uri(given or ("" if "***" in recorded else recorded))
