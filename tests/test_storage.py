"""Tests for scaling_search.study.storage: which URL, masking passwords, checking and opening
storage.

Opening runs against real databases: the ``storage_url`` fixture gives a SQLite file and a fresh
PostgreSQL database (see conftest.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy
from sqlalchemy.engine import URL, make_url

from scaling_search.config import parse_study
from scaling_search.study.storage import (
    DB_FILENAME,
    ENV_VAR,
    StorageError,
    check_url,
    mask_url,
    open_storage,
    resolve_url,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

SECRET = "secret"


# --- resolve_url ---------------------------------------------------------------------------------


def test_the_studys_own_storage_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "sqlite:///from-env.db")
    study = parse_study({"name": "s", "storage": "postgresql://u@h/db"})
    assert resolve_url(study) == "postgresql://u@h/db"


def test_the_environment_wins_over_the_default_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "postgresql://u@h/from_env")
    assert resolve_url(parse_study({"name": "s"})) == "postgresql://u@h/from_env"


@pytest.mark.parametrize("env", [None, "", "   "])
def test_default_is_a_sqlite_file_in_the_output_folder(
    monkeypatch: pytest.MonkeyPatch, env: str | None
) -> None:
    if env is None:
        monkeypatch.delenv(ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(ENV_VAR, env)
    url = make_url(resolve_url(parse_study({"name": "s"})))
    assert url.get_backend_name() == "sqlite"
    assert Path(url.database or "") == Path("runs") / "s" / DB_FILENAME


def test_default_file_follows_output_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    study = parse_study({"name": "s", "output_dir": str(tmp_path / "out")})
    url = make_url(resolve_url(study))
    assert Path(url.database or "") == tmp_path / "out" / DB_FILENAME


def test_a_studys_repr_never_shows_its_storage_url() -> None:
    study = parse_study({"name": "s", "storage": f"postgresql://u:{SECRET}@h/db"})
    assert SECRET not in repr(study) and SECRET not in str(study)
    assert resolve_url(study) == f"postgresql://u:{SECRET}@h/db"


# --- mask_url ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://u:{SECRET}@h/db",
        f"postgresql+psycopg://user:{SECRET}@db.example.org:5432/studies",
        f"postgresql://:{SECRET}@h/db",
        f"postgresql://u:{SECRET}@/db",
        f"postgresql://u:{SECRET}@h:notaport/db",  # malformed: hidden after the scheme
        f"postgresql//u:{SECRET}@h/db",  # no scheme separator at all
        f"u:{SECRET}@h",
        f"postgresql://u:{SECRET}-with space@h/db",
        f"postgresql://u:{SECRET}#frag@h/db",
        f"postgresql://u:{SECRET}?x@h/db",
        f"postgresql://u:{SECRET}:colon@h/db",
    ],
)
def test_mask_url_never_shows_the_password(url: str) -> None:
    masked = mask_url(url)
    assert SECRET not in masked
    assert masked  # something is shown


@pytest.mark.parametrize("password", ["p@ss:w/rd?#x", "50% off & more", "ümlaut secret"])
def test_mask_url_hides_encoded_special_characters(password: str) -> None:
    url = URL.create(
        "postgresql+psycopg", username="u", password=password, host="h", database="db"
    ).render_as_string(hide_password=False)
    masked = mask_url(url)
    assert password not in masked
    assert url.split("@")[0].split(":")[-1] not in masked  # nor its %-encoded form
    assert "***" in masked and "@h/db" in masked


def test_mask_url_keeps_what_is_not_secret() -> None:
    assert mask_url("postgresql://alice:pw@db.example.org:5433/studies") == (
        "postgresql://alice:***@db.example.org:5433/studies"
    )
    assert mask_url("sqlite:///runs/x/optuna.db") == "sqlite:///runs/x/optuna.db"


# Regression: with a scheme and a user but no password, the fallback for scheme-less URLs once
# ate "//user" ("postgresql:***@h/db"), so messages named a URL that was not the user's.
@pytest.mark.parametrize(
    "url",
    [
        "postgresql://alice@db.example.org:5433/studies",
        "postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
    ],
)
def test_mask_url_leaves_a_url_without_a_password_unchanged(url: str) -> None:
    assert mask_url(url) == url


def test_mask_url_hides_a_password_with_a_raw_at_sign() -> None:
    assert "secret" not in mask_url("postgresql://u:top@secret@h/db")


def test_mask_url_hides_a_password_in_the_query() -> None:
    assert SECRET not in mask_url(f"postgresql://u@h/db?password={SECRET}")


# Issue 14: the mask once required a scheme of letters, digits, '+', '.', '-' and stopped at a line
# break, so these showed the password.
@pytest.mark.parametrize(
    ("url", "masked"),
    [
        (f"mysql+mysql_connector://u:{SECRET}@h/db", "mysql+mysql_connector://u:***@h/db"),
        (f"my_db+some_driver://u:{SECRET}@h/db", "my_db+some_driver://u:***@h/db"),
        (f"postgresql://u:{SECRET}\n2@h/db", "postgresql://u:***@h/db"),
        (f"postgresql://u:{SECRET}\r\x0b\x0c\x1c\x85\u2028@h/db", "postgresql://u:***@h/db"),
        (f"postgresql://u:\x00\x07\t{SECRET}@h/db", "postgresql://u:***@h/db"),
        (f"postgresql://u:{SECRET}%40x%3Ay@h/db", "postgresql://u:***@h/db"),
        (f"postgresql://u:{SECRET}@@x:y@h:5432/db", "postgresql://u:***@h:5432/db"),
        (f"postgresql://user@server:{SECRET}@h/db", "postgresql://user@server:***@h/db"),
        (f"postgresql://u:{SECRET}", "postgresql://u:***"),  # no host: 'secret' is no port
        (f"postgresql://u@h/db?sslmode=require&sslpassword={SECRET}&x=1",
         "postgresql://u@h/db?sslmode=require&sslpassword=***&x=1"),
        (f"host=h user=u password={SECRET} dbname=db", "host=h user=u password=***"),
    ],
)  # fmt: skip
def test_mask_url_hides_the_password_whatever_the_driver_and_characters(
    url: str, masked: str
) -> None:
    assert mask_url(url) == masked


@pytest.mark.parametrize(
    "url",
    ["postgresql://h:5432/db", "postgresql://[::1]:5432/db", "sqlite:///C:/runs/x.db"],
)
def test_mask_url_leaves_ports_and_hosts_alone(url: str) -> None:
    assert mask_url(url) == url


# --- check_url -----------------------------------------------------------------------------------


def _refusal(call: Callable[[str], object], url: str) -> str:
    """The one-line StorageError that ``call(url)`` raises; it never shows the password."""
    with pytest.raises(StorageError) as info:
        call(url)
    message = str(info.value)
    assert "\n" not in message
    assert SECRET not in message
    return message


def _check_error(url: str) -> str:
    return _refusal(check_url, url)


@pytest.mark.parametrize(
    "url",
    ["not a url", f"postgresql//u:{SECRET}@h/db", f"postgresql://u:{SECRET}@h:port/db", ""],
)
def test_malformed_urls_are_refused(url: str) -> None:
    assert "malformed" in _check_error(url)


@pytest.mark.parametrize(
    ("url", "dialect"),
    [
        (f"mysql://u:{SECRET}@h/db", "mysql"),
        (f"mysql+pymysql://u:{SECRET}@h/db", "mysql"),
        (f"oracle://u:{SECRET}@h/db", "oracle"),
        ("foo://bar", "foo"),
    ],
)
def test_unsupported_databases_are_refused(url: str, dialect: str) -> None:
    message = _check_error(url)
    assert repr(dialect) in message
    assert "sqlite" in message and "postgresql" in message  # what is allowed


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///"])
def test_sqlite_in_memory_is_refused(url: str) -> None:
    assert "in-memory" in _check_error(url)


def test_sqlite_memory_keyword_is_refused() -> None:
    _check_error("sqlite:///:memory:")


def test_plain_postgresql_gets_the_shipped_driver() -> None:
    parsed = check_url("postgresql://u@h:5432/db")
    assert parsed.drivername == "postgresql+psycopg"
    assert (parsed.host, parsed.port, parsed.database) == ("h", 5432, "db")


def test_sqlite_file_url_passes_unchanged() -> None:
    parsed = check_url("sqlite:///runs/s/optuna.db")
    assert parsed.get_backend_name() == "sqlite" and parsed.database == "runs/s/optuna.db"


# --- open_storage --------------------------------------------------------------------------------


def test_open_storage_persists_a_study(storage_url: str) -> None:
    storage = open_storage(storage_url)
    study = optuna.create_study(storage=storage, study_name="persist", direction="maximize")
    study.set_user_attr("marker", 42)
    study.add_trial(
        optuna.trial.create_trial(
            params={"alpha": 1.2},
            distributions={"alpha": optuna.distributions.FloatDistribution(1.0, 2.0)},
            value=0.75,
            user_attrs={"seed": 3},
        )
    )
    storage.engine.dispose()

    again = optuna.load_study(study_name="persist", storage=open_storage(storage_url))
    assert again.user_attrs["marker"] == 42
    (trial,) = again.trials
    assert trial.value == 0.75
    assert trial.params == {"alpha": 1.2}
    assert trial.user_attrs == {"seed": 3}
    assert trial.state == optuna.trial.TrialState.COMPLETE


def test_open_storage_creates_the_sqlite_folder(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "optuna.db"
    storage = open_storage(f"sqlite:///{path}")
    optuna.create_study(storage=storage, study_name="x")
    assert path.is_file()


def _journal_mode(path: Path) -> str:
    import sqlite3

    with sqlite3.connect(path) as connection:
        return str(connection.execute("PRAGMA journal_mode").fetchone()[0])


def test_a_new_sqlite_file_uses_the_write_ahead_log_and_an_old_one_keeps_its_journal(
    tmp_path: Path,
) -> None:
    made = tmp_path / "new.db"
    storage = open_storage(f"sqlite:///{made}")
    optuna.create_study(storage=storage, study_name="s").set_user_attr("k", 1)
    assert _journal_mode(made) == "wal"
    with storage.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    storage.engine.dispose()

    old = tmp_path / "old.db"
    optuna.storages.RDBStorage(f"sqlite:///{old}").engine.dispose()  # rollback journal
    storage = open_storage(f"sqlite:///{old}")
    optuna.create_study(storage=storage, study_name="s").set_user_attr("k", 1)
    assert _journal_mode(old) == "delete"
    with storage.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL, as before
    storage.engine.dispose()


def test_open_storage_refuses_a_bad_url_before_creating_anything(tmp_path: Path) -> None:
    with pytest.raises(StorageError):
        open_storage(f"mysql://u:{SECRET}@h/db")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://u:{SECRET}@127.0.0.1:1/db",
        f"postgresql+psycopg://u:{SECRET}@127.0.0.1:1/db",
    ],
)
def test_unreachable_postgresql_is_one_masked_line(url: str) -> None:
    with pytest.raises(StorageError) as info:
        open_storage(url)
    message = str(info.value)
    assert "\n" not in message
    assert SECRET not in message
    assert "127.0.0.1:1" in message and "***" in message


@pytest.mark.parametrize(
    "password",
    [f"{SECRET}\nline2", f"{SECRET}\x1c\x07tail", f"{SECRET} with space", f"{SECRET}%20x"],
    ids=["line-break", "control-characters", "space", "percent-encoded"],
)
def test_an_unreachable_server_never_shows_the_password(password: str) -> None:
    """The URL as the user wrote it (raw characters) reaches the driver; whatever the driver
    says about it, no form of the password is shown."""
    url = f"postgresql://u:{password}@127.0.0.1:1/db"
    with pytest.raises(StorageError) as info:
        open_storage(url)
    message = str(info.value)
    assert SECRET not in message, message
    assert "postgresql://u:***@127.0.0.1:1/db" in message and "\n" not in message


@pytest.mark.parametrize("port", [0, 65536, 99999])
def test_a_port_out_of_range_is_refused_before_connecting(port: int) -> None:
    message = _check_error(f"postgresql://u:{SECRET}@127.0.0.1:{port}/db")
    assert f"port {port} is out of range" in message and "1 to 65535" in message


def test_a_sqlite_file_name_with_a_nul_byte_is_refused(tmp_path: Path) -> None:
    assert "NUL" in _check_error(f"sqlite:///{tmp_path}/a\0b.db")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("driver", ["psycopg2", "asyncpg", "pg8000"])
def test_a_driver_that_is_not_shipped_is_a_storage_error(driver: str) -> None:
    with pytest.raises(StorageError):
        open_storage(f"postgresql+{driver}://u:{SECRET}@127.0.0.1:1/db")


# --- schema versions -----------------------------------------------------------------------------


def _stamp_schema(url: str, revision: str, made_by: str) -> None:
    """Make the database look created by Optuna ``made_by``, at alembic schema ``revision``."""
    storage = open_storage(url)
    with storage.engine.begin() as connection:
        connection.execute(
            sqlalchemy.text("UPDATE alembic_version SET version_num = :v"), {"v": revision}
        )
        connection.execute(
            sqlalchemy.text("UPDATE version_info SET library_version = :v"), {"v": made_by}
        )
    storage.engine.dispose()


def _revision(url: str) -> str:
    engine = sqlalchemy.create_engine(check_url(url))
    with engine.connect() as connection:
        revision = connection.execute(sqlalchemy.text("SELECT version_num FROM alembic_version"))
        found = revision.scalar_one()
    engine.dispose()
    return found


def _with_password(url: str) -> str:
    """``url`` with a password on PostgreSQL (the test server trusts local connections anyway)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        return url
    return parsed.set(password=SECRET).render_as_string(hide_password=False)


