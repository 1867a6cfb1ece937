"""Shared fixtures: a storage URL parametrised over SQLite and PostgreSQL, and tiny studies."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# --- markers ------------------------------------------------------------------------------------
# slow: starts Ray or trains several trials. `pytest -m "not slow"` is the quick set; a test that
# starts Ray without the marker fails (below). gpu: the CUDA path; skipped where CUDA is absent.


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    no_cuda = pytest.mark.skip(reason="gpu: no CUDA device here")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(no_cuda)


@pytest.fixture(autouse=True)
def _ray_only_in_slow_tests(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outside `slow` tests Ray has nowhere to start: $RAY_ADDRESS names a port nobody answers
    (the discard port), in this process and in the CLI's subprocesses, which inherit it. A test
    that starts Ray unmarked fails with Ray's connection error instead of slowing the quick set."""
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")


def _require_slow(request: pytest.FixtureRequest, fixture: str) -> None:
    if request.node.get_closest_marker("slow") is None:
        pytest.fail(f"{request.node.nodeid} uses {fixture} (Ray) but is not marked slow")


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


class PostgresServer:
    """A PostgreSQL server of the test's own: its own data folder and port, trust auth, on
    127.0.0.1 only; stopped and started again at will (the machine's server is never touched).

    Run as the ``postgres`` user when the tests run as root (initdb refuses root), so its folder
    lives under a short /tmp path that user can reach, not in pytest's root-only tmp_path.
    """

    def __init__(self) -> None:
        import glob
        import shutil
        import socket
        import tempfile

        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        if not found:
            _no_postgres("no PostgreSQL binaries under /usr/lib/postgresql/*/bin")
        self._bin = Path(found[-1]).parent
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as and shutil.which("runuser") is None:
            _no_postgres("running as root without runuser to start PostgreSQL as postgres")
        self.folder = Path(tempfile.mkdtemp(prefix="ss-pg-", dir="/tmp"))
        if self._as:
            shutil.chown(self.folder, user="postgres")
        with socket.socket() as probe:  # a free port, picked by the kernel
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def create(self) -> None:
        """Make the data folder and start the server."""
        self._pg("initdb", "-D", "data", "-A", "trust", "-U", "postgres", "--no-sync")
        self.start()

    def _pg(self, tool: str, *args: str) -> None:
        done = subprocess.run(
            [*self._as, str(self._bin / tool), *args],
            cwd=self.folder,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, f"{tool} failed: {done.stdout}{done.stderr}"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._pg("pg_ctl", "-D", "data", "-l", "server.log", "-o", options, "-w", "start")

    def stop(self) -> None:
        """Stop at once (pg_ctl's fast mode: clients are disconnected)."""
        self._pg("pg_ctl", "-D", "data", "-m", "fast", "-w", "stop")

    def database(self) -> str:
        """The URL of a new, empty database on this server."""
        import sqlalchemy

        name = f"db_{uuid.uuid4().hex[:12]}"
        engine = sqlalchemy.create_engine(self.url, isolation_level="AUTOCOMMIT")
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        return self.url.rsplit("/", 1)[0] + f"/{name}"

    def close(self) -> None:
        import shutil

        subprocess.run(
            [*self._as, str(self._bin / "pg_ctl"), "-D", "data", "-m", "immediate", "stop"],
            cwd=self.folder,
            capture_output=True,
            check=False,
        )
        shutil.rmtree(self.folder, ignore_errors=True)


def _no_postgres(why: str) -> None:
    if os.environ.get("SCALING_SEARCH_REQUIRE_POSTGRES"):
        pytest.fail(f"PostgreSQL required (SCALING_SEARCH_REQUIRE_POSTGRES) but: {why}")
    pytest.skip(why)


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server this module starts and stops itself (see PostgresServer)."""
    server = PostgresServer()
    try:
        server.create()
        yield server
    finally:
        server.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A storage URL on an empty database: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'study.db'}"
    else:
        yield request.getfixturevalue("postgres_url")


# 10 grid candidates that build 6 distinct networks at φ = 1 (three classes of two or three
# triples: α ∈ {1.05, 1.1, 1.15, 1.2, 1.25} all give repeats 2,3,3,4,4,5,2).
TINY_STUDY = """\
name: {name}
output_dir: {out}
data: {{kind: synthetic, num_classes: 4, train_size: 128, validation_size: 32, test_size: 48,
        image_px: 24}}
space: {{alpha: [1.0, 1.3], beta: [1.0, 1.15], gamma: [1.1, 1.15], tolerance: 0.1}}
search: {{sampler: grid, max_concurrent_trials: 2}}
train: {{base_resolution_px: 20, epochs: 2, batch_size: 32}}
resources: {{cpus_per_trial: 1, num_cpus: 2}}
"""
TINY_CANDIDATES, TINY_NETWORKS = 10, 6


@pytest.fixture
def tiny_study(tmp_path: Path) -> Path:
    """A study file of a grid with 10 candidates (6 distinct networks) and trials of a few
    seconds on CPU."""
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_STUDY.format(name="tiny", out=tmp_path / "runs"), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def ray_local(request: pytest.FixtureRequest) -> Iterator[None]:
    """A local Ray with 2 CPUs for the tests of one module (marked slow)."""
    import ray

    if request.node.get_closest_marker("slow") is None:
        pytest.fail(f"{request.node.nodeid} uses ray_local but is not marked slow")

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def ray_tmp(request: pytest.FixtureRequest) -> Iterator[str]:
    """A short private RAY_TMPDIR (socket paths must stay under 107 bytes); its processes are
    killed and the folder removed afterwards. For slow tests only."""
    import shutil
    import subprocess
    import tempfile

    _require_slow(request, "ray_tmp")

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


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``scaling-search ARGS`` in a subprocess (text output, two minutes at most)."""
    return subprocess.run(
        [sys.executable, "-m", "scaling_search.cli", *args],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@dataclass(frozen=True)
class CliResult:
    """How one in-process ``scaling-search`` command ended: its exit code and output."""

    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli_in_process(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> Callable[..., CliResult]:
    """``scaling-search ARGS`` run by its entry point, ``main(argv)``, in this process: in the
    folder ``cwd``, without $SCALING_SEARCH_STORAGE, its output read at the file descriptors.
    Fast (no interpreter start, no second import of torch) for the many commands that must stop
    at their first line; tests of whole runs use :func:`run_cli`."""
    from scaling_search.cli.main import main

    def run(*args: str, cwd: Path) -> CliResult:
        monkeypatch.chdir(cwd)
        monkeypatch.delenv("SCALING_SEARCH_STORAGE", raising=False)
        capfd.readouterr()  # drop what came before
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse's own errors
            code = exc.code if isinstance(exc.code, int) else 1
        out, err = capfd.readouterr()
        return CliResult(code, out, err)

    return run


def run_study_cli(
    study: Path, ray_tmp: str, *, pythonpath: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``scaling-search run STUDY`` in a subprocess with a private RAY_TMPDIR; ``pythonpath``
    makes a user's module (an objective) importable by the CLI and its Ray workers."""
    env = {**cli_env(), "RAY_TMPDIR": ray_tmp}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(
        [sys.executable, "-m", "scaling_search.cli", "run", str(study)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


# --- studies for the report and the browser tests ------------------------------------------------

# Trials of every outcome the report draws, on the paper's constraint (α·β²·γ² ≈ 2):
# (α, β, γ), Optuna state, epochs completed, accuracy at epoch 1.
CRAFTED_BUDGET = 3
CRAFTED_TRIALS = (
    ((1.2, 1.1, 1.15), "COMPLETE", 3, 0.40),
    ((1.4, 1.05, 1.1), "COMPLETE", 3, 0.45),
    ((1.0, 1.2, 1.18), "COMPLETE", 3, 0.35),
    ((1.1, 1.0, 1.35), "PRUNED", 1, 0.90),  # best score of all, but stopped early: cannot win
    ((1.9, 1.0, 1.02), "COMPLETE", 1, 0.85),  # completed, but with fewer epochs than the budget
    ((1.3, 1.1, 1.1), "FAIL", 1, 0.20),
    ((1.05, 1.15, 1.15), "RUNNING", 2, 0.30),
)
CRAFTED_SEEDS = (0, 1)


def crafted_accuracy(base: float, epoch: int, seed: int) -> float:
    """The made-up learning curve of a crafted trial: +0.1 per epoch, +0.01 per seed."""
    return round(base + 0.1 * (epoch - 1) + 0.01 * seed, 6)


def crafted_test_accuracy(validation: float) -> float:
    """The made-up test accuracy of a crafted full-budget trial: 0.03 below its validation."""
    return round(validation - 0.03, 6)


def make_crafted_study(url: str, name: str = "crafted"):
    """A study with two seeds of each of CRAFTED_TRIALS, recorded the way the driver records
    trials (user attributes from space.describe, one intermediate value per epoch), plus one
    queued trial and one skipped duplicate. Built with optuna.trial.create_trial: no training."""
    import optuna
    from optuna.distributions import FloatDistribution, IntDistribution
    from optuna.trial import TrialState, create_trial

    from scaling_search.space import Coefficients, describe

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=url, study_name=name, direction="maximize")
    study.set_user_attr(
        "study_config",
        {
            "space": {"product": 2.0},
            "train": {"epochs": CRAFTED_BUDGET, "base_resolution_px": 32},
        },
    )
    study.set_user_attr("chosen_on", "validation")  # as ledger.open_study records it
    study.set_user_attr("num_classes", 10)
    dists = {
        "alpha": FloatDistribution(1.0, 2.0),
        "beta": FloatDistribution(1.0, 2.0),
        "gamma": FloatDistribution(1.0, 2.0),
        "seed": IntDistribution(0, 9),
    }
    for (alpha, beta, gamma), state, epochs, base in CRAFTED_TRIALS:
        for seed in CRAFTED_SEEDS:
            cost = describe(Coefficients(alpha, beta, gamma), base_resolution_px=32, num_classes=10)
            attrs = {**cost.to_dict(), "seed": seed, "epochs_completed": epochs}
            if state == "FAIL":
                attrs["fail_reason"] = "diverged: the loss became nan at epoch 2"
            curve = {e: crafted_accuracy(base, e, seed) for e in range(1, epochs + 1)}
            if state == "COMPLETE" and epochs == CRAFTED_BUDGET:
                attrs["test_accuracy"] = crafted_test_accuracy(curve[epochs])
            params = {"alpha": alpha, "beta": beta, "gamma": gamma, "seed": seed}
            study.add_trial(
                create_trial(
                    state=TrialState[state],
                    value=curve[epochs] if state == "COMPLETE" else None,
                    params=params,
                    distributions=dists,
                    user_attrs=attrs,
                    intermediate_values=curve,
                )
            )
    first = {"alpha": 1.2, "beta": 1.1, "gamma": 1.15, "seed": 0}
    study.add_trial(create_trial(state=TrialState.WAITING, params=first, distributions=dists))
    study.add_trial(
        create_trial(
            state=TrialState.FAIL,
            params=first,
            distributions=dists,
            user_attrs={**attrs, "duplicate_of": 0, "fail_reason": "duplicate"},
        )
    )
    return study


@pytest.fixture(scope="session")
def finished_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny study run to the end once per test session by the real CLI (Ray, training);
    returns its study file. Its SQLite storage and outputs live beside it."""
    import shutil
    import tempfile

    folder = tmp_path_factory.mktemp("finished")
    path = folder / "tiny.yaml"
    path.write_text(TINY_STUDY.format(name="finished", out=folder / "runs"), encoding="utf-8")
    ray_tmp = tempfile.mkdtemp(prefix="ss-ray-", dir="/tmp")
    try:
        result = run_study_cli(path, ray_tmp)
    finally:
        subprocess.run(["pkill", "-9", "-f", ray_tmp], check=False, capture_output=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-3000:]
    (folder / "run.out").write_text(result.stdout, encoding="utf-8")
    return path
