"""Optuna RDB storage through SQLAlchemy: a SQLite file by default, PostgreSQL on a cluster.

The URL comes from the study file's ``storage`` key; if the study names none, from the
environment variable ``SCALING_SEARCH_STORAGE``; otherwise it is a SQLite file in the study's
output folder. Passwords are never printed: every message shows :func:`mask_url`'s form.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError

from scaling_search._redact import mask_url, redact, url_password

if TYPE_CHECKING:
    import optuna

    from scaling_search.config import StudyConfig

__all__ = [
    "DB_FILENAME",
    "ENV_VAR",
    "StorageError",
    "check_url",
    "describe_error",
    "mask_url",
    "open_storage",
    "resolve_url",
    "study_exists",
    "unreachable",
]

ENV_VAR = "SCALING_SEARCH_STORAGE"
DB_FILENAME = "optuna.db"
HEARTBEAT_INTERVAL_S = 10  # a driver refreshes each trial it runs this often
HEARTBEAT_GRACE_S = 60  # six missed beats: a slow database is not a dead driver
_LOCK_KEY = 0x5CA11E5  # the advisory lock under which a process creates Optuna's tables
CONNECT_TIMEOUT_S = 5  # an unreachable host fails in seconds, not after the OS's TCP timeout
_DRIVERS = ("sqlite", "sqlite+pysqlite", "postgresql+psycopg")
_MAX_PORT = 65535


class StorageError(ValueError):
    """A storage URL that cannot be used; the message never contains a password."""


def resolve_url(study: StudyConfig) -> str:
    """The storage URL for ``study``: its own, else $SCALING_SEARCH_STORAGE, else a SQLite file."""
    if study.storage:
        return study.storage
    from_env = os.environ.get(ENV_VAR, "").strip()
    if from_env:
        return from_env
    return f"sqlite:///{(study.out_dir / DB_FILENAME).as_posix()}"


def check_url(url: str) -> URL:
    """Parse and check a storage URL without connecting.

    Raises:
        StorageError: a malformed URL, an unsupported database or driver, or an in-memory SQLite
            database; named with the password masked.
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise StorageError(
            f"storage URL {mask_url(url)!r} is malformed; expected e.g. "
            "sqlite:///runs/study.db or postgresql+psycopg://user@host:5432/db"
        ) from None
    if parsed.drivername == "postgresql":
        # SQLAlchemy's default PostgreSQL driver is psycopg2; this project ships psycopg 3.
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.drivername not in _DRIVERS:
        backend = parsed.get_backend_name()
        what = (
            f"driver {parsed.drivername!r}"
            if backend in ("sqlite", "postgresql")
            else f"database {backend!r}"
        )
        raise StorageError(
            f"storage URL {mask_url(url)!r}: {what} is not supported; use sqlite:///FILE or "
            "postgresql://… (driver psycopg 3)"
        )
    if parsed.drivername == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise StorageError(
            f"storage URL {mask_url(url)!r} names no file; an in-memory SQLite database would "
            "lose the study, use sqlite:///path/to/file.db"
        )
    if "\0" in (parsed.database or ""):
        raise StorageError(f"storage URL {mask_url(url)!r}: a file name cannot hold a NUL byte")
    if parsed.port is not None and not 1 <= parsed.port <= _MAX_PORT:
        raise StorageError(
            f"storage URL {mask_url(url)!r}: port {parsed.port} is out of range; a port is 1 to "
            f"{_MAX_PORT}"
        )
    return parsed


def study_exists(url: str, study_name: str) -> bool:
    """Whether ``study_name`` is recorded at ``url``, creating nothing (no file, no tables)."""
    import sqlalchemy
    from sqlalchemy.exc import SQLAlchemyError

    parsed = check_url(url)
    if parsed.drivername == "sqlite" and not Path(parsed.database or "").expanduser().is_file():
        return False
    connect_args = {"connect_timeout": CONNECT_TIMEOUT_S} if parsed.drivername != "sqlite" else {}
    engine = sqlalchemy.create_engine(parsed, connect_args=connect_args)
    try:
        with engine.connect() as connection:
            if "studies" not in sqlalchemy.inspect(connection).get_table_names():
                return False
            query = sqlalchemy.text("SELECT 1 FROM studies WHERE study_name = :name")
            return connection.execute(query, {"name": study_name}).first() is not None
    except SQLAlchemyError as exc:
        raise StorageError(f"cannot open storage {mask_url(url)!r}: {_reason(exc, url)}") from None
    finally:
        engine.dispose()


