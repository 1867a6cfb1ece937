"""The searcher as Tune drives it, without a Ray session: claims, trials prepared ahead, what it
records on each Optuna trial, and the background recorder that does the writing."""

from __future__ import annotations

import functools
import pickle
import threading
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState
from ray.tune.search import Searcher

from scaling_search.config import load_study
from scaling_search.driver._recorder import Recorder
from scaling_search.driver._search import Classes, StudySearch
from scaling_search.study import ledger, record
from scaling_search.study.define import DefineByRun
from scaling_search.study.storage import open_storage

# --- the recorder ---------------------------------------------------------------------------------


def test_recorder_runs_calls_in_the_order_given_on_its_own_thread():
    recorder = Recorder(quiet_s=0.0)
    seen: list[tuple[int, str]] = []

    def note(k: int) -> None:
        seen.append((k, threading.current_thread().name))

    futures = [recorder.submit(functools.partial(note, k)) for k in range(50)]
    recorder.result(futures[-1])
    recorder.close()
    assert [k for k, _ in seen] == list(range(50))
    assert {name for _, name in seen} == {"scaling-search-recorder"}


def test_recorder_holds_calls_back_while_the_caller_is_busy_but_not_when_waited_for():
    recorder = Recorder(quiet_s=30.0)
    ran = threading.Event()
    future = recorder.submit(ran.set)
    recorder.busy()
    assert not ran.wait(0.3)  # the event loop was busy just now: recording waits for quiet
    started = time.monotonic()
    recorder.result(future)  # someone needs it: it runs at once
    assert ran.is_set() and time.monotonic() - started < 10.0
    recorder.close()


def test_recorder_runs_a_call_wanted_soon_and_those_before_it_without_waiting_for_quiet():
    recorder = Recorder(quiet_s=30.0)
    recorder.busy()
    before, soon = threading.Event(), threading.Event()
    recorder.submit(before.set)
    recorder.submit(soon.set, soon=True)
    assert soon.wait(10.0) and before.is_set()
    later = threading.Event()
    recorder.submit(later.set)
    assert not later.wait(0.3)  # back to waiting for quiet
    recorder.close()
    assert later.is_set()


def test_recorder_raises_an_unwaited_error_at_flush_and_a_waited_one_only_once():
    recorder = Recorder(quiet_s=0.0)
    recorder.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        recorder.flush()
    recorder.flush()  # reported once

    def broken() -> None:
        raise KeyError("seen by the waiter")

    with pytest.raises(KeyError):
        recorder.result(recorder.submit(broken))
    recorder.close()  # already raised to the waiter: not again


# --- the searcher ---------------------------------------------------------------------------------

STUDY = """\
name: searcher
output_dir: {out}
data: {{kind: synthetic, num_classes: 4, train_size: 32, test_size: 16, image_px: 16}}
space: {space}
search: {{sampler: {sampler}, n_trials: 6, max_concurrent_trials: 2}}
train: {{base_resolution_px: 20, epochs: 2}}
"""
# 10 grid candidates, 6 distinct networks (as conftest.TINY_STUDY).
SPACE = "{alpha: [1.0, 1.3], beta: [1.0, 1.15], gamma: [1.1, 1.15], tolerance: 0.1}"
# Two networks in all: one depth (α ≤ 1.25 gives repeats 2,3,3,4,4,5,2), B0's channels, and
# γ = sqrt(2 / α) at 20 px rounds to 26 or 27 px.
TWO_NETWORKS = "{alpha: [1.1, 1.2], beta: [1.0, 1.0], gamma: [1.0, 1.5]}"


def _searcher(
    tmp_path: Path, sampler: str, limit: int, space: str = SPACE, says: list[str] | None = None
) -> tuple[StudySearch, optuna.Study]:
    path = tmp_path / "study.yaml"
    text = STUDY.format(out=tmp_path / "runs", sampler=sampler, space=space)
    path.write_text(text, encoding="utf-8")
    study = load_study(path)
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    ot_study = ledger.open_study(study, storage)
    ledger.plan_trials(study, ot_study)
    classes = None
    if sampler == "grid":
        members = ledger.grid_classes(study, num_classes=4)
        classes = Classes(members, study.train.base_resolution_px, 4)
    searcher = StudySearch(
        DefineByRun(
            study.space,
            sampler=sampler,
            seeds=ledger.seeds(study),
            base_resolution_px=study.train.base_resolution_px,
            num_classes=4,
        ),
        metric="accuracy",
        mode="max",
        ot_study=optuna.load_study(
            study_name=study.name, storage=storage, sampler=ledger.sampler(study)
        ),
        budget_epochs=study.train.epochs,
        queued_only=sampler == "grid",
        stage=record.SEARCH_STAGE,
        heartbeat=ledger.Heartbeat(storage, 60.0),
        limit=limit,
        adaptive=sampler == "tpe",
        classes=classes,
        say=(says if says is not None else []).append,
        n_trials=None if sampler == "grid" else study.search.n_trials,
    )
    return searcher, ot_study


