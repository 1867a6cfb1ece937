"""Optuna RDB storage through SQLAlchemy: a SQLite file by default, PostgreSQL on a cluster.

The URL comes from the study file's ``storage`` key; if the study names none, from the
environment variable ``SCALING_SEARCH_STORAGE``; otherwise it is a SQLite file in the study's
output folder. Passwords are never printed: every message shows :func:`mask_url`'s form.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

if TYPE_CHECKING:
    import optuna

    from scaling_search.config import StudyConfig

__all__ = [
    "DB_FILENAME",
    "ENV_VAR",
    "StorageError",
    "check_url",
    "mask_url",
    "open_storage",
    "resolve_url",
]

ENV_VAR = "SCALING_SEARCH_STORAGE"
DB_FILENAME = "optuna.db"
_DIALECTS = ("sqlite", "postgresql")


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


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ***; unparsable text is hidden after the scheme."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        scheme, sep, _ = url.partition("://")
        return f"{scheme}://***" if sep else "***"


def check_url(url: str) -> URL:
    """Parse and check a storage URL without connecting.

    Raises:
        StorageError: a malformed URL or an unsupported database, named with the password masked.
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise StorageError(
            f"storage URL {mask_url(url)!r} is malformed; expected e.g. "
            "sqlite:///runs/study.db or postgresql+psycopg://user@host:5432/db"
        ) from None
    if parsed.get_backend_name() not in _DIALECTS:
        raise StorageError(
            f"storage URL {mask_url(url)!r}: database {parsed.get_backend_name()!r} is not "
            f"supported; use one of {', '.join(_DIALECTS)}"
        )
    if parsed.get_backend_name() == "sqlite" and not parsed.database:
        raise StorageError(
            f"storage URL {mask_url(url)!r} names no file; an in-memory SQLite database would "
            "lose the study, use sqlite:///path/to/file.db"
        )
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        # SQLAlchemy's default PostgreSQL driver is psycopg2; this project ships psycopg 3.
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """Open (creating if needed) the Optuna RDB storage at ``url``.

    Creates the SQLite file's folder. Raises StorageError for a bad URL or a database that cannot
    be reached, with the password masked.
    """
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    parsed = check_url(url)
    engine_kwargs: dict[str, object] = {}
    if parsed.get_backend_name() == "sqlite":
        Path(parsed.database or ".").expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs["connect_args"] = {"timeout": 30}
    else:
        engine_kwargs.update(pool_pre_ping=True, pool_size=4, max_overflow=4)
    try:
        return optuna.storages.RDBStorage(
            parsed.render_as_string(hide_password=False), engine_kwargs=engine_kwargs
        )
    except (SQLAlchemyError, OSError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        if parsed.password:
            reason = reason.replace(str(parsed.password), "***")
        raise StorageError(f"cannot open storage {mask_url(url)!r}: {reason}") from None
    except RuntimeError as exc:  # Optuna's "schema is older/newer than this version" check
        raise StorageError(f"storage {mask_url(url)!r}: {exc}") from None
