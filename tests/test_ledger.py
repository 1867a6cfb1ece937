"""Tests for scaling_search.study.ledger: planning, claiming, duplicates, liveness and recovery.

Every test runs on a real Optuna storage, a SQLite file and a fresh PostgreSQL database (the
``storage_url`` fixture, see conftest.py); none starts Ray. Drivers are simulated by what they
write: a ``driver`` holder on the trial and heartbeats in Optuna's table.
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy
from optuna.trial import FrozenTrial, TrialState

from scaling_search.config import StudyConfig, load_study
from scaling_search.space import Coefficients, describe, grid_candidates
from scaling_search.study import ledger, liveness, racing, record
from scaling_search.study.define import DefineByRun
from scaling_search.study.ledger import (
    HEARTBEAT_GRACE_S,
    Heartbeat,
    claim,
    driver_id,
    duplicates,
    fail_trial,
    open_study,
    plan_trials,
    recover_stale,
    seeds,
)
from scaling_search.study.storage import open_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)

Point = tuple[str, int]  # (network key, seed)
OTHER_HOST = "elsewhere:123:456"  # a driver on another machine: only its heartbeat tells
SOME_DRIVER = "test-driver:1:1"
LONG_AGO = timedelta(seconds=HEARTBEAT_GRACE_S + 60)


@dataclass
class Ledger:
    """One driver's view: the study file, its storage, and the Optuna study on it."""

    study: StudyConfig
    storage: optuna.storages.RDBStorage
    ot_study: optuna.Study
    url: str


@pytest.fixture
def grid(storage_url: str, tiny_study: Path) -> Iterator[Ledger]:
    """The tiny grid study (6 candidates × 2 seeds) opened on an empty storage, nothing queued."""
    study = load_study(tiny_study, ["search.repeats=2"])
    storage = open_storage(storage_url)
    yield Ledger(study, storage, open_study(study, storage), storage_url)
    storage.engine.dispose()


def _triple(trial: FrozenTrial) -> tuple[float, float, float]:
    """(α, β, γ) of a trial: its params once suggested, else the queue's fixed params."""
    params = trial.params or trial.system_attrs["fixed_params"]
    return (round(params["alpha"], 6), round(params["beta"], 6), round(params["gamma"], 6))


def _point(trial: FrozenTrial) -> Point:
    """(network key, seed) of a trial: the key it was queued with, the seed of its params."""
    params = trial.params or trial.system_attrs["fixed_params"]
    return trial.user_attrs[record.NETWORK_ATTR], int(params["seed"])


def _key(study: StudyConfig, triple: tuple[float, float, float]) -> str:
    candidate = describe(
        Coefficients(*triple),
        base_resolution_px=study.train.base_resolution_px,
        num_classes=study.data.num_classes,
    )
    return candidate.network_key


def _grid_points(study: StudyConfig) -> list[Point]:
    """One point per distinct network of the grid and seed."""
    keys = {_key(study, c.as_tuple()) for c in grid_candidates(study.space)}
    return sorted((key, seed) for key in keys for seed in seeds(study))


def _trials(ot_study: optuna.Study, *states: TrialState) -> list[FrozenTrial]:
    return ot_study.get_trials(deepcopy=False, states=states or None)


def _claim(g: Ledger, holder: str = SOME_DRIVER) -> optuna.Trial:
    trial = claim(g.ot_study, queued_only=True, holder=holder)
    assert trial is not None
    return trial


def _frozen(g: Ledger, trial: optuna.Trial) -> FrozenTrial:
    return g.storage.get_trial(trial._trial_id)


def _finish(g: Ledger, trial: optuna.Trial, state: TrialState) -> None:
    """End a claimed trial as the driver does: suggest its queued params, then tell."""
    study = g.study
    DefineByRun(
        study.space,
        sampler="grid",
        seeds=seeds(study),
        base_resolution_px=study.train.base_resolution_px,
        num_classes=study.data.num_classes,
    )(trial)
    if state == TrialState.COMPLETE:
        g.ot_study.tell(trial, 0.5)
    else:
        g.ot_study.tell(trial, state=state)


