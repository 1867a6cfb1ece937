"""What the searcher writes on a trial for each epoch it reports, and noticing that another
driver ended the trial meanwhile (recorder thread)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from scaling_search import _compat
from scaling_search.driver._trainable import METRIC
from scaling_search.study import record
from scaling_search.study.ledger import Heartbeat


class Writes:
    """A trial's epochs, written on it; and the trials of this driver that another driver
    failed (judging this one dead: its heartbeats had stopped, e.g. while the database was
    away), each said once, then written no more and stopped by Tune (:meth:`taken_over`)."""

    def __init__(self, heartbeat: Heartbeat, say: Callable[[str], None]) -> None:
        self._heartbeat, self._say = heartbeat, say
        self._taken_over: set[str] = set()  # Tune trial ids

    def epoch(
        self, trial_id: str, ot_trial: optuna.Trial, result: dict[str, Any], *, new_attempt: bool
    ) -> None:
        if trial_id in self._taken_over:
            return
        try:
            write_epoch(ot_trial, result, new_attempt=new_attempt)
        except UpdateFinishedTrialError:
            if not self.ended_elsewhere(trial_id, ot_trial):
                raise

    def ended_elsewhere(self, trial_id: str, ot_trial: optuna.Trial) -> bool:
        """Whether another driver failed this driver's trial; said the first time."""
        if trial_id in self._taken_over:
            return True
        ended = record.TrialRecord.of(
            _compat.storage_of(ot_trial.study).get_trial(_compat.trial_id(ot_trial))
        )
        if ended.state != TrialState.FAIL:
            return False
        reason = "no reason recorded" if ended.fail_reason is None else ended.fail_reason
        self._taken_over.add(trial_id)
        self._heartbeat.release(_compat.trial_id(ot_trial))
        self._say(
            f"trial {ot_trial.number} was marked FAIL by another driver "
            f"({reason}): its results "
            "here are not recorded, and it is stopped"
        )
        return True

    def taken_over(self, trial_id: str) -> bool:
        return trial_id in self._taken_over


def write_epoch(ot_trial: optuna.Trial, result: dict[str, Any], *, new_attempt: bool) -> None:
    """An epoch's value and attributes; those that hold for a whole attempt (where, since when,
    resumed from which epoch) on the attempt's first epoch only. Written again whole when tried
    again: each write sets a value. UpdateFinishedTrialError: the trial has ended."""
    ot_trial.report(float(result[METRIC]), int(result["epoch"]))
    ot_trial.set_user_attr(record.EPOCHS_ATTR, int(result["epoch"]))
    ot_trial.set_user_attr(record.REPORTED_AT_ATTR, float(result["reported_at"]))
    ot_trial.set_user_attr(
        record.IMAGES_PER_SECOND_ATTR, round(float(result["images_per_second"]), 1)
    )
    if math.isfinite(result.get("test_accuracy", math.nan)):
        ot_trial.set_user_attr(record.TEST_ACCURACY_ATTR, float(result["test_accuracy"]))
    if not new_attempt:
        return
    ot_trial.set_user_attr(record.STARTED_AT_ATTR, float(result["started_at"]))
    ot_trial.set_user_attr(record.NODE_ID_ATTR, str(result["node_id"]))
    ot_trial.set_user_attr(record.NODE_IP_ATTR, str(result["node_ip"]))
    if "worker_pid" in result:
        ot_trial.set_user_attr(record.WORKER_PID_ATTR, int(result["worker_pid"]))
    ot_trial.set_user_attr(record.DATA_REUSED_ATTR, bool(result["data_reused"]))
    if math.isfinite(result.get("first_step_at", math.nan)):
        ot_trial.set_user_attr(record.FIRST_STEP_AT_ATTR, float(result["first_step_at"]))
    if int(result["resumed_from_epoch"]):
        ot_trial.set_user_attr(record.RESUMED_FROM_ATTR, int(result["resumed_from_epoch"]))