STARTED = time.time()  # one attempt of each trial


def _result(epoch: int, accuracy: float) -> dict[str, Any]:
    return {
        "epoch": epoch,
        "accuracy": accuracy,
        "started_at": STARTED,
        "reported_at": STARTED + epoch,
        "images_per_second": 123.45,
        "node_id": "node",
        "node_ip": "127.0.0.1",
        "data_reused": epoch > 1,
        "resumed_from_epoch": 0,
    }


def _states(ot_study: optuna.Study) -> list[TrialState]:
    return [t.state for t in ot_study.get_trials(deepcopy=False)]


def test_the_searcher_claims_the_next_trial_ahead_but_never_beyond_its_limit(tmp_path: Path):
    searcher, ot_study = _searcher(tmp_path, "grid", limit=2)
    queued = _states(ot_study).count(TrialState.WAITING)
    assert queued > 2
    first = searcher.suggest("t1")
    assert first is not None and set(first) == {"alpha", "beta", "gamma", "seed"}
    searcher._recorder.flush()
    # The second trial is claimed and sampled while the first runs.
    assert _states(ot_study).count(TrialState.RUNNING) == 2
    second = searcher.suggest("t2")
    assert second is not None and second != first
    searcher._recorder.flush()
    # The limit (the trials this Tuner asks for) is reached: nothing more is claimed.
    assert _states(ot_study).count(TrialState.RUNNING) == 2
    assert _states(ot_study).count(TrialState.WAITING) == queued - 2
    for trial_id in ("t1", "t2"):
        searcher.on_trial_result(trial_id, _result(1, 0.5))
        searcher.on_trial_complete(trial_id, _result(2, 0.7))
    searcher.close()
    trained = [t for t in ot_study.get_trials(deepcopy=False) if not ledger.is_shared(t)]
    assert [t.state for t in trained].count(TrialState.COMPLETE) == 2
    assert TrialState.FAIL not in _states(ot_study)


def test_a_trial_prepared_ahead_that_is_never_asked_for_is_given_back(tmp_path: Path):
    searcher, ot_study = _searcher(tmp_path, "grid", limit=3)
    point = searcher.suggest("t1")
    searcher.on_trial_complete("t1", _result(2, 0.7))
    searcher.close()  # Tune stopped before asking for the second trial
    failed = ot_study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    assert len(failed) == 1
    reason = failed[0].user_attrs[record.FAIL_REASON_ATTR]
    assert reason == "prepared ahead, but the run ended first"
    trained = ot_study.get_trials(deepcopy=False)[searcher._ot_trials["t1"].number]
    assert point is not None and trained.params["alpha"] == point["alpha"]
    assert ledger.point_of(failed[0]) != ledger.point_of(trained)
    assert not ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))


def test_the_searcher_records_each_epoch_once_and_prunes_an_early_stop(tmp_path: Path):
    searcher, ot_study = _searcher(tmp_path, "tpe", limit=2)
    searcher.suggest("full")
    searcher.suggest("stopped")
    searcher.on_trial_result("full", _result(1, 0.5))
    searcher.on_trial_result("full", _result(2, 0.7))
    searcher.on_trial_complete("full", _result(2, 0.7))
    # Tune passes a scheduler's stop to on_trial_complete only, with the result it stopped on.
    searcher.on_trial_complete("stopped", _result(1, 0.9))
    searcher.close()
    by_state = {t.state: t for t in ot_study.get_trials(deepcopy=False)}
    full, stopped = by_state[TrialState.COMPLETE], by_state[TrialState.PRUNED]
    assert full.value == pytest.approx(0.7)
    assert full.intermediate_values == {1: 0.5, 2: 0.7}
    assert full.user_attrs["epochs_completed"] == 2
    assert full.user_attrs["data_reused"] is False  # the first epoch's, written once
    assert full.user_attrs["images_per_second"] == pytest.approx(123.5)
    assert stopped.intermediate_values == {1: 0.9}
    assert ot_study.best_trial.number == full.number  # 0.9 after one epoch does not win
    assert stopped.user_attrs["epochs_completed"] == 1
    assert not ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))


