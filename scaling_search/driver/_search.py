"""The searcher: Ray Tune's OptunaSearch on the study's storage, claiming trials through the
ledger and recording what happened to each on its Optuna trial."""

from __future__ import annotations

import contextlib
import math
import pickle
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from scaling_search import ledger
from scaling_search.driver._trainable import METRIC
from scaling_search.ledger import FAIL_REASON_ATTR, Heartbeat


class StudySearch(OptunaSearch):
    """OptunaSearch that claims trials through the ledger and keeps their heartbeats.

    It also records on each Optuna trial: epochs, timing, the Ray node it ran on, stops by the
    scheduler (PRUNED) and failures (FAIL with ``fail_reason``).
    """

    def __init__(
        self, *args: Any, budget_epochs: int, queued_only: bool, heartbeat: Heartbeat, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._budget_epochs = budget_epochs
        self._queued_only = queued_only
        self._heartbeat = heartbeat
        self._holder = ledger.driver_id()
        self._epochs: dict[str, int] = {}
        self._errored: set[str] = set()

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if trial_id not in self._ot_trials:
            assert self._ot_study is not None  # set up by OptunaSearch before any suggestion
            ot_trial = ledger.claim(
                self._ot_study, queued_only=self._queued_only, holder=self._holder
            )
            if ot_trial is None:
                # The queue is empty (other drivers took the rest); Tune's sentinel is a string.
                return Searcher.FINISHED
            self._heartbeat.hold(ot_trial._trial_id)
            self._ot_trials[trial_id] = ot_trial
        return super().suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if FAIL_REASON_ATTR in result:
            return  # handled when the trial completes, right after
        with contextlib.suppress(UpdateFinishedTrialError):  # see _record
            super().on_trial_result(trial_id, result)
        self._record(trial_id, result)

    def _record(self, trial_id: str, result: dict[str, Any]) -> None:
        self._epochs[trial_id] = int(result["epoch"])
        # Another driver may have ended the trial (it judged this one dead): keep going.
        with contextlib.suppress(UpdateFinishedTrialError):
            self._record_attrs(self._ot_trials[trial_id], result)

    @staticmethod
    def _record_attrs(ot_trial: optuna.Trial, result: dict[str, Any]) -> None:
        ot_trial.set_user_attr("epochs_completed", int(result["epoch"]))
        ot_trial.set_user_attr("train_started_at", float(result["started_at"]))
        ot_trial.set_user_attr("train_reported_at", float(result["reported_at"]))
        ot_trial.set_user_attr("images_per_second", round(float(result["images_per_second"]), 1))
        ot_trial.set_user_attr("node_id", str(result["node_id"]))
        ot_trial.set_user_attr("node_ip", str(result["node_ip"]))
        ot_trial.set_user_attr("data_reused", bool(result["data_reused"]))
        if math.isfinite(result.get("first_step_at", math.nan)):
            ot_trial.set_user_attr("first_step_at", float(result["first_step_at"]))
        if int(result["resumed_from_epoch"]):
            ot_trial.set_user_attr("resumed_from_epoch", int(result["resumed_from_epoch"]))

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        if trial_id not in self._ot_trials or trial_id in self._completed_trials:
            super().on_trial_complete(trial_id, result, error)
            return
        if error:
            # Tune tells searchers before callbacks; the reason arrives through fail() next.
            self._errored.add(trial_id)
            return
        self._heartbeat.release(self._ot_trials[trial_id]._trial_id)
        if result and FAIL_REASON_ATTR in result:
            self._fail(trial_id, str(result[FAIL_REASON_ATTR]))
            return
        if result and "epoch" in result:
            # When a scheduler stops a trial, its last result arrives here only (Tune does not
            # pass it to on_trial_result), so record it now.
            if int(result["epoch"]) > self._epochs.get(trial_id, 0):
                with contextlib.suppress(UpdateFinishedTrialError):  # see _record
                    self._ot_trials[trial_id].report(float(result[METRIC]), int(result["epoch"]))
            self._record(trial_id, result)
        ot_study = self._ot_study
        if result and self._epochs.get(trial_id, 0) < self._budget_epochs and ot_study is not None:
            # Stopped early by the scheduler: a lower-fidelity score that must never win.
            ot_study.tell(self._ot_trials[trial_id], state=TrialState.PRUNED, skip_if_finished=True)
            self._completed_trials.add(trial_id)
            return
        super().on_trial_complete(trial_id, result, error)

    def fail(self, trial_id: str, reason: str) -> None:
        """Record why an errored trial failed (its retries used up) and end it as FAIL."""
        if trial_id in self._errored:
            self._errored.discard(trial_id)
            self._heartbeat.release(self._ot_trials[trial_id]._trial_id)
            self._fail(trial_id, reason)

    def _fail(self, trial_id: str, reason: str) -> None:
        assert self._ot_study is not None
        ledger.fail_trial(self._ot_study._storage, self._ot_trials[trial_id]._trial_id, reason)
        self._completed_trials.add(trial_id)

    # Tune pickles the searcher into tuner.pkl and its experiment snapshots, for Tuner.restore.
    # The Optuna study, not Tune, is what this project resumes from; and the storage inside
    # would write the database password to disk. So both copies hold no storage.
    _NOT_PICKLED = ("_storage", "_ot_study", "_ot_trials", "_heartbeat", "_sampler")

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in self._NOT_PICKLED}

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as file:
            pickle.dump(self.__getstate__(), file)

    def close(self) -> None:
        """End trials that errored without a reason reaching :meth:`fail`."""
        for trial_id in list(self._errored):
            self.fail(trial_id, "the trial raised an error (no message reached the driver)")
