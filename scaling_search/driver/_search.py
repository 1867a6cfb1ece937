"""The searcher: Ray Tune's OptunaSearch on the study's storage, claiming trials through the
ledger and recording what happened to each on its Optuna trial."""

from __future__ import annotations

import contextlib
import logging
import math
import pickle
from collections import defaultdict, deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from scaling_search import ledger, sharing
from scaling_search.driver._recorder import Recorder
from scaling_search.driver._trainable import METRIC
from scaling_search.ledger import FAIL_REASON_ATTR, SHARED_ATTR, Heartbeat
from scaling_search.space import Coefficients, SpaceError

logger = logging.getLogger(__name__)
Prepared = tuple[optuna.Trial, dict[str, Any]] | None  # a claimed trial and its point, or none
# Sampled triples in a row that need no training (their network was trained with this seed, or
# no γ makes them cost c) before the search stops: the sampler has nothing new left to propose.
MAX_UNTRAINED_IN_A_ROW = 200


@dataclass(frozen=True)
class Classes:
    """The grid's triples by network key, to share each trained result with its class."""

    members: Mapping[str, Sequence[Coefficients]]
    base_resolution_px: int
    num_classes: int


class StudySearch(OptunaSearch):
    """OptunaSearch that claims trials through the ledger and keeps their heartbeats.

    It also records on each Optuna trial: epochs, timing, the Ray node it ran on, stops by the
    scheduler (PRUNED) and failures (FAIL with ``fail_reason``).

    Tune's event loop only hands results over: the storage work runs on a :class:`Recorder`
    thread, in order. The next trial is claimed and sampled ahead, so a freed worker gets it at
    once: right after a trial is handed out, or, with ``adaptive`` (a sampler that learns from
    results, one trial at a time), right after each trial's end is recorded, so that the sample
    sees it. Never more than the ``limit`` trials this Tuner will ask for are claimed.

    One network, one training (:mod:`scaling_search.sharing`): a sampled triple whose network
    and seed are trained already gets that result, told to the sampler, instead of a training
    (one whose network is in flight gets it when that trial ends), and the sampler is asked
    again; with ``classes`` (the grid), each trained result is shared with the other triples of
    its class.
    """

    def __init__(
        self,
        *args: Any,
        budget_epochs: int,
        queued_only: bool,
        stage: str,
        heartbeat: Heartbeat,
        limit: int,
        adaptive: bool,
        classes: Classes | None = None,
        say: Callable[[str], None] = print,
        stopping: Callable[[], bool] = lambda: False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._stopping = stopping  # a signal asked the run to stop: launch nothing more
        self._classes, self._say = classes, say
        self.max_untrained_in_a_row = MAX_UNTRAINED_IN_A_ROW
        # Sampled trials that share a trial still running, by that trial's number.
        self._sharers: defaultdict[int, list[optuna.Trial]] = defaultdict(list)
        self._budget_epochs = budget_epochs
        self._queued_only, self._stage = queued_only, stage
        self._heartbeat = heartbeat
        self._holder = ledger.driver_id()
        self._limit, self._adaptive = limit, adaptive
        self._served = 0
        self._ahead: deque[Future[Prepared]] = deque()  # claimed and sampled, oldest first
        self._recorder = Recorder()
        self._epochs: dict[str, int] = {}  # the last epoch recorded (handed to the recorder)
        self._attempts: dict[str, tuple[Any, Any]] = {}  # (started_at, node) last written
        self._errored: set[str] = set()
        self._best_line: str | None = None  # the progress line's winner, as last ranked

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        self._recorder.busy()
        self._recorder.check()  # a storage that stopped taking writes stops the launches
        if trial_id in self._ot_trials:
            return super().suggest(trial_id)
        if self._stopping():
            return Searcher.FINISHED  # type: ignore[return-value]
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
        """Claim the next trial to train and run the define-by-run function on it (recorder
        thread); sampled triples that need no training are ended here and the sampler is asked
        again."""
        assert self._ot_study is not None  # set up by OptunaSearch before any suggestion
        self._settle_sharers(others_only=True)
        for _ in range(self.max_untrained_in_a_row):
            ot_trial = ledger.claim(
                self._ot_study,
                queued_only=self._queued_only,
                holder=self._holder,
                stage=self._stage,
            )
            if ot_trial is None:
                return None
            self._heartbeat.hold(ot_trial._trial_id)
            try:
                params = self._suggest_from_define_by_run_func(self._space, ot_trial)
            except Exception as exc:  # ended here, not left RUNNING
                self._end_as_failed(ot_trial, str(exc))
                # space.cost measured: no network near these coordinates costs c; sample again.
                if isinstance(exc, SpaceError) and not self._queued_only:
                    continue
                raise
            if self._queued_only or not self._shares(ot_trial):
                return ot_trial, params
        self._say(
            f"the sampler proposed {self.max_untrained_in_a_row} triples in a row that need no "
            "training (their networks were trained with this seed, or cost too much): the "
            "search stops here"
        )
        return None

    def _shares(self, ot_trial: optuna.Trial) -> bool:
        """Whether a sampled trial's network and seed are trained (or training) already; if so
        it gets that result, now or when the training ends, instead of a training."""
        assert self._ot_study is not None
        point = ledger.point_of(self._ot_study._storage.get_trial(ot_trial._trial_id))
        source = None if point is None else ledger.holder_of(self._ot_study, point)
        if source is None or source.number == ot_trial.number:
            return False
        # Marked at once, so that no later sample takes it for the network's training.
        ot_trial.set_user_attr(SHARED_ATTR, source.number)
        if sharing.copy_result(self._ot_study, ot_trial, source):
            self._heartbeat.release(ot_trial._trial_id)
        else:
            self._sharers[source.number].append(ot_trial)
        return True

    def _settle_sharers(self, *, others_only: bool) -> None:
        """Give the trials waiting for another trial's result that result, where it has ended
        (``others_only``: those waiting for another driver's trials; this driver's own end
        through :meth:`_share_result`)."""
        assert self._ot_study is not None
        if not self._sharers:
            return
        mine = {trial.number for trial in self._ot_trials.values()}
        trials = self._ot_study.get_trials(deepcopy=False)
        for number in list(self._sharers):
            if not (others_only and number in mine):
                self._give_result(trials[number], self._sharers.pop(number), ended_run=False)

    def _give_result(
        self, source: FrozenTrial, sharers: list[optuna.Trial], *, ended_run: bool
    ) -> None:
        """End ``sharers`` with ``source``'s result; one whose source has not ended goes back to
        waiting, or, once nothing more will end it (``ended_run``), fails saying so."""
        assert self._ot_study is not None
        for sharer in sharers:
            if sharing.copy_result(self._ot_study, sharer, source):
                self._heartbeat.release(sharer._trial_id)
            elif ended_run:
                self._end_as_failed(
                    sharer,
                    f"shares trial {source.number}, which had not ended when this run did",
                    given_back=True,
                )
            else:
                self._sharers[source.number].append(sharer)

    def _share_result(self, ot_trial: optuna.Trial) -> None:
        """Give a trial's ended result to those that share its network (recorder thread)."""
        assert self._ot_study is not None
        waiting = self._sharers.pop(ot_trial.number, [])
        if not waiting and self._classes is None:
            return
        source = self._ot_study._storage.get_trial(ot_trial._trial_id)
        # Told or failed just now: if it is still RUNNING (its tell refused), nothing will end
        # it, and those waiting for it fail too.
        self._give_result(source, waiting, ended_run=True)
        point = ledger.point_of(source)
        if self._classes is not None and point is not None and point[0] in self._classes.members:
            sharing.share_with_class(
                self._ot_study,
                source,
                self._classes.members[point[0]],
                base_resolution_px=self._classes.base_resolution_px,
                num_classes=self._classes.num_classes,
            )

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
        self._share_result(ot_trial)

    def fail(self, trial_id: str, reason: str) -> None:
        """Record why an errored trial failed (its retries used up) and end it as FAIL."""
        if trial_id in self._errored:
            self._errored.discard(trial_id)
            self._completed_trials.add(trial_id)
            self._fail(trial_id, reason)

    def _fail(self, trial_id: str, reason: str, *, given_back: bool = False) -> None:
        ot_trial = self._ot_trials[trial_id]
        self._recorder.submit(lambda: self._end_as_failed(ot_trial, reason, given_back=given_back))

    def _end_as_failed(
        self, ot_trial: optuna.Trial, reason: str, *, given_back: bool = False
    ) -> None:
        assert self._ot_study is not None
        self._heartbeat.release(ot_trial._trial_id)
        ledger.fail_trial(
            self._ot_study._storage, ot_trial._trial_id, reason, given_back=given_back
        )
        self._share_result(ot_trial)  # those waiting for it fail too

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
        "_sharers",
        "_say",
        "_stopping",
    )

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in self._NOT_PICKLED}

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as file:
            pickle.dump(self.__getstate__(), file)

    def close(self, *, unfinished: str = "the run ended before the trial did") -> None:
        """End trials that errored without a reason reaching :meth:`fail`, and those Tune
        stopped without telling the searcher (a stop of the whole run: FAIL with
        ``unfinished``, so the next run trains them again); give back a trial prepared ahead
        that Tune never asked for; wait until everything is recorded."""
        for trial_id in list(self._errored):
            self.fail(trial_id, "the trial raised an error (no message reached the driver)")
        # Those waiting for a trial that has not ended are given back first, saying so.
        ahead, self._ahead = list(self._ahead), deque()
        self._recorder.submit(lambda: self._give_back(ahead))
        for trial_id in list(self._ot_trials):
            if trial_id not in self._completed_trials:
                self._completed_trials.add(trial_id)
                epochs = self._epochs.get(trial_id, 0)
                reason = f"{unfinished} (after {epochs} epoch(s))"
                self._fail(trial_id, reason, given_back=True)
        self._recorder.close()

    @property
    def served(self) -> int:
        """Trials handed to Tune to train."""
        return self._served

    def unfinished(self) -> int:
        """Trials handed to Tune that have not ended (as far as this searcher was told)."""
        return sum(1 for trial_id in self._ot_trials if trial_id not in self._completed_trials)

    def after_recorded(self, call: Callable[[], None]) -> None:
        """Run ``call`` on the recorder thread once everything handed over so far is recorded."""
        self._recorder.submit(call)

    def best_so_far(self, *, refresh: bool) -> str:
        """' | best so far <winner>' by :func:`scaling_search.results.best_triple`, or '' before
        any trial completed its budget (recorder thread). ``refresh``: rank again (a result that
        can change the winner arrived); else the last answer, without reading the study."""
        from scaling_search.results import ResultsError, best_triple
        from scaling_search.verdict import format_accuracy

        assert self._ot_study is not None
        if not refresh and self._best_line is not None:
            return self._best_line
        try:
            best = best_triple(self._ot_study, statistics=False)
        except ResultsError:
            self._best_line = ""
            return ""
        except Exception as exc:  # a progress line must never stop the search
            logger.warning("best so far not computed: %s", exc)
            return ""
        accuracy = format_accuracy(best.mean_accuracy, best.std_accuracy, best.n_seeds)
        self._best_line = f" | best so far {best.coefficients.label()} {accuracy}"
        return self._best_line

    def _give_back(self, ahead: list[Future[Prepared]]) -> None:
        """End the trials claimed ahead that no Ray trial took (planning queues their points
        again), and those still waiting for a result another driver's trial will give."""
        for prepared in (future.result() for future in ahead):
            if prepared is not None:
                self._end_as_failed(
                    prepared[0], "prepared ahead, but the run ended first", given_back=True
                )
        assert self._ot_study is not None
        trials = self._ot_study.get_trials(deepcopy=False)
        for number in list(self._sharers):
            self._give_result(trials[number], self._sharers.pop(number), ended_run=True)


def _write_epoch(ot_trial: optuna.Trial, result: dict[str, Any], *, new_attempt: bool) -> None:
    """An epoch's value and attributes; those that hold for a whole attempt (where, since when,
    resumed from which epoch) on the attempt's first epoch only. Another driver may have ended
    the trial (it judged this one dead): then nothing is written."""
    with contextlib.suppress(UpdateFinishedTrialError):
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
