"""Shared fixtures: a storage URL parametrised over SQLite and PostgreSQL, and tiny studies."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_ADMIN_URL = os.environ.get(
    "SCALING_SEARCH_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


def _postgres_or_skip() -> str:
    """A fresh PostgreSQL database for this test run; skipped without a server (never in CI)."""
    import sqlalchemy

    name = f"scaling_search_test_{uuid.uuid4().hex[:12]}"
    try:
        engine = sqlalchemy.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
    except Exception as exc:  # any failure to reach the server means "no server"
        if os.environ.get("SCALING_SEARCH_REQUIRE_POSTGRES"):
            pytest.fail(f"PostgreSQL required (SCALING_SEARCH_REQUIRE_POSTGRES) but: {exc}")
        pytest.skip(f"no PostgreSQL server at {PG_ADMIN_URL}: {exc}")
    return name


def _drop_postgres(name: str) -> None:
    import sqlalchemy

    engine = sqlalchemy.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """The URL of a fresh, empty PostgreSQL database, dropped afterwards."""
    name = _postgres_or_skip()
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        _drop_postgres(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A storage URL on an empty database: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'study.db'}"
    else:
        yield request.getfixturevalue("postgres_url")


TINY_STUDY = """\
name: {name}
output_dir: {out}
data: {{kind: synthetic, num_classes: 4, train_size: 96, test_size: 48, image_px: 24}}
space: {{alpha: [1.15, 1.25], beta: [1.05, 1.15], gamma: [1.1, 1.15], tolerance: 0.1}}
search: {{sampler: grid, max_concurrent_trials: 2}}
train: {{base_resolution_px: 16, epochs: 2, batch_size: 32}}
resources: {{cpus_per_trial: 1, num_cpus: 2}}
"""


@pytest.fixture
def tiny_study(tmp_path: Path) -> Path:
    """A study file of a grid with 6 candidates and trials of a few seconds on CPU."""
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_STUDY.format(name="tiny", out=tmp_path / "runs"), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    """A local Ray with 2 CPUs for the tests of one module."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def ray_tmp() -> Iterator[str]:
    """A short private RAY_TMPDIR (socket paths must stay under 107 bytes); its processes are
    killed and the folder removed afterwards."""
    import shutil
    import subprocess
    import tempfile

    folder = tempfile.mkdtemp(prefix="ss-ray-", dir="/tmp")
    yield folder
    subprocess.run(["pkill", "-9", "-f", folder], check=False, capture_output=True)
    shutil.rmtree(folder, ignore_errors=True)


def cli_env() -> dict[str, str]:
    """The environment for running the CLI in a subprocess: no storage from the environment, no
    Python warnings in its output. (A function, for tests that run the CLI from threads.)"""
    env = dict(os.environ)
    env.pop("SCALING_SEARCH_STORAGE", None)
    env["PYTHONWARNINGS"] = "ignore"
    return env