def test_an_adaptive_search_samples_the_next_trial_after_the_last_result(tmp_path: Path):
    """TPE learns from results: its next trial is claimed and sampled once a trial's end is
    recorded, not while all trials run."""
    searcher, ot_study = _searcher(tmp_path, "tpe", limit=3)
    searcher.suggest("a")
    searcher.suggest("b")
    searcher._recorder.flush()
    assert len(ot_study.get_trials(deepcopy=False)) == 2
    searcher.on_trial_complete("a", _result(2, 0.7))
    searcher._recorder.flush()
    first, _, ahead = ot_study.get_trials(deepcopy=False)
    assert first.state == TrialState.COMPLETE and ahead.state == TrialState.RUNNING
    assert first.datetime_complete is not None and ahead.datetime_start is not None
    assert ahead.datetime_start >= first.datetime_complete
    searcher.suggest("c")
    assert searcher._ot_trials["c"].number == ahead.number  # the trial sampled ahead
    for trial_id in ("b", "c"):
        searcher.on_trial_complete(trial_id, _result(2, 0.6))
    searcher.close()
    assert len(ot_study.get_trials(deepcopy=False)) == 3  # the limit: nothing more claimed


def test_two_drivers_searching_with_a_sampler_train_n_trials_between_them(tmp_path: Path):
    # Both planned the study's 6 trials before either claimed one: each claim counts what the
    # other trains too, so that together they train 6, not 12.
    one, ot_study = _searcher(tmp_path, "random", limit=6)
    two, _ = _searcher(tmp_path, "random", limit=6)
    served: dict[str, int] = {"one": 0, "two": 0}
    active = {"one": one, "two": two}
    for k in range(12):
        for name, searcher in list(active.items()):
            trial_id = f"{name}{k}"
            if searcher.suggest(trial_id) == Searcher.FINISHED:
                del active[name]
                continue
            served[name] += 1
            searcher.on_trial_result(trial_id, _result(1, 0.5))
            searcher.on_trial_complete(trial_id, _result(2, 0.6))
    assert not active
    for searcher in (one, two):
        searcher.close()
    trials = ot_study.get_trials(deepcopy=False)
    trained = [t for t in trials if t.state == TrialState.COMPLETE and not ledger.is_shared(t)]
    assert len(trained) == served["one"] + served["two"] == 6
    assert served["one"] and served["two"]
    assert not [t for t in trials if t.state == TrialState.RUNNING]


# --- one network, one training -------------------------------------------------------------------


def test_a_grid_result_is_shared_with_the_other_triples_of_its_class(tmp_path: Path):
    searcher, ot_study = _searcher(tmp_path, "grid", limit=6)
    classes = searcher._waiting._classes
    assert classes is not None and len(classes.members) == 6
    for k in range(6):
        searcher.suggest(f"t{k}")
        searcher.on_trial_result(f"t{k}", _result(1, 0.1 * k))
        searcher.on_trial_complete(f"t{k}", _result(2, 0.1 * k + 0.05))
    searcher.close()
    trials = ot_study.get_trials(deepcopy=False)
    trained = [t for t in trials if not ledger.is_shared(t)]
    copies = [t for t in trials if ledger.is_shared(t)]
    assert len(trained) == 6 and len(copies) == 10 - 6  # every candidate has its trial
    assert {
        (t.user_attrs["alpha"], t.user_attrs["beta"], t.user_attrs["gamma"]) for t in trials
    } == {m.as_tuple() for members in classes.members.values() for m in members}
    for copy in copies:
        source = trials[copy.user_attrs[record.SHARED_ATTR]]
        assert ledger.point_of(copy) == ledger.point_of(source)  # same network, same seed
        assert copy.params["alpha"] != source.params["alpha"]  # another triple of the class
        assert (copy.state, copy.value) == (source.state, source.value)
        assert copy.intermediate_values == source.intermediate_values
        assert copy.user_attrs["epochs_completed"] == 2
        assert "node_id" not in copy.user_attrs  # it ran nowhere
    assert ledger.duplicates(trials) == {"skipped_duplicates": 0, "trained_twice": 0}


