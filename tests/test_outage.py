"""The study's database going away under a run (scaling_search.study.outage), on a PostgreSQL server
this module starts, stops and starts again itself (conftest.own_postgres; the machine's own
server is never touched). The searcher is driven as Tune drives it, without Ray; the same with
the real CLI and Ray is test_outage_run.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy
from conftest import PostgresServer
from optuna.trial import TrialState
from ray.tune.search import Searcher
from sqlalchemy.engine import make_url

from scaling_search.config import load_study
from scaling_search.driver._run import _StopRun
from scaling_search.driver._search import StudySearch
from scaling_search.driver.interrupt import StopRequest
from scaling_search.study import ledger, record, storage
from scaling_search.study.define import DefineByRun
from scaling_search.study.outage import DatabaseAway, DatabaseWatch, failure_line
from scaling_search.study.storage import StorageError, mask_url, open_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)

STUDY = """\
name: outage
output_dir: {out}
data: {{kind: synthetic, num_classes: 4, train_size: 32, test_size: 16, image_px: 16}}
space: {{alpha: [1.0, 1.3], beta: [1.0, 1.15], gamma: [1.1, 1.15], tolerance: 0.1}}
search: {{sampler: grid, max_concurrent_trials: 2}}
train: {{base_resolution_px: 20, epochs: 2}}
"""
SECRET = "s3cret-pw"  # trust auth lets any password in; no message may show it
STARTED = time.time()


class Driver:
    """A searcher and its heartbeat on ``url``, as run_study sets them up (heartbeat every
    0.2 s here), with what they say kept in ``says``."""

    def __init__(self, url: str, tmp_path: Path, *, patience_s: float, limit: int = 4) -> None:
        path = tmp_path / "study.yaml"
        path.write_text(STUDY.format(out=tmp_path / "runs"), encoding="utf-8")
        study = load_study(path)
        self.storage = open_storage(url)
        self.ot_study = ledger.open_study(study, self.storage)
        ledger.plan_trials(study, self.ot_study)
        self.says: list[str] = []
        self.watch = DatabaseWatch(mask_url(url), patience_s=patience_s, say=self.says.append)
        self.heartbeat = ledger.Heartbeat(self.storage, 0.2, self.watch).__enter__()
        self.searcher = StudySearch(
            DefineByRun(
                study.space,
                sampler="grid",
                seeds=ledger.seeds(study),
                base_resolution_px=study.train.base_resolution_px,
                num_classes=4,
            ),
            metric="accuracy",
            mode="max",
            ot_study=optuna.load_study(
                study_name=study.name, storage=self.storage, sampler=ledger.sampler(study)
            ),
            budget_epochs=2,
            queued_only=True,
            stage=record.SEARCH_STAGE,
            heartbeat=self.heartbeat,
            limit=limit,
            adaptive=False,
            say=self.says.append,
            watch=self.watch,
        )

    def trial(self, trial_id: str) -> optuna.trial.FrozenTrial:
        return self.storage.get_trial(self.searcher._ot_trials[trial_id]._trial_id)

    def close(self) -> None:
        self.heartbeat.__exit__(None, None, None)
        self.storage.engine.dispose()


def _result(epoch: int, accuracy: float) -> dict[str, Any]:
    return {
        "epoch": epoch,
        "accuracy": accuracy,
        "started_at": STARTED,
        "reported_at": STARTED + epoch,
        "images_per_second": 100.0,
        "node_id": "node",
        "node_ip": "127.0.0.1",
        "data_reused": False,
        "resumed_from_epoch": 0,
    }


def _wait_for(what: str, condition: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)


def _with_password(url: str) -> str:
    return make_url(url).set(password=SECRET).render_as_string(hide_password=False)


def _heartbeat_of(url: str, trial_id: int) -> Any:
    engine = sqlalchemy.create_engine(url)
    query = sqlalchemy.text("SELECT heartbeat FROM trial_heartbeats WHERE trial_id = :id")
    try:
        with engine.connect() as connection:
            return connection.execute(query, {"id": trial_id}).scalar_one()
    finally:
        engine.dispose()


def test_results_reported_while_the_database_is_away_are_recorded_once_it_answers(
    own_postgres: PostgresServer, tmp_path: Path
) -> None:
    url = own_postgres.database()
    driver = Driver(url, tmp_path, patience_s=300)
    try:
        assert driver.searcher.suggest("t1") is not None
        driver.searcher._recorder.flush()  # t2's trial is claimed ahead, and beats
        ahead = driver.searcher._ahead[0].result()
        assert ahead is not None
        beat_before = _heartbeat_of(url, ahead[0]._trial_id)

        own_postgres.stop()
        driver.searcher.on_trial_result("t1", _result(1, 0.5))
        driver.searcher.on_trial_complete("t1", _result(2, 0.75))
        _wait_for("outage noticed", lambda: driver.watch.away)
        assert driver.searcher.suggest("t2") is None  # launches nothing while it is away
        own_postgres.start()

        driver.searcher._recorder.flush()  # every write retried until it landed
        _wait_for("return noticed", lambda: not driver.watch.away)
        assert driver.searcher.suggest("t2") is not None  # launching again
        # The trial held across the outage beats again (another driver sees it alive).
        _wait_for("a new heartbeat", lambda: _heartbeat_of(url, ahead[0]._trial_id) > beat_before)
        driver.searcher.on_trial_result("t2", _result(1, 0.4))
        driver.searcher.on_trial_complete("t2", _result(2, 0.6))
        driver.searcher.close()

        first = driver.trial("t1")
        assert (first.state, first.value) == (TrialState.COMPLETE, 0.75)
        assert first.intermediate_values == {1: 0.5, 2: 0.75}  # no epoch lost
        assert first.user_attrs["epochs_completed"] == 2
        assert driver.trial("t2").state == TrialState.COMPLETE
        assert driver.searcher.lost() == []
        said = "\n".join(driver.says)
        assert said.count("the study's database stopped answering (") == 1
        assert "launching nothing more" in said
        assert "Connection refused" in said or "shutting down" in said  # as the server said it
        assert said.count("the study's database answers again after") == 1
    finally:
        driver.close()


def test_a_database_that_stays_away_ends_the_run_with_one_line_naming_the_lost_results(
    own_postgres: PostgresServer, tmp_path: Path
) -> None:
    url = _with_password(own_postgres.database())
    driver = Driver(url, tmp_path, patience_s=2)
    try:
        assert driver.searcher.suggest("t1") is not None
        driver.searcher._recorder.flush()
        number = driver.searcher._ot_trials["t1"].number
        own_postgres.stop()
        try:
            driver.searcher.on_trial_result("t1", _result(1, 0.5))
            driver.searcher.on_trial_complete("t1", _result(2, 0.75))
            _wait_for("the watch giving up", lambda: driver.watch.gave_up)
            assert driver.searcher.suggest("t2") == Searcher.FINISHED
            stopper = _StopRun(StopRequest(), driver.watch, driver.searcher)
            assert stopper.stop_all()  # Tune stops every trial
            driver.searcher.close(unfinished="the study's database stopped answering")
            with pytest.raises(DatabaseAway) as ended:
                driver.watch.check(driver.searcher.lost())
        finally:
            own_postgres.start()
        line = str(ended.value)
        assert line.startswith(f"the study's database at {mask_url(url)} did not answer for ")
        assert SECRET not in line and "***" in line
        assert "Connection refused" in line or "shutting down" in line
        assert f"the results of trial(s) {number} could not be recorded" in line
        assert line.endswith("run the same command again once the database answers")
        # Nothing was written after it went away: the trial is as the outage found it, RUNNING
        # under this driver, which the next run recovers once this one has exited.
        trial = driver.trial("t1")
        assert trial.state == TrialState.RUNNING and trial.intermediate_values == {}
    finally:
        driver.close()


def test_a_trial_claimed_as_the_connection_drops_is_given_back_not_left_running(
    own_postgres: PostgresServer, tmp_path: Path
) -> None:
    url = own_postgres.database()
    driver = Driver(url, tmp_path, patience_s=300)
    try:
        # The first heartbeat a claim writes (after the trial is RUNNING, before its holder is
        # named) has the server drop the connection, once: a sequence is not rolled back.
        _run_sql(
            url,
            "CREATE SEQUENCE once",
            "CREATE FUNCTION drop_connection() RETURNS trigger AS $$ BEGIN "
            "IF nextval('once') = 1 THEN PERFORM pg_terminate_backend(pg_backend_pid()); "
            "END IF; RETURN NEW; END $$ LANGUAGE plpgsql",
            "CREATE TRIGGER drop_connection BEFORE INSERT ON trial_heartbeats "
            "FOR EACH ROW EXECUTE FUNCTION drop_connection()",
        )
        assert driver.searcher.suggest("t1") is not None  # the claim was tried again
        driver.searcher.on_trial_complete("t1", _result(2, 0.7))
        driver.searcher.close()

        trials = driver.ot_study.get_trials(deepcopy=False)
        first = trials[0]  # taken, then the connection dropped
        assert first.state == TrialState.FAIL and first.user_attrs[record.GIVEN_BACK_ATTR]
        assert first.user_attrs[record.FAIL_REASON_ATTR] == (
            "claimed as the study's database stopped answering; given back"
        )
        assert driver.trial("t1").number != first.number
        assert driver.trial("t1").state == TrialState.COMPLETE
        assert not [t for t in trials if t.state == TrialState.RUNNING]
        assert any("the study's database stopped answering (" in line for line in driver.says)
    finally:
        driver.close()


def _run_sql(url: str, *statements: str) -> None:
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as connection:
        for statement in statements:
            connection.execute(sqlalchemy.text(statement))
    engine.dispose()


def test_a_trial_another_driver_failed_meanwhile_is_said_and_stopped_not_dropped(
    tmp_path: Path,
) -> None:
    driver = Driver(f"sqlite:///{tmp_path / 'study.db'}", tmp_path, patience_s=60)
    try:
        driver.searcher.suggest("t1")
        driver.searcher._recorder.flush()
        held = driver.searcher._ot_trials["t1"]
        # What another driver's recovery writes once this one's heartbeats are stale.
        other = "driver elsewhere:1:1 sent no heartbeat for 60 s"
        assert ledger.fail_trial(driver.storage, held._trial_id, other)
        driver.searcher.on_trial_result("t1", _result(1, 0.5))
        driver.searcher._recorder.flush()
        assert driver.searcher.taken_over("t1")
        assert _StopRun(StopRequest(), driver.watch, driver.searcher)("t1", {})
        driver.searcher.on_trial_complete("t1", _result(2, 0.75))
        driver.searcher.close()
        trial = driver.trial("t1")
        assert trial.state == TrialState.FAIL and trial.intermediate_values == {}
        assert trial.user_attrs[record.FAIL_REASON_ATTR] == other
        lines = [line for line in driver.says if "another driver" in line]
        assert lines == [
            f"trial {held.number} was marked FAIL by another driver ({other}): its results "
            "here are not recorded, and it is stopped"
        ]
    finally:
        driver.close()


def test_giving_back_goes_on_past_a_trial_the_database_refuses(
    own_postgres: PostgresServer, tmp_path: Path
) -> None:
    url = own_postgres.database()
    driver = Driver(url, tmp_path, patience_s=60, limit=5)
    try:
        driver.searcher.suggest("t1")
        driver.searcher._prepare_next()  # two trials claimed ahead, as an adaptive search may
        driver.searcher._recorder.flush()
        first, second = (f.result() for f in driver.searcher._ahead)
        assert first is not None and second is not None
        refused, kept = first[0], second[0]
        _refuse_writes_to(url, refused._trial_id)
        driver.searcher.on_trial_complete("t1", _result(2, 0.7))
        driver.searcher.close()  # no error: the next trial was given back all the same

        assert driver.storage.get_trial(refused._trial_id).state == TrialState.RUNNING
        given = driver.storage.get_trial(kept._trial_id)
        assert given.state == TrialState.FAIL and given.user_attrs[record.GIVEN_BACK_ATTR]
        assert driver.trial("t1").state == TrialState.COMPLETE
        assert (
            f"1 trial(s) claimed by this run could not be given back (trial {refused.number}: "
            f"trial {refused._trial_id} is on hold); the next run recovers them"
        ) in driver.says
    finally:
        driver.close()


def _refuse_writes_to(url: str, trial_id: int) -> None:
    """A trigger that refuses every attribute written to one trial (a database's own rule)."""
    _run_sql(
        url,
        "CREATE FUNCTION hold() RETURNS trigger AS $$ BEGIN "
        "RAISE EXCEPTION 'trial % is on hold', NEW.trial_id; END $$ LANGUAGE plpgsql",
        "CREATE TRIGGER hold BEFORE INSERT OR UPDATE ON trial_user_attributes "
        f"FOR EACH ROW WHEN (NEW.trial_id = {int(trial_id)}) EXECUTE FUNCTION hold()",
    )


def test_storage_errors_are_said_as_what_they_are(
    own_postgres: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = _with_password(own_postgres.database())
    opened = open_storage(url)
    study = optuna.create_study(storage=opened, study_name="said")
    own_postgres.stop()
    try:
        # Optuna wraps the refused connection in "… e.g. exceeding max length"; said as it is.
        with pytest.raises(optuna.exceptions.StorageInternalError) as wrapped:
            study.set_user_attr("k", 1)
        assert "max length" in str(wrapped.value)
        line = failure_line(wrapped.value)
        assert line is not None and line.startswith("the study's database did not answer (")
        assert "Connection refused" in line and "max length" not in line
        with pytest.raises(StorageError) as refused:
            open_storage(url)
    finally:
        own_postgres.start()
        opened.engine.dispose()
    message = str(refused.value)
    assert message.startswith(f"cannot open storage {mask_url(url)!r}: connection failed")
    assert "Connection refused" in message and SECRET not in message

    # Only Optuna's schema check reads as a version mismatch; any other RuntimeError while
    # opening is said as it is. (No real database raises one here: injected.)
    def broken(*args: Any) -> Any:
        raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    monkeypatch.setattr(storage, "_create", broken)
    with pytest.raises(StorageError) as other:
        open_storage(f"sqlite:///{tmp_path / 'other.db'}")
    assert str(other.value).endswith(": cannot schedule new futures after interpreter shutdown")
    assert "Optuna" not in str(other.value)
