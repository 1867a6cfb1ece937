"""What the searcher writes on a trial for each epoch it reports (recorder thread)."""

from __future__ import annotations

import math
from typing import Any

import optuna

from scaling_search.driver._trainable import METRIC


def write_epoch(ot_trial: optuna.Trial, result: dict[str, Any], *, new_attempt: bool) -> None:
    """An epoch's value and attributes; those that hold for a whole attempt (where, since when,
    resumed from which epoch) on the attempt's first epoch only. Written again whole when tried
    again: each write sets a value. UpdateFinishedTrialError: the trial has ended."""
    ot_trial.report(float(result[METRIC]), int(result["epoch"]))
    ot_trial.set_user_attr("epochs_completed", int(result["epoch"]))
    ot_trial.set_user_attr("train_reported_at", float(result["reported_at"]))
    ot_trial.set_user_attr("images_per_second", round(float(result["images_per_second"]), 1))
    if math.isfinite(result.get("test_accuracy", math.nan)):
        ot_trial.set_user_attr("test_accuracy", float(result["test_accuracy"]))
    if not new_attempt:
        return
    ot_trial.set_user_attr("train_started_at", float(result["started_at"]))
    ot_trial.set_user_attr("node_id", str(result["node_id"]))
    ot_trial.set_user_attr("node_ip", str(result["node_ip"]))
    if "worker_pid" in result:
        ot_trial.set_user_attr("worker_pid", int(result["worker_pid"]))
    ot_trial.set_user_attr("data_reused", bool(result["data_reused"]))
    if math.isfinite(result.get("first_step_at", math.nan)):
        ot_trial.set_user_attr("first_step_at", float(result["first_step_at"]))
    if int(result["resumed_from_epoch"]):
        ot_trial.set_user_attr("resumed_from_epoch", int(result["resumed_from_epoch"]))