def test_a_sampled_triple_of_a_trained_network_gets_its_result_without_training(tmp_path: Path):
    says: list[str] = []
    searcher, ot_study = _searcher(tmp_path, "random", limit=3, space=TWO_NETWORKS, says=says)
    searcher.max_untrained_in_a_row = 30
    searcher.suggest("a")
    searcher.on_trial_complete("a", _result(2, 0.7))
    second = searcher.suggest("b")  # samples until a triple of the other network comes up
    assert second is not None and second != Searcher.FINISHED
    network_a = ledger.point_of(ot_study.get_trials()[searcher._ot_trials["a"].number])
    network_b = ledger.point_of(ot_study.get_trials()[searcher._ot_trials["b"].number])
    assert network_a != network_b
    # Both networks are trained or training: every further sample shares one of them.
    assert searcher.suggest("c") == Searcher.FINISHED
    assert says and "30 triples in a row that need no training" in says[0]
    searcher.on_trial_result("b", _result(1, 0.4))
    searcher.on_trial_complete("b", _result(2, 0.6))
    searcher.close()

    trials = ot_study.get_trials(deepcopy=False)
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    copies = [t for t in trials if ledger.is_shared(t)]
    assert len(copies) >= 30 and len(trials) == 2 + len(copies)
    values = {network_a: 0.7, network_b: 0.6}
    for copy in copies:
        source = trials[copy.user_attrs[record.SHARED_ATTR]]
        assert ledger.point_of(copy) == ledger.point_of(source) in values
        # Told to the sampler as a result of its own: the same value and learning curve.
        assert copy.state == TrialState.COMPLETE
        assert copy.value == pytest.approx(values[ledger.point_of(copy)])
        assert copy.intermediate_values == source.intermediate_values
    trained = {t.number: t for t in trials if not ledger.is_shared(t)}
    assert {t.user_attrs[record.SHARED_ATTR] for t in copies} == set(trained)
    # Those sampled while b trained waited for its result.
    b_trial = trained[searcher._ot_trials["b"].number]
    waited = [t for t in copies if t.user_attrs[record.SHARED_ATTR] == b_trial.number]
    b_complete = b_trial.datetime_complete
    assert b_complete is not None
    assert waited and all(
        t.datetime_complete is not None and t.datetime_complete >= b_complete for t in waited
    )


def test_trials_waiting_for_a_training_that_never_ends_fail_when_the_run_ends(tmp_path: Path):
    searcher, ot_study = _searcher(tmp_path, "random", limit=2, space=TWO_NETWORKS)
    searcher.max_untrained_in_a_row = 10
    searcher.suggest("a")  # trains one network, and never reports
    searcher.suggest("b")  # trains the other; samples in between wait for a
    searcher.on_trial_complete("b", _result(2, 0.6))
    searcher.close()
    trials = ot_study.get_trials(deepcopy=False)
    a_number = searcher._ot_trials["a"].number
    waiting_for_a = [t for t in trials if t.user_attrs.get(record.SHARED_ATTR) == a_number]
    assert waiting_for_a, "no sample shared the first network"
    for trial in waiting_for_a:
        assert trial.state == TrialState.FAIL
        reason = trial.user_attrs[record.FAIL_REASON_ATTR]
        assert reason == f"shares trial {a_number}, which had not ended when this run did"
    # Nothing this searcher claimed is left RUNNING: the trial Tune never ended is given back
    # (trained again by the next run), not left for the next run to judge dead.
    assert [t.number for t in trials if t.state == TrialState.RUNNING] == []
    a_trial = next(t for t in trials if t.number == a_number)
    assert a_trial.state == TrialState.FAIL and a_trial.user_attrs[record.GIVEN_BACK_ATTR]
    assert a_trial.user_attrs[record.FAIL_REASON_ATTR].startswith("the run ended before the trial")


def test_the_searcher_pickles_plain_values_only(tmp_path: Path) -> None:
    # Tune pickles its searcher next to the experiment: no storage (and so no password), no
    # study, no thread may go with it.
    searcher, _ = _searcher(tmp_path, "grid", limit=2)
    assert searcher.suggest("t1") is not None
    # An attribute a future change adds, not plain data: left out too.
    searcher.__dict__["_added_later"] = threading.Lock()
    state = pickle.loads(pickle.dumps(searcher))
    kept = state.__dict__
    left_out = {"_ot_study", "_ot_trials", "_heartbeat", "_recorder", "_define", "_added_later"}
    assert left_out.isdisjoint(kept)
    assert kept["_configs"]["t1"] == searcher.suggest("t1")
    assert kept["_metric"] == "accuracy" and kept["_served"] == 1
    searcher.close()
