"""The searcher: Ray Tune's OptunaSearch on the study's storage, claiming trials through the
ledger and recording what happened to each on its Optuna trial."""

from __future__ import annotations

import contextlib
import logging
import math
import pickle
from collections import deque
from concurrent.futures import Future
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from scaling_search import ledger
from scaling_search.driver._recorder import Recorder
from scaling_search.driver._trainable import METRIC
from scaling_search.ledger import FAIL_REASON_ATTR, Heartbeat

logger = logging.getLogger(__name__)
Prepared = tuple[optuna.Trial, dict[str, Any]] | None  # a claimed trial and its point, or none


class StudySearch(OptunaSearch):
    """OptunaSearch that claims trials through the ledger and keeps their heartbeats.

    It also records on each Optuna trial: epochs, timing, the Ray node it ran on, stops by the
    scheduler (PRUNED) and failures (FAIL with ``fail_reason``).

    Tune's event loop only hands results over: the storage work runs on a :class:`Recorder`
    thread, in order. The next trial is claimed and sampled ahead, so a freed worker gets it at
    once: right after a trial is handed out, or, with ``adaptive`` (a sampler that learns from
    results, one trial at a time), right after each trial's end is recorded, so that the sample
    sees it. Never more than the ``limit`` trials this Tuner will ask for are claimed.
    """

    def __init__(
        self,
        *args: Any,
        budget_epochs: int,
        queued_only: bool,
        heartbeat: Heartbeat,
        limit: int,
        adaptive: bool,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._budget_epochs = budget_epochs
        self._queued_only = queued_only
        self._heartbeat = heartbeat
        self._holder = ledger.driver_id()
        self._limit, self._adaptive = limit, adaptive
        self._served = 0
        self._ahead: deque[Future[Prepared]] = deque()  # claimed and sampled, oldest first
        self._recorder = Recorder()
        self._epochs: dict[str, int] = {}  # the last epoch recorded (handed to the recorder)
        self._attempts: dict[str, tuple[Any, Any]] = {}  # (started_at, node) last written
        self._errored: set[str] = set()

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        self._recorder.busy()
        self._recorder.check()  # a storage that stopped taking writes stops the launches
        if trial_id in self._ot_trials:
            return super().suggest(trial_id)
        if not self._ahead:
            self._prepare_next()
        prepared = self._recorder.result(self._ahead.popleft())
        if prepared is None:
            # The queue is empty (other drivers took the rest). Tune's sentinel is a string,
            # which Searcher.suggest's annotation leaves out.
            return Searcher.FINISHED  # type: ignore[return-value]
        self._ot_trials[trial_id], params = prepared
        self._served += 1
        if not self._adaptive:
            self._prepare_next()
        return params

    def _prepare_next(self, *, soon: bool = False) -> None:
        if self._served + len(self._ahead) < self._limit:
            self._ahead.append(self._recorder.submit(self._prepare, soon=soon))

    def _prepare(self) -> Prepared:
        """Claim the next trial and run the define-by-run function on it (recorder thread)."""
        assert self._ot_study is not None  # set up by OptunaSearch before any suggestion
        ot_trial = ledger.claim(self._ot_study, queued_only=self._queued_only, holder=self._holder)
        if ot_trial is None:
            return None
        self._heartbeat.hold(ot_trial._trial_id)
        return ot_trial, self._suggest_from_define_by_run_func(self._space, ot_trial)

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        self._recorder.busy()
        if FAIL_REASON_ATTR in result or trial_id in self._completed_trials:
            return  # a failure is handled when the trial completes, right after
        self._record(trial_id, result)

    def _record(self, trial_id: str, result: dict[str, Any]) -> None:
        """Queue the epoch's value and the trial's attributes (once per epoch)."""
        epoch = int(result["epoch"])
        if self._epochs.get(trial_id, 0) >= epoch:
            return
        self._epochs[trial_id] = epoch
        # Where and since when the trial runs changes only when Tune restarts it.
        attempt = (result["started_at"], result["node_id"])
        new_attempt = self._attempts.get(trial_id) != attempt
        self._attempts[trial_id] = attempt
        ot_trial = self._ot_trials[trial_id]
        self._recorder.submit(lambda: _write_epoch(ot_trial, result, new_attempt=new_attempt))

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        self._recorder.busy()
        if trial_id not in self._ot_trials or trial_id in self._completed_trials:
            super().on_trial_complete(trial_id, result, error)
            return
        if error:
            # Tune tells searchers before callbacks; the reason arrives through fail() next.
            self._errored.add(trial_id)
            return
        self._completed_trials.add(trial_id)
        if result and FAIL_REASON_ATTR in result:
            self._fail(trial_id, str(result[FAIL_REASON_ATTR]))
            return
        if result and "epoch" in result:
            # When a scheduler stops a trial, its last result arrives here only (Tune does not
            # pass it to on_trial_result), so record it now.
            self._record(trial_id, result)
        ot_trial, epochs = self._ot_trials[trial_id], self._epochs.get(trial_id, 0)
        # A result short of the budget was stopped early by the scheduler: a lower-fidelity
        # score that must never win.
        value = result.get(METRIC) if result and epochs >= self._budget_epochs else None
        self._recorder.submit(lambda: self._tell(ot_trial, value))
        if self._adaptive:
            self._prepare_next(soon=True)  # Tune asks for the next trial in a moment

    def _tell(self, ot_trial: optuna.Trial, value: float | None) -> None:
        assert self._ot_study is not None
        self._heartbeat.release(ot_trial._trial_id)
        state = TrialState.PRUNED if value is None else TrialState.COMPLETE
        try:
            self._ot_study.tell(ot_trial, value, state=state, skip_if_finished=True)
        except ValueError as exc:  # e.g. a NaN value; OptunaSearch logs these too
            logger.warning("trial %d: %s", ot_trial.number, exc)

    def fail(self, trial_id: str, reason: str) -> None:
        """Record why an errored trial failed (its retries used up) and end it as FAIL."""
        if trial_id in self._errored:
            self._errored.discard(trial_id)
            self._completed_trials.add(trial_id)
            self._fail(trial_id, reason)

    def _fail(self, trial_id: str, reason: str) -> None:
        ot_trial = self._ot_trials[trial_id]
        self._recorder.submit(lambda: self._end_as_failed(ot_trial, reason))

    def _end_as_failed(self, ot_trial: optuna.Trial, reason: str) -> None:
        assert self._ot_study is not None
        self._heartbeat.release(ot_trial._trial_id)
        ledger.fail_trial(self._ot_study._storage, ot_trial._trial_id, reason)

    # Tune pickles the searcher into tuner.pkl and its experiment snapshots, for Tuner.restore.
    # The Optuna study, not Tune, is what this project resumes from; and the storage inside
    # would write the database password to disk. So both copies hold no storage.
    _NOT_PICKLED = (
        "_storage",
        "_ot_study",
        "_ot_trials",
        "_heartbeat",
        "_sampler",
        "_recorder",
        "_ahead",
    )

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in self._NOT_PICKLED}

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as file:
            pickle.dump(self.__getstate__(), file)

    def close(self) -> None:
        """End trials that errored without a reason reaching :meth:`fail`, give back a trial
        prepared ahead that Tune never asked for, and wait until everything is recorded."""
        for trial_id in list(self._errored):
            self.fail(trial_id, "the trial raised an error (no message reached the driver)")
        ahead, self._ahead = list(self._ahead), deque()
        self._recorder.submit(lambda: self._give_back(ahead))
        self._recorder.close()

    def _give_back(self, ahead: list[Future[Prepared]]) -> None:
        """End the trials claimed ahead that no Ray trial took; planning queues their points
        again."""
        for prepared in (future.result() for future in ahead):
            if prepared is not None:
                self._end_as_failed(prepared[0], "prepared ahead, but the run ended first")


