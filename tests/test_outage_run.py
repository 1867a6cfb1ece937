"""The study's database stopped and started again under a running study: the real CLI, real Ray
and real training, on a PostgreSQL server this module starts itself (conftest.own_postgres, its
own port and data folder; the machine's server is never touched). The run launches nothing while
the database is away, writes every result once it answers, and finishes with nothing lost; a
database that stays away ends the run with one line, and what it held is trained again next run.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from conftest import TINY_STUDY, PostgresServer, cli_env
from optuna.trial import FrozenTrial, TrialState

from scaling_search.config import load_study
from scaling_search.study import ledger

pytestmark = pytest.mark.slow
EPOCHS = 3


class Run:
    """``scaling-search run STUDY [ARGS]`` in a subprocess, its output kept in files."""

    def __init__(self, study_file: Path, ray_tmp: str, *args: str) -> None:
        self.log = study_file.with_suffix(f".{time.monotonic_ns()}.log")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "scaling_search.cli", "run", str(study_file), *args],
            env={**cli_env(), "RAY_TMPDIR": ray_tmp},
            stdout=self.log.open("w"),
            stderr=self.log.with_suffix(".err").open("w"),
        )

    def stdout(self) -> str:
        return self.log.read_text()

    def stderr(self) -> str:
        return self.log.with_suffix(".err").read_text()

    def wait_for(self, what: str, condition: Callable[[], bool], timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None, f"the run ended before {what}: {self.stderr()}"
            assert time.monotonic() < deadline, f"no {what} after {timeout} s: {self.stdout()}"
            time.sleep(0.2)


def _study_file(tmp_path: Path, name: str, url: str) -> Path:
    """The tiny study with β fixed at 1.15 (6 triples, 3 networks), 3 epochs, on ``url``."""
    path = tmp_path / f"{name}.yaml"
    text = TINY_STUDY.format(name=name, out=tmp_path / "runs" / name)
    text = text.replace("beta: [1.0, 1.15]", "beta: [1.15, 1.15]")
    text = text.replace("epochs: 2", f"epochs: {EPOCHS}") + f"storage: {url}\n"
    assert "beta: [1.15, 1.15]" in text and f"epochs: {EPOCHS}" in text
    path.write_text(text, encoding="utf-8")
    return path


def _networks(study_file: Path) -> int:
    study = load_study(study_file)
    return len(ledger.grid_classes(study, num_classes=study.data.num_classes))


def _epoch_recorded(url: str) -> bool:
    """Some trial has an epoch recorded (read with plain SQL: the run may not have made the
    tables yet)."""
    engine = sqlalchemy.create_engine(url)
    query = sqlalchemy.text("SELECT COUNT(*) FROM trial_intermediate_values")
    try:
        with engine.connect() as connection:
            return connection.execute(query).scalar_one() > 0
    except sqlalchemy.exc.SQLAlchemyError:
        return False
    finally:
        engine.dispose()


def _trials(url: str, name: str) -> list[FrozenTrial]:
    return optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)


def _assert_every_network_trained_once_with_every_epoch(
    trials: list[FrozenTrial], networks: int
) -> None:
    trained = [t for t in trials if t.state == TrialState.COMPLETE and not ledger.is_shared(t)]
    points = [ledger.point_of(t) for t in trained]
    assert len(points) == len(set(points)) == networks  # none lost, none trained twice
    for trial in trained:
        assert sorted(trial.intermediate_values) == list(range(1, EPOCHS + 1))
        assert trial.user_attrs["epochs_completed"] == EPOCHS


def test_a_run_outlives_its_database_stopping_and_starting_again(
    own_postgres: PostgresServer, tmp_path: Path, ray_tmp: str
) -> None:
    url = own_postgres.database()
    study_file = _study_file(tmp_path, "restart", url)
    run = Run(study_file, ray_tmp)
    run.wait_for("an epoch recorded", lambda: _epoch_recorded(url))
    own_postgres.stop()
    try:
        run.wait_for("the outage noticed", lambda: "stopped answering" in run.stdout())
        time.sleep(5)  # a few heartbeats (and retried writes) into the outage
    finally:
        own_postgres.start()
    assert run.proc.wait(timeout=400) == 0, run.stderr()

    out = run.stdout()
    assert "launching nothing more while it is away" in out
    assert "the study's database answers again after" in out
    assert " 0 failed" in out and "given back" not in out
    trials = _trials(url, "restart")
    assert not [t for t in trials if t.state in (TrialState.FAIL, TrialState.RUNNING)]
    _assert_every_network_trained_once_with_every_epoch(trials, _networks(study_file))


def test_a_database_that_stays_away_ends_the_run_with_one_line(
    own_postgres: PostgresServer, tmp_path: Path, ray_tmp: str
) -> None:
    url = own_postgres.database()
    study_file = _study_file(tmp_path, "away", url)
    run = Run(study_file, ray_tmp, "--database-patience", "3")
    run.wait_for("an epoch recorded", lambda: _epoch_recorded(url))
    own_postgres.stop()
    try:
        code = run.proc.wait(timeout=300)
    finally:
        own_postgres.start()
    assert code == 1, run.stderr()
    errors = run.stderr().strip().splitlines()
    assert len(errors) == 1 and "Traceback" not in run.stderr()
    line = errors[0]
    assert line.startswith(f"scaling-search: error: the study's database at {url} did not ")
    assert "Connection refused" in line or "shutting down" in line
    assert line.endswith("run the same command again once the database answers")

    # Nothing was written after the database went away: what the run held is RUNNING under a
    # driver that has exited, and the next run (here: its first steps, without Ray) fails it
    # and queues its points again, the trials named lost among them.
    study = load_study(study_file)
    ot_study = optuna.load_study(study_name="away", storage=url)
    held = {t.number for t in ot_study.get_trials(states=(TrialState.RUNNING,))}
    named = re.search(r"the results of trial\(s\) ([\d, ]+) could not be recorded", line)
    lost = {int(n) for n in named.group(1).split(", ")} if named else set()
    assert held and lost <= held
    assert ledger.recover_stale(ot_study, lambda _: None) == len(held)
    trained = {ledger.point_of(t) for t in ot_study.get_trials() if t.state in ledger.DONE}
    queued = ledger.plan_trials(study, ot_study)
    assert queued == _networks(study_file) - len(trained) > 0
