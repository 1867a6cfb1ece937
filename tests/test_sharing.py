"""Results given to the triples that build a network already trained (scaling_search.study.sharing),
on a real Optuna storage (SQLite and PostgreSQL); no Ray."""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from scaling_search.config import load_study
from scaling_search.study import ledger, record, sharing
from scaling_search.study.define import DefineByRun
from scaling_search.study.storage import open_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _trained(study, ot_study, state: TrialState) -> optuna.trial.FrozenTrial:
    """Claim the next queued trial and end it as the driver would, without sharing it."""
    trial = ledger.claim(ot_study, queued_only=True, holder="test:1:1")
    assert trial is not None
    DefineByRun(
        study.space,
        sampler="grid",
        seeds=ledger.seeds(study),
        base_resolution_px=study.train.base_resolution_px,
        num_classes=study.data.num_classes,
    )(trial)
    trial.report(0.3, 1)
    trial.set_user_attr("epochs_completed", 1 if state == TrialState.PRUNED else 2)
    if state == TrialState.COMPLETE:
        trial.report(0.6, 2)
        ot_study.tell(trial, 0.6)
    else:
        ot_study.tell(trial, state=state)
    return ot_study._storage.get_trial(trial._trial_id)


def _point(trial: optuna.trial.FrozenTrial) -> ledger.Point:
    """The (network key, seed) of a trial the ledger queued, which has one."""
    point = ledger.point_of(trial)
    assert point is not None, trial.number
    return point


def test_a_stopped_driver_s_results_are_shared_on_the_next_run_once(
    storage_url: str, tiny_study: Path
) -> None:
    study = load_study(tiny_study)
    storage = open_storage(storage_url)
    ot_study = ledger.open_study(study, storage, num_classes=4)
    ledger.plan_trials(study, ot_study)
    classes = ledger.grid_classes(study, num_classes=4)
    # Trained, then the driver stopped before sharing: one complete, one stopped early.
    done = [_trained(study, ot_study, state) for state in (TrialState.COMPLETE, TrialState.PRUNED)]
    expected = sum(len(classes[_point(t)[0]]) - 1 for t in done)
    kwargs = {"base_resolution_px": study.train.base_resolution_px, "num_classes": 4}
    assert sharing.share_missing(ot_study, classes, **kwargs) == expected
    assert sharing.share_missing(ot_study, classes, **kwargs) == 0  # once only
    copies = [t for t in ot_study.get_trials() if ledger.is_shared(t)]
    assert len(copies) == expected
    for copy in copies:
        source = next(t for t in done if t.number == copy.user_attrs[record.SHARED_ATTR])
        assert ledger.point_of(copy) == ledger.point_of(source)
        assert copy.state == source.state and copy.value == source.value
        assert copy.intermediate_values == source.intermediate_values
        assert copy.user_attrs["epochs_completed"] == source.user_attrs["epochs_completed"]
    # A copy holds its point: planning queues nothing for it, and nothing was trained twice.
    waiting_before = len(ot_study.get_trials(states=(TrialState.WAITING,)))
    ledger.plan_trials(study, ot_study)
    assert len(ot_study.get_trials(states=(TrialState.WAITING,))) == waiting_before
    assert ledger.duplicates(ot_study.get_trials()) == {"skipped_duplicates": 0, "trained_twice": 0}
    storage.engine.dispose()


def test_a_failed_training_is_shared_with_nobody(storage_url: str, tiny_study: Path) -> None:
    study = load_study(tiny_study)
    storage = open_storage(storage_url)
    ot_study = ledger.open_study(study, storage, num_classes=4)
    ledger.plan_trials(study, ot_study)
    trial = ledger.claim(ot_study, queued_only=True, holder="test:1:1")
    assert trial is not None and ledger.fail_trial(ot_study._storage, trial._trial_id, "diverged")
    classes = ledger.grid_classes(study, num_classes=4)
    kwargs = {"base_resolution_px": study.train.base_resolution_px, "num_classes": 4}
    assert sharing.share_missing(ot_study, classes, **kwargs) == 0
    source = ot_study._storage.get_trial(trial._trial_id)
    with warnings.catch_warnings():  # Optuna expects heartbeats with Study.optimize only
        warnings.simplefilter("ignore", UserWarning)
        asked = ot_study.ask()
    asked.set_user_attr(record.SHARED_ATTR, source.number)
    assert sharing.copy_result(ot_study, asked, source)  # ended: it fails too, saying why
    copy = ot_study._storage.get_trial(asked._trial_id)
    assert copy.state == TrialState.FAIL
    assert copy.user_attrs[record.FAIL_REASON_ATTR] == f"shared trial {source.number}, which failed"
    storage.engine.dispose()


@pytest.mark.parametrize("state", [TrialState.RUNNING, TrialState.WAITING])
def test_a_result_that_has_not_ended_is_not_copied(state: TrialState) -> None:
    study = optuna.create_study()
    source = optuna.trial.create_trial(state=state) if state == TrialState.WAITING else None
    if source is None:
        source = study._storage.get_trial(study.ask()._trial_id)
    asked = study.ask()
    assert not sharing.copy_result(study, asked, source)
    assert study._storage.get_trial(asked._trial_id).state == TrialState.RUNNING