def _write_epoch(ot_trial: optuna.Trial, result: dict[str, Any], *, new_attempt: bool) -> None:
    """An epoch's value and attributes; those that hold for a whole attempt (where, since when,
    resumed from which epoch) on the attempt's first epoch only. Another driver may have ended
    the trial (it judged this one dead): then nothing is written."""
    with contextlib.suppress(UpdateFinishedTrialError):
        ot_trial.report(float(result[METRIC]), int(result["epoch"]))
        ot_trial.set_user_attr("epochs_completed", int(result["epoch"]))
        ot_trial.set_user_attr("train_reported_at", float(result["reported_at"]))
        ot_trial.set_user_attr("images_per_second", round(float(result["images_per_second"]), 1))
        if not new_attempt:
            return
        ot_trial.set_user_attr("train_started_at", float(result["started_at"]))
        ot_trial.set_user_attr("node_id", str(result["node_id"]))
        ot_trial.set_user_attr("node_ip", str(result["node_ip"]))
        ot_trial.set_user_attr("data_reused", bool(result["data_reused"]))
        if math.isfinite(result.get("first_step_at", math.nan)):
            ot_trial.set_user_attr("first_step_at", float(result["first_step_at"]))
        if int(result["resumed_from_epoch"]):
            ot_trial.set_user_attr("resumed_from_epoch", int(result["resumed_from_epoch"]))