def _set_start(g: Ledger, trial_id: int, start: datetime) -> None:
    """Backdate a trial's start in the database (nothing in Optuna's API can)."""
    trials = sqlalchemy.table(
        "trials",
        sqlalchemy.column("trial_id"),
        sqlalchemy.column("datetime_start", sqlalchemy.DateTime),
    )
    update = trials.update().where(trials.c.trial_id == trial_id).values(datetime_start=start)
    with g.storage.engine.begin() as connection:
        connection.execute(update)


def _dead_local_driver() -> str:
    """The holder a driver on this host would have written, for a process that has exited."""
    child = subprocess.Popen(["sleep", "30"])
    start = liveness._process_start(child.pid)
    child.kill()
    child.wait()
    return f"{socket.gethostname()}:{child.pid}:{start}"


def _fast_heartbeat_storage(url: str) -> optuna.storages.RDBStorage:
    """The same database with a 1 s grace, so that a heartbeat goes stale within a test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, heartbeat_interval=1, grace_period=1)


# --- plan_trials ---------------------------------------------------------------------------------


def test_plan_queues_one_trial_per_network_and_seed(grid: Ledger) -> None:
    expected = _grid_points(grid.study)
    assert len(expected) == 12  # 10 candidates build 6 networks; × repeats 2

    assert plan_trials(grid.study, grid.ot_study) == len(expected)
    trials = _trials(grid.ot_study)
    assert {t.state for t in trials} == {TrialState.WAITING}
    assert sorted(_point(t) for t in trials) == expected
    # Each network is queued as its class's representative: of the triples that build it, the
    # one whose α·β²·γ² is closest to c = 2.
    candidates = grid_candidates(grid.study.space)
    for trial in trials:
        triple = _triple(trial)
        assert _key(grid.study, triple) == _point(trial)[0]
        same = [c for c in candidates if _key(grid.study, c.as_tuple()) == _point(trial)[0]]
        closest = min(abs(c.flops_product - 2.0) for c in same)
        assert abs(Coefficients(*triple).flops_product - 2.0) == pytest.approx(closest)

    # Planning again (a restarted driver, a second driver) queues nothing more.
    assert plan_trials(grid.study, grid.ot_study) == len(expected)
    assert len(_trials(grid.ot_study)) == len(expected)


def test_the_grid_is_queued_in_an_order_seeded_by_the_search_seed(tiny_study: Path) -> None:
    """Sorted, accuracy often rises along the grid, and asynchronous successive halving would
    promote every trial; shuffled, each rung sees a fair sample first."""

    def queue_order(seed: int) -> list[Point]:
        study = load_study(tiny_study, ["search.repeats=2", f"search.seed={seed}"])
        ot_study = open_study(study, optuna.storages.InMemoryStorage())
        plan_trials(study, ot_study)
        return [_point(t) for t in _trials(ot_study)]

    first = queue_order(0)
    assert sorted(first) == _grid_points(load_study(tiny_study, ["search.repeats=2"]))
    assert first != sorted(first)
    assert queue_order(0) == first  # the same seed, the same order
    assert [p[0] for p in queue_order(1)] != [p[0] for p in first]  # another seed: another order


def test_a_searching_and_a_racing_driver_never_take_each_others_trials(
    grid: Ledger, tiny_study: Path
) -> None:
    # Both stages queued at once: racing planned after the search, then a failed search point
    # queued again by a later driver's planning (its worker was killed).
    study = load_study(tiny_study, ["search.repeats=2", "search.racing={top_k: 2, repeats: 2}"])
    plan_trials(study, grid.ot_study)
    trials = [_claim(grid) for _ in range(len(_trials(grid.ot_study, TrialState.WAITING)))]
    for trial in trials[:-2]:
        _finish(grid, trial, TrialState.COMPLETE)
    for trial in trials[-2:]:
        fail_trial(grid.storage, trial._trial_id, "the worker was killed")
    racing_queued = racing.plan_racing(study, grid.ot_study)
    search_queued = plan_trials(study, grid.ot_study)
    assert (racing_queued, search_queued) == (len(racing.racing_seeds(study)) * 2, 2)

    # A sampler's claim (TPE, random, QMC) starts a new trial: it takes nothing queued.
    sampled = claim(grid.ot_study, queued_only=False, holder=SOME_DRIVER, stage="search")
    assert sampled is not None and _frozen(grid, sampled).user_attrs == {}
    assert len(_trials(grid.ot_study, TrialState.WAITING)) == racing_queued + search_queued

    # Two drivers at once, each with its own storage (PostgreSQL: two connections' locks).
    stages = ("search", "racing")
    studies = [
        optuna.load_study(study_name=study.name, storage=open_storage(grid.url)) for _ in stages
    ]
    taken: dict[str, list[FrozenTrial]] = {stage: [] for stage in stages}
    start = threading.Barrier(len(stages))

    def drive(k: int) -> None:
        start.wait()
        holder = f"{stages[k]}-driver:1:1"
        while trial := claim(studies[k], queued_only=True, holder=holder, stage=stages[k]):
            taken[stages[k]].append(grid.storage.get_trial(trial._trial_id))

    threads = [threading.Thread(target=drive, args=(k,)) for k in range(len(stages))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [ledger.stage_of(t) for t in taken["search"]] == ["search"] * search_queued
    assert [ledger.stage_of(t) for t in taken["racing"]] == ["racing"] * racing_queued
    assert all("seed" in t.user_attrs for t in taken["racing"])  # a racing trial's own seed
    assert _trials(grid.ot_study, TrialState.WAITING) == []


def test_plan_skips_running_and_finished_points_but_queues_failed_ones(grid: Ledger) -> None:
    plan_trials(grid.study, grid.ot_study)
    running, complete, pruned, failed = (_claim(grid) for _ in range(4))
    _finish(grid, complete, TrialState.COMPLETE)
    _finish(grid, pruned, TrialState.PRUNED)
    assert fail_trial(grid.ot_study._storage, failed._trial_id, "diverged")

    assert plan_trials(grid.study, grid.ot_study) == 12 - 4 + 1
    (requeued,) = _trials(grid.ot_study)[12:]
    assert requeued.state == TrialState.WAITING
    assert _point(requeued) == _point(_frozen(grid, failed))
    # Every point is now held exactly once by a trial that is not FAIL.
    held = [_point(t) for t in _trials(grid.ot_study) if t.state != TrialState.FAIL]
    assert sorted(held) == _grid_points(grid.study)
    assert _frozen(grid, running).state == TrialState.RUNNING


def test_plan_for_a_sampler_counts_the_trials_left(storage_url: str, tiny_study: Path) -> None:
    study = load_study(tiny_study, ["search.sampler=tpe", "search.n_trials=5"])
    ot_study = open_study(study, open_storage(storage_url))
    assert plan_trials(study, ot_study) == 5
    with warnings.catch_warnings():  # Optuna expects heartbeats with Study.optimize only
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(2):
            ot_study.tell(ot_study.ask(), 0.5)
        ot_study.tell(ot_study.ask(), state=TrialState.FAIL)  # failed: its place is free again
    assert plan_trials(study, ot_study) == 3
    assert not _trials(ot_study, TrialState.WAITING)  # nothing queued


def test_a_sampler_plan_counts_the_trials_running_under_live_drivers(
    storage_url: str, tiny_study: Path
) -> None:
    # Two drivers search with one sampler: n_trials counts what both train, so that the second
    # to start does not plan the whole n_trials again.
    study = load_study(tiny_study, ["search.sampler=random", "search.n_trials=8"])
    storage = open_storage(storage_url)
    ot_study = open_study(study, storage)

    def sampled(holder: str) -> optuna.Trial:
        trial = claim(ot_study, queued_only=False, holder=holder)
        assert trial is not None
        return trial

    done = sampled(driver_id())
    ot_study.tell(done, 0.5)
    mine = [sampled(driver_id()) for _ in range(2)]  # this driver, alive
    other = sampled(OTHER_HOST)  # a driver on another host, heartbeat just recorded
    dead = sampled(_dead_local_driver())  # a driver on this host that has exited
    sharer = sampled(driver_id())  # shares mine[0]'s network: no training of its own
    sharer.set_user_attr(record.SHARED_ATTR, mine[0].number)
    raced = ledger.point_params(Coefficients(1.1, 1.0, 1.3), seed=7)
    ot_study.enqueue_trial(raced, user_attrs={record.STAGE_ATTR: record.RACING_STAGE})
    racer = claim(ot_study, queued_only=True, holder=OTHER_HOST, stage=record.RACING_STAGE)
    assert racer is not None  # running too, but for the racing stage

    assert recover_stale(ot_study, lambda _: None) == 1  # the dead driver's trial
    assert _frozen_state(storage, dead) == TrialState.FAIL
    # 8 - 1 trained - 3 training under live drivers (the dead one's, the sharer's and the
    # racing trial do not count).
    assert plan_trials(study, ot_study) == 4
    ot_study.tell(other, 0.6)  # trained now: counted all the same
    assert plan_trials(study, ot_study) == 4
    fail_trial(storage, mine[1]._trial_id, "diverged")  # failed: its place is free again
    assert plan_trials(study, ot_study) == 5
    storage.engine.dispose()


def _frozen_state(storage: optuna.storages.BaseStorage, trial: optuna.Trial) -> TrialState:
    return storage.get_trial(trial._trial_id).state


# --- claim ---------------------------------------------------------------------------------------


def test_claim_takes_each_queued_trial_once(grid: Ledger) -> None:
    queued = plan_trials(grid.study, grid.ot_study)
    claimed = []
    while (trial := claim(grid.ot_study, queued_only=True, holder=SOME_DRIVER)) is not None:
        claimed.append(trial._trial_id)
    assert len(claimed) == len(set(claimed)) == queued
    assert claim(grid.ot_study, queued_only=True, holder=SOME_DRIVER) is None
    for frozen in _trials(grid.ot_study):
        assert frozen.state == TrialState.RUNNING
        assert frozen.system_attrs[record.DRIVER_ATTR] == SOME_DRIVER


def test_concurrent_drivers_never_claim_the_same_trial(grid: Ledger) -> None:
    # PostgreSQL locks the row (FOR UPDATE); SQLite needs BEGIN IMMEDIATE (see storage.py):
    # without it, 3 threads claimed 12 queued trials 13-16 times in 5 of 5 runs.
    queued = plan_trials(grid.study, grid.ot_study)
    drivers = 3
    storages = [open_storage(grid.url) for _ in range(drivers)]
    studies = [optuna.load_study(study_name=grid.study.name, storage=s) for s in storages]
    claimed: list[list[int]] = [[] for _ in range(drivers)]
    errors: list[BaseException] = []
    start = threading.Barrier(drivers)

    def drive(k: int) -> None:
        try:
            start.wait()
            while (trial := claim(studies[k], queued_only=True, holder=f"d{k}")) is not None:
                claimed[k].append(trial._trial_id)
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=drive, args=(k,)) for k in range(drivers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert not errors
    everything = [trial_id for ids in claimed for trial_id in ids]
    assert [i for i, times in Counter(everything).items() if times > 1] == []  # none twice
    assert sorted(everything) == sorted(t._trial_id for t in _trials(grid.ot_study))
    assert len(everything) == queued
    holders = {t._trial_id: t.system_attrs[record.DRIVER_ATTR] for t in _trials(grid.ot_study)}
    for k, ids in enumerate(claimed):
        assert all(holders[trial_id] == f"d{k}" for trial_id in ids)
    for storage in storages:
        storage.engine.dispose()


# --- duplicates ----------------------------------------------------------------------------------


def test_a_point_queued_twice_is_trained_once(grid: Ledger) -> None:
    # Two drivers planning at the same moment: each queues the same point.
    params = {"alpha": 1.15, "beta": 1.15, "gamma": 1.15, "seed": 0}
    attrs = {record.NETWORK_ATTR: _key(grid.study, (1.15, 1.15, 1.15))}
    grid.ot_study.enqueue_trial(params, user_attrs=attrs)
    grid.ot_study.enqueue_trial(params, user_attrs=attrs)

    first = _claim(grid)
    assert first.number == 0
    assert claim(grid.ot_study, queued_only=True, holder=SOME_DRIVER) is None
    skipped = _trials(grid.ot_study)[1]
    assert skipped.state == TrialState.FAIL
    assert skipped.user_attrs[record.DUPLICATE_ATTR] == 0
    assert "duplicate" in skipped.user_attrs[record.FAIL_REASON_ATTR]
    assert duplicates(_trials(grid.ot_study)) == {"skipped_duplicates": 1, "trained_twice": 0}
    # The skipped copy does not count as the point's holder, and the first does.
    assert plan_trials(grid.study, grid.ot_study) == 12 - 1


def test_duplicates_counts_points_trained_twice(grid: Ledger) -> None:
    distributions = {
        "alpha": optuna.distributions.FloatDistribution(1.0, 2.0),
        "beta": optuna.distributions.FloatDistribution(1.0, 2.0),
        "gamma": optuna.distributions.FloatDistribution(1.0, 2.0),
        "seed": optuna.distributions.CategoricalDistribution([0, 1]),
    }
    twice = {"alpha": 1.15, "beta": 1.15, "gamma": 1.15, "seed": 0}
    once = {**twice, "seed": 1}

    def add(params: dict[str, Any], state: TrialState) -> None:
        value = 0.5 if state == TrialState.COMPLETE else None
        grid.ot_study.add_trial(
            optuna.trial.create_trial(
                params=params, distributions=distributions, value=value, state=state
            )
        )

    add(twice, TrialState.COMPLETE)
    add(twice, TrialState.FAIL)  # a failure is not a training
    add(once, TrialState.COMPLETE)
    assert duplicates(_trials(grid.ot_study)) == {"skipped_duplicates": 0, "trained_twice": 0}
    add(twice, TrialState.COMPLETE)
    assert duplicates(_trials(grid.ot_study)) == {"skipped_duplicates": 0, "trained_twice": 1}


# --- recover_stale -------------------------------------------------------------------------------


def test_a_dead_driver_on_this_host_has_its_trial_failed_and_requeued(grid: Ledger) -> None:
    plan_trials(grid.study, grid.ot_study)
    holder = _dead_local_driver()
    orphan = _claim(grid, holder)
    messages: list[str] = []

    assert recover_stale(grid.ot_study, messages.append) == 1
    failed = _frozen(grid, orphan)
    assert failed.state == TrialState.FAIL
    assert failed.user_attrs[record.FAIL_REASON_ATTR] == f"driver {holder} stopped mid-trial"
    assert len(messages) == 1 and "1 trial" in messages[0]
    assert plan_trials(grid.study, grid.ot_study) == 12  # its point is queued again
    assert _point(_trials(grid.ot_study)[-1]) == _point(failed)

    # A pid now used by another process (here: ours) with another start time: dead too.
    host, pid, _ = driver_id().split(":")
    reused = _claim(grid, f"{host}:{pid}:1")
    assert recover_stale(grid.ot_study, lambda _: None) == 1
    assert _frozen(grid, reused).state == TrialState.FAIL


def test_live_drivers_keep_their_trials(grid: Ledger) -> None:
    plan_trials(grid.study, grid.ot_study)
    mine = _claim(grid, driver_id())
    grid.storage.record_heartbeat(mine._trial_id)
    never_beat = _claim(grid, driver_id())  # claimed a moment ago, no heartbeat yet
    remote = _claim(grid, OTHER_HOST)
    fast = _fast_heartbeat_storage(grid.url)
    fast.record_heartbeat(remote._trial_id)
    messages: list[str] = []

    for ot_study in (grid.ot_study, optuna.load_study(study_name=grid.study.name, storage=fast)):
        assert recover_stale(ot_study, messages.append) == 0
    assert messages == []
    for trial in (mine, never_beat, remote):
        assert _frozen(grid, trial).state == TrialState.RUNNING
    fast.engine.dispose()


# Regression: Optuna wraps an RDBStorage in a cache (_CachedStorage); a check for RDBStorage on
# the study's storage never found a heartbeat stale.
def test_another_hosts_trial_with_a_stale_heartbeat_is_failed(grid: Ledger) -> None:
    plan_trials(grid.study, grid.ot_study)
    stale, fresh = _claim(grid, OTHER_HOST), _claim(grid, OTHER_HOST)
    fast = _fast_heartbeat_storage(grid.url)
    ot_study = optuna.load_study(study_name=grid.study.name, storage=fast)
    fast.record_heartbeat(stale._trial_id)
    # Beat `fresh` until Optuna's own check (grace 1 s, database clock) calls `stale` stale.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        fast.record_heartbeat(fresh._trial_id)
        if fast._get_stale_trial_ids(ot_study._study_id):
            break
        time.sleep(0.1)
    assert fast._get_stale_trial_ids(ot_study._study_id) == [stale._trial_id]
    # With the real grace (60 s) both are alive.
    assert recover_stale(grid.ot_study, lambda _: None) == 0
    try:
        assert recover_stale(ot_study, lambda _: None) == 1
        failed = _frozen(grid, stale)
        assert failed.state == TrialState.FAIL
        assert "no heartbeat" in failed.user_attrs[record.FAIL_REASON_ATTR]
        assert _frozen(grid, fresh).state == TrialState.RUNNING
        assert plan_trials(grid.study, grid.ot_study) == 12 - 2 + 1
    finally:
        fast.engine.dispose()


def test_a_trial_without_holder_fails_once_it_started_long_ago(grid: Ledger) -> None:
    # A driver that stopped between taking the trial and naming itself on it.
    plan_trials(grid.study, grid.ot_study)
    old, recent = _trials(grid.ot_study)[:2]
    for trial in (old, recent):
        assert grid.storage.set_trial_state_values(trial._trial_id, TrialState.RUNNING)
    _set_start(grid, old._trial_id, datetime.now() - LONG_AGO)

    assert recover_stale(grid.ot_study, lambda _: None) == 1
    failed = grid.storage.get_trial(old._trial_id)
    assert failed.state == TrialState.FAIL
    assert "before it sent a heartbeat" in failed.user_attrs[record.FAIL_REASON_ATTR]
    assert grid.storage.get_trial(recent._trial_id).state == TrialState.RUNNING
    assert plan_trials(grid.study, grid.ot_study) == 12 - 2 + 1


def test_a_claimed_trial_has_a_heartbeat_before_it_names_its_holder(grid: Ledger) -> None:
    # So a named trial held on another host is always judged by its heartbeat: there is no
    # moment in which it names a holder but could never go stale.
    plan_trials(grid.study, grid.ot_study)
    remote = _claim(grid, OTHER_HOST)
    query = sqlalchemy.text("SELECT COUNT(*) FROM trial_heartbeats WHERE trial_id = :id")
    with grid.storage.engine.connect() as connection:
        assert connection.execute(query, {"id": remote._trial_id}).scalar_one() == 1


# --- Heartbeat -----------------------------------------------------------------------------------


def _heartbeat_at(g: Ledger, trial_id: int) -> datetime:
    query = sqlalchemy.text("SELECT heartbeat FROM trial_heartbeats WHERE trial_id = :id")
    with g.storage.engine.connect() as connection:
        return connection.execute(query, {"id": trial_id}).scalar_one()


def test_heartbeat_refreshes_held_trials_until_released(
    grid: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan_trials(grid.study, grid.ot_study)
    trial_id = _claim(grid)._trial_id
    beats: Counter[int] = Counter()
    record = grid.storage.record_heartbeat

    def counted(beating: int) -> None:
        beats[beating] += 1
        record(beating)

    monkeypatch.setattr(grid.storage, "record_heartbeat", counted)
    with Heartbeat(grid.storage, 0.2) as heartbeat:
        heartbeat.hold(trial_id)
        first = _heartbeat_at(grid, trial_id)
        # SQLite's CURRENT_TIMESTAMP counts whole seconds: wait for the next one, at most 3 s.
        deadline = time.monotonic() + 3
        while _heartbeat_at(grid, trial_id) == first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _heartbeat_at(grid, trial_id) > first
        assert beats[trial_id] >= 2

        heartbeat.release(trial_id)
        time.sleep(0.25)  # a beat already under way may still land
        after_release = beats[trial_id]
        time.sleep(0.45)
        assert beats[trial_id] == after_release
    assert not heartbeat._thread.is_alive()


def test_heartbeat_pickles_into_an_inert_copy(grid: Ledger) -> None:
    plan_trials(grid.study, grid.ot_study)
    trial_id = _claim(grid)._trial_id
    with Heartbeat(grid.storage, 0.2) as heartbeat:
        heartbeat.hold(trial_id)
        copy = pickle.loads(pickle.dumps(heartbeat))
    assert isinstance(copy, Heartbeat)
    assert copy._held == set()
    assert not copy._thread.is_alive()
    assert copy._interval == 0.2
    assert copy._storage is None  # the storage's URL would carry the database password


# --- fail_trial ----------------------------------------------------------------------------------


def test_fail_trial_on_a_finished_trial_changes_nothing(grid: Ledger) -> None:
    plan_trials(grid.study, grid.ot_study)
    complete, pruned, failed = (_claim(grid) for _ in range(3))
    _finish(grid, complete, TrialState.COMPLETE)
    _finish(grid, pruned, TrialState.PRUNED)
    assert fail_trial(grid.ot_study._storage, failed._trial_id, "x" * 2000)
    assert _frozen(grid, failed).state == TrialState.FAIL
    assert _frozen(grid, failed).user_attrs[record.FAIL_REASON_ATTR] == "x" * 500  # kept short

    for trial in (complete, pruned, failed):
        before = _frozen(grid, trial)
        for storage in (grid.ot_study._storage, grid.storage):
            assert fail_trial(storage, trial._trial_id, "too late") is False
        after = _frozen(grid, trial)
        assert (after.state, after.values, after.user_attrs, after.datetime_complete) == (
            before.state,
            before.values,
            before.user_attrs,
            before.datetime_complete,
        )


def test_driver_id_names_this_process() -> None:
    host, pid, start = driver_id().split(":")
    assert (host, int(pid)) == (socket.gethostname(), os.getpid())
    assert start == liveness._process_start(os.getpid())


def test_a_study_recorded_before_validation_splits_is_refused_for_continuing(
    storage_url: str, tiny_study: Path
) -> None:
    study = load_study(tiny_study)
    storage = open_storage(storage_url)
    ot_study = open_study(study, storage, num_classes=4)
    assert ot_study.user_attrs["chosen_on"] == "validation"
    assert ot_study.user_attrs["num_classes"] == 4
    open_study(study, storage)  # continues
    # What an older driver left: the same settings, but chosen on the test split.
    storage.set_study_user_attr(ot_study._study_id, "chosen_on", None)
    with pytest.raises(ledger.LedgerError, match=r"chosen on the test split.*new name"):
        open_study(study, storage)
    storage.engine.dispose()


def test_trials_of_an_ended_ray_job_on_another_host_are_failed_at_once(grid: Ledger) -> None:
    # Drivers on other hosts of one Ray cluster (each `docker compose run` has its own host):
    # the cluster's answer about their jobs decides, not the heartbeat grace.
    plan_trials(grid.study, grid.ot_study)
    ended_job, live_job = "01000000@10.0.0.2:6379", "02000000@10.0.0.2:6379"
    dead = ledger.claim(grid.ot_study, queued_only=True, holder=OTHER_HOST, ray_job=ended_job)
    live = ledger.claim(grid.ot_study, queued_only=True, holder=OTHER_HOST, ray_job=live_job)
    unnamed = _claim(grid, OTHER_HOST)  # a driver that named no job: the heartbeat decides
    mine = ledger.claim(grid.ot_study, queued_only=True, holder=driver_id(), ray_job=ended_job)
    assert dead and live and mine
    asked: list[set[str]] = []

    def ended(jobs: set[str]) -> set[str]:
        asked.append(jobs)
        return jobs & {ended_job}

    assert ledger.held_by_ray_jobs(grid.ot_study)
    messages: list[str] = []
    assert ledger.recover_ended_jobs(grid.ot_study, messages.append, ended) == 1
    assert asked == [{ended_job, live_job}]  # this host's drivers are judged by their process
    failed = _frozen(grid, dead)
    assert failed.state == TrialState.FAIL
    reason = failed.user_attrs[record.FAIL_REASON_ATTR]
    assert reason == f"driver {OTHER_HOST} stopped mid-trial (its Ray job {ended_job} has ended)"
    for trial in (live, unnamed, mine):
        assert _frozen(grid, trial).state == TrialState.RUNNING
    assert messages == ["marked 1 trial(s) of a driver whose Ray job has ended as FAIL"]


def test_a_study_whose_recorded_settings_are_unreadable_is_refused_not_overwritten(
    storage_url: str, tiny_study: Path
) -> None:
    study = load_study(tiny_study)
    storage = open_storage(storage_url)
    ot_study = open_study(study, storage, num_classes=4)
    storage.set_study_user_attr(ot_study._study_id, record.CONFIG_ATTR, "not settings")
    with pytest.raises(ledger.LedgerError, match=r"recorded with other settings"):
        open_study(study, storage)
    assert (
        optuna.load_study(study_name=study.name, storage=storage).user_attrs[record.CONFIG_ATTR]
        == "not settings"
    )
    storage.engine.dispose()