def _schema_error(url: str) -> str:
    message = _refusal(open_storage, url)
    assert mask_url(url) in message
    return message


def test_a_schema_older_than_optuna_asks_for_a_storage_upgrade(storage_url: str) -> None:
    storage = open_storage(storage_url)
    head, older = storage.get_all_versions()[:2]  # newest first
    assert storage.get_current_version() == head
    storage.engine.dispose()
    _stamp_schema(storage_url, older, made_by="3.0.0")

    url = _with_password(storage_url)
    message = _schema_error(url)
    assert "Optuna 3.0.0" in message and f"Optuna {optuna.__version__}" in message
    assert f"`optuna storage upgrade --storage '{mask_url(url)}'`" in message
    assert _revision(storage_url) == older  # nothing was upgraded behind the user's back


def test_a_schema_newer_than_optuna_asks_to_upgrade_optuna(storage_url: str) -> None:
    _stamp_schema(storage_url, "v99.0.0", made_by="99.0.0")
    message = _schema_error(_with_password(storage_url))
    assert "Optuna 99.0.0" in message and "newer than the installed" in message
    assert "pip install -U optuna" in message
    assert "optuna storage upgrade" not in message
    assert _revision(storage_url) == "v99.0.0"


def _open_at_once(url: str, barrier: Any) -> str:
    barrier.wait()
    try:
        open_storage(url)
    except StorageError as exc:
        return str(exc)
    return "ok"


def test_drivers_starting_together_on_an_empty_database_all_open_it(storage_url: str) -> None:
    # Two drivers started at once both create Optuna's tables; on PostgreSQL the loser once failed
    # with 'duplicate key value violates unique constraint "pg_type_typname_nsp_index"'.
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    count = 4
    with context.Manager() as manager:
        barrier = manager.Barrier(count)
        with context.Pool(count) as pool:
            answers = pool.starmap(_open_at_once, [(storage_url, barrier)] * count)
    assert answers == ["ok"] * count
    optuna.create_study(storage=open_storage(storage_url), study_name="after")