def _reason(exc: BaseException, url: str) -> str:
    """The first line of a library's error about ``url`` (the database's own message, see
    :func:`describe_error`), with its password hidden in every form it may take there (as
    written, decoded, from the query)."""
    text = describe_error(exc)
    parsed = make_url(url)  # check_url read it already
    query_password = parsed.query.get("password")
    secrets = (parsed.password, url_password(url), *_as_tuple(query_password))
    hidden = redact(text, *(None if s is None else str(s) for s in secrets))
    return (hidden.splitlines() or [type(exc).__name__])[0]


def _as_tuple(value: str | tuple[str, ...] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else value


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and what it was raised from or while handling, outermost first."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def describe_error(exc: BaseException) -> str:
    """What went wrong, in one line: the database's own message where a database error lies
    behind ``exc`` (Optuna wraps every one in "An exception is raised during the commit …
    e.g. exceeding max length", whatever it was), else ``exc``'s first line."""
    from sqlalchemy.exc import DBAPIError

    for error in _chain(exc):
        if isinstance(error, DBAPIError) and error.orig is not None:
            exc = error.orig
            break
    lines = str(exc).strip().splitlines()
    return " ".join(lines[0].split()) if lines else type(exc).__name__


def unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` says that the database did not answer: a connection refused, lost or
    timed out, a server shutting down, a transaction it broke off, or a SQLite file locked past
    its timeout. Errors of the query or the data (a missing table, a bad value) are not."""
    import sqlite3

    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

    for error in _chain(exc):
        if not isinstance(error, DBAPIError):
            continue
        if error.connection_invalidated:
            return True
        if isinstance(error.orig, sqlite3.Error):
            return "locked" in str(error.orig) or "busy" in str(error.orig)
        return isinstance(error, OperationalError | InterfaceError)
    return False


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """Open (creating if needed) the Optuna RDB storage at ``url``.

    Creates the SQLite file's folder. Raises StorageError for a bad URL, a database that cannot
    be reached, a schema of another Optuna version, or any other error while opening (said as
    what it is), with the password masked.
    """
    parsed = check_url(url)
    engine_kwargs: dict[str, object] = {}
    try:
        if parsed.drivername == "sqlite":
            Path(parsed.database or ".").expanduser().parent.mkdir(parents=True, exist_ok=True)
            engine_kwargs["connect_args"] = {"timeout": 30}
        else:
            # One driver (its searcher, heartbeat thread and status reads) per engine: a small
            # pool, checked before use so a restarted server does not fail the next write.
            engine_kwargs.update(
                pool_pre_ping=True,
                pool_size=4,
                max_overflow=4,
                pool_recycle=1800,
                connect_args={"connect_timeout": CONNECT_TIMEOUT_S},
            )
        sqlite = parsed.drivername.startswith("sqlite")
        new_file = sqlite and not Path(parsed.database or "").expanduser().is_file()
        with _schema_lock(parsed):
            storage = _create(parsed, engine_kwargs)
        if sqlite:
            _lock_sqlite_transactions(storage.engine, write_ahead_log=new_file)
        return storage
    except StorageError:
        raise
    except Exception as exc:
        if isinstance(exc, RuntimeError) and _SCHEMA_CHECK in str(exc):
            raise StorageError(_schema_message(str(exc), url)) from None
        raise StorageError(f"cannot open storage {mask_url(url)!r}: {_reason(exc, url)}") from None


@contextlib.contextmanager
def _schema_lock(parsed: URL) -> Iterator[None]:
    """Let one process at a time create or check Optuna's tables.

    Drivers started together on an empty database both create the tables; PostgreSQL then fails
    the later one ('duplicate key value violates unique constraint "pg_type_typname_nsp_index"').
    PostgreSQL: a session advisory lock. SQLite: nothing here; see :func:`_create`.
    """
    if parsed.drivername != "postgresql+psycopg":
        yield
        return
    import sqlalchemy

    engine = sqlalchemy.create_engine(
        parsed,
        poolclass=sqlalchemy.pool.NullPool,
        connect_args={"connect_timeout": CONNECT_TIMEOUT_S},
    )
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": _LOCK_KEY})
            connection.commit()
            try:
                yield
            finally:
                query = sqlalchemy.text("SELECT pg_advisory_unlock(:key)")
                connection.execute(query, {"key": _LOCK_KEY})
                connection.commit()
    finally:
        engine.dispose()


def _create(parsed: URL, engine_kwargs: dict[str, object]) -> optuna.storages.RDBStorage:
    """Optuna's RDBStorage, created again if another process was creating the same SQLite
    tables at the same moment (the loser sees 'already exists' or a duplicate version row)."""
    import optuna
    from sqlalchemy.exc import IntegrityError, OperationalError

    for attempt in range(3):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    parsed.render_as_string(hide_password=False),
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=HEARTBEAT_INTERVAL_S,
                    grace_period=HEARTBEAT_GRACE_S,
                )
        except (IntegrityError, OperationalError) as exc:
            racing = isinstance(exc, IntegrityError) or "already exists" in str(exc)
            if attempt == 2 or not racing:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def _lock_sqlite_transactions(engine: Engine, *, write_ahead_log: bool) -> None:
    """Make each SQLite transaction take the database's write lock as it begins.

    pysqlite begins a transaction only at its first write, so Optuna's read-then-update of a
    queued trial (WAITING → RUNNING; PostgreSQL locks the row with FOR UPDATE) could run in two
    drivers at once and hand one trial to both. SQLAlchemy's recipe for pysqlite: switch off the
    driver's own BEGIN and emit BEGIN IMMEDIATE instead.

    With ``write_ahead_log`` (a file this call created) the database is switched to SQLite's
    write-ahead log: readers (the dashboard) no longer block the driver, and a commit costs
    about a third of a rollback-journal commit here (a driver commits some 30 times per trial).
    A database in that mode syncs at checkpoints only (synchronous=NORMAL): a crashed process
    loses nothing committed; a power cut can lose the last commits, never the file. A file made
    otherwise keeps its journal mode, so reading a study never changes its file.
    """
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        if write_ahead_log:
            dbapi_connection.execute("PRAGMA journal_mode=WAL")
        (mode,) = dbapi_connection.execute("PRAGMA journal_mode").fetchone()
        if mode == "wal":
            dbapi_connection.execute("PRAGMA synchronous=NORMAL")

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened before the listeners existed are closed


# How Optuna's check of the schema's version begins its RuntimeError ("The runtime optuna version
# X is no longer compatible with the table schema (set up by optuna Y)"): only that one is about
# versions; any other error while opening is said as it is.
_SCHEMA_CHECK = "is no longer compatible with the table schema"


def _schema_message(optuna_message: str, url: str) -> str:
    """Optuna's schema-version complaint, said with the command to run (password masked)."""
    found = re.search(r"set up by optuna ([^)\s]+)", optuna_message)
    made_by = f"Optuna {found.group(1)}" if found else "another Optuna version"
    import optuna

    if "optuna storage upgrade" in optuna_message:
        return (
            f"storage {mask_url(url)!r} was created by {made_by}, older than the installed "
            f"Optuna {optuna.__version__}; back it up, then run "
            f"`optuna storage upgrade --storage '{mask_url(url)}'` (with the real password)"
        )
    return (
        f"storage {mask_url(url)!r} was created by {made_by}, newer than the installed Optuna "
        f"{optuna.__version__}; upgrade Optuna (pip install -U optuna) to use it"
    )
