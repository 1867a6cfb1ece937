"""The searcher: Ray Tune's public ``Searcher`` interface over Optuna's public study API (claims
through the ledger, the define-by-run function on each claimed trial, ``tell``), recording what
happened to each trial on its Optuna trial."""

from __future__ import annotations

import logging
import pickle
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState
from ray.tune.search import Searcher

from scaling_search import _compat
from scaling_search.driver._epochs import Writes
from scaling_search.driver._ray_compat import this_job
from scaling_search.driver._recorder import Recorder
from scaling_search.driver._trainable import METRIC
from scaling_search.driver._waiting import Classes, Waiting
from scaling_search.space import SpaceError
from scaling_search.study import ledger
from scaling_search.study.ledger import Heartbeat
from scaling_search.study.outage import DatabaseWatch
from scaling_search.study.record import FAIL_REASON_ATTR
from scaling_search.study.storage import describe_error, unreachable

logger = logging.getLogger(__name__)
Prepared = tuple[optuna.Trial, dict[str, Any]] | None  # a claimed trial and its point, or none
# Sampled triples in a row that need no training (their network was trained with this seed, or
# no γ makes them cost c) before the search stops: the sampler has nothing new left to propose.
MAX_UNTRAINED_IN_A_ROW = 200


class StudySearch(Searcher):
    """A Tune searcher on the Optuna study ``ot_study``: it claims trials through the ledger,
    keeps their heartbeats, samples each claimed trial's point with ``define`` (the
    define-by-run function: it suggests on the Optuna trial and returns Tune's config), and
    tells the study how each trial ended.

    It also records on each Optuna trial: epochs, timing, the Ray node it ran on, stops by the
    scheduler (PRUNED) and failures (FAIL with ``fail_reason``).

    Tune's event loop only hands results over: the storage work runs on a :class:`Recorder`
    thread, in order. The next trial is claimed and sampled ahead, so a freed worker gets it at
    once: right after a trial is handed out, or, with ``adaptive`` (a sampler that learns from
    results, one trial at a time), right after each trial's end is recorded, so that the sample
    sees it. Never more than the ``limit`` trials this Tuner will ask for are claimed.

    One network, one training (:mod:`scaling_search.study.sharing`): a sampled triple whose network
    and seed are trained already gets that result, told to the sampler, instead of a training
    (one whose network is in flight gets it when that trial ends), and the sampler is asked
    again; with ``classes`` (the grid), each trained result is shared with the other triples of
    its class.

    The study's database away (``watch``, :mod:`scaling_search.study.outage`): nothing more is
    launched until it answers, and every write is retried; a trial that another driver failed
    meanwhile (it judged this one dead) is said so and stopped (:meth:`taken_over`). With
    ``n_trials`` (a sampler's search), a claim is made only while the search's trials, trained
    or training under any driver, number fewer.
    """

    def __init__(
        self,
        define: Callable[[optuna.Trial], dict[str, Any]],
        *,
        ot_study: optuna.Study,
        metric: str,
        mode: str,
        budget_epochs: int,
        queued_only: bool,
        stage: str,
        heartbeat: Heartbeat,
        limit: int,
        adaptive: bool,
        classes: Classes | None = None,
        say: Callable[[str], None] = print,
        stopping: Callable[[], bool] = lambda: False,
        watch: DatabaseWatch | None = None,
        n_trials: int | None = None,
    ) -> None:
        super().__init__(metric=metric, mode=mode)
        self._define = define
        self._ot_study = ot_study
        self._waiting = Waiting(heartbeat, classes, self._end_as_failed)
        self._stopping = stopping  # a signal asked the run to stop: launch nothing more
        self._watch = watch or DatabaseWatch(say=say)
        self._n_trials = n_trials
        self._say = say
        self.max_untrained_in_a_row = MAX_UNTRAINED_IN_A_ROW
        self._budget_epochs = budget_epochs
        self._queued_only, self._stage = queued_only, stage
        self._heartbeat = heartbeat
        self._holder = ledger.driver_id()
        self._ray_job = this_job()  # named with each claim (ledger.recover_ended_jobs)
        self._limit, self._adaptive = limit, adaptive
        self._writes = Writes(heartbeat, say)
        self._recorder = Recorder(watch=self._watch)
        self._best_line: str | None = None  # the progress line's winner, as last ranked
        self._track()

    def _track(self) -> None:
        """What the searcher keeps of the trials it claims and hands to Tune."""
        self._ot_trials: dict[str, optuna.Trial] = {}  # Tune's trial id -> its Optuna trial
        self._configs: dict[str, dict[str, Any]] = {}  # Tune's trial id -> the config handed out
        self._completed_trials: set[str] = set()  # ended, as far as this searcher was told
        self._served = 0
        self._ahead: deque[Future[Prepared]] = deque()  # claimed and sampled, oldest first
        # Claimed while the database went away, before they were sampled: given back later.
        self._stranded: list[optuna.Trial] = []
        self._epochs: dict[str, int] = {}  # the last epoch recorded (handed to the recorder)
        self._attempts: dict[str, tuple[Any, Any]] = {}  # (started_at, node) last written
        self._errored: set[str] = set()

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        self._recorder.busy()
        if self._ending():
            return Searcher.FINISHED  # type: ignore[return-value]
        self._recorder.check()  # a storage that stopped taking writes stops the launches
        if trial_id in self._ot_trials:  # asked again for a trial it has handed out
            return self._configs[trial_id]
        if self._stopping():
            return Searcher.FINISHED  # type: ignore[return-value]
        if self._watch.away:
            return None  # launch nothing until the database answers; Tune asks again
        if not self._ahead:
            self._prepare_next()
        try:
            prepared = self._recorder.result(self._ahead.popleft())
        except Exception:
            if self._ending():  # the claim waited out the patience
                return Searcher.FINISHED  # type: ignore[return-value]
            raise
        if prepared is None:
            # The queue is empty (other drivers took the rest). Tune's sentinel is a string,
            # which Searcher.suggest's annotation leaves out.
            return Searcher.FINISHED  # type: ignore[return-value]
        self._ot_trials[trial_id], params = prepared
        self._configs[trial_id] = params
        self._served += 1
        if not self._adaptive:
            self._prepare_next()
        return params

    def _ending(self) -> bool:
        """The study's database stayed away past the patience: the run ends."""
        return self._watch.gave_up

    def _search_is_full(self) -> bool:
        """A sampler's search whose ``n_trials`` are all trained or training (other drivers'
        trials included)."""
        if self._n_trials is None:
            return False
        return ledger.search_trials_left(self._ot_study, self._n_trials) <= 0

    def _prepare_next(self, *, soon: bool = False) -> None:
        if self._served + len(self._ahead) < self._limit:
            self._ahead.append(self._recorder.submit(self._prepare, soon=soon))

    def _prepare(self) -> Prepared:
        """Claim the next trial to train and run the define-by-run function on it (recorder
        thread); sampled triples that need no training are ended here and the sampler is asked
        again."""
        self._give_back_stranded()
        mine = {trial.number for trial in list(self._ot_trials.values())}
        self._waiting.settle(self._ot_study, except_sources=mine)
        for _ in range(self.max_untrained_in_a_row):
            if self._search_is_full():
                return None
            ot_trial = self._claim()
            if ot_trial is None:
                return None
            try:
                self._heartbeat.hold(_compat.trial_id(ot_trial))
                params = self._sample(ot_trial)
                if self._queued_only or not self._waiting.share(self._ot_study, ot_trial):
                    return ot_trial, params
            except Exception as exc:  # ended here, not left RUNNING
                if unreachable(exc):  # the recorder tries again; this claim is given back
                    self._stranded.append(ot_trial)
                    raise
                self._end_as_failed(ot_trial, str(exc))
                # space.cost measured: no network near these coordinates costs c; sample again.
                if isinstance(exc, SpaceError) and not self._queued_only:
                    continue
                raise
        self._say(
            f"the sampler proposed {self.max_untrained_in_a_row} triples in a row that need no "
            "training (their networks were trained with this seed, or cost too much): the "
            "search stops here"
        )
        return None

    def _sample(self, ot_trial: optuna.Trial) -> dict[str, Any]:
        """The config Tune trains: what ``define`` returns, with every parameter it suggested
        on the trial (as Ray's OptunaSearch hands them out)."""
        config = self._define(ot_trial)
        return {**ot_trial.params, **config}

    def _claim(self) -> optuna.Trial | None:
        """:func:`ledger.claim`; a trial taken as the database went away, before its holder
        was named, is given back once the database answers."""
        taken: list[int] = []
        try:
            return ledger.claim(
                self._ot_study,
                queued_only=self._queued_only,
                holder=self._holder,
                stage=self._stage,
                taken=taken.append,
                ray_job=self._ray_job,
            )
        except Exception as exc:
            if taken and unreachable(exc):
                self._stranded.append(optuna.Trial(self._ot_study, taken[-1]))
            raise

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
        self._recorder.submit(
            lambda: self._writes.epoch(trial_id, ot_trial, result, new_attempt=new_attempt),
            trial=ot_trial.number,
        )

    def taken_over(self, trial_id: str) -> bool:
        """Whether Tune should stop this trial: another driver failed it (:class:`Writes`)."""
        return self._writes.taken_over(trial_id)

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        self._recorder.busy()
        if trial_id not in self._ot_trials or trial_id in self._completed_trials:
            logger.warning("trial %s ended again, or was never handed out: ignored", trial_id)
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
        self._recorder.submit(lambda: self._tell(trial_id, ot_trial, value), trial=ot_trial.number)
        if self._adaptive:
            self._prepare_next(soon=True)  # Tune asks for the next trial in a moment

    def _tell(self, trial_id: str, ot_trial: optuna.Trial, value: float | None) -> None:
        # The heartbeat goes on until the end is written: it may wait out an outage.
        if self._writes.ended_elsewhere(trial_id, ot_trial):
            self._waiting.source_ended(self._ot_study, ot_trial)  # those waiting fail with it
            return
        state = TrialState.PRUNED if value is None else TrialState.COMPLETE
        try:
            self._ot_study.tell(ot_trial, value, state=state, skip_if_finished=True)
        except ValueError as exc:  # e.g. a NaN value: logged, the trial ends as Optuna says
            logger.warning("trial %d: %s", ot_trial.number, exc)
        except UpdateFinishedTrialError:  # failed elsewhere since it was read just now
            if not self._writes.ended_elsewhere(trial_id, ot_trial):
                raise
        self._heartbeat.release(_compat.trial_id(ot_trial))
        self._waiting.source_ended(self._ot_study, ot_trial)

    def fail(self, trial_id: str, reason: str) -> None:
        """Record why an errored trial failed (its retries used up) and end it as FAIL."""
        if trial_id in self._errored:
            self._errored.discard(trial_id)
            self._completed_trials.add(trial_id)
            self._fail(trial_id, reason)

    def _fail(self, trial_id: str, reason: str, *, given_back: bool = False) -> None:
        ot_trial = self._ot_trials[trial_id]
        self._recorder.submit(
            lambda: self._end_as_failed(ot_trial, reason, given_back=given_back),
            trial=None if given_back else ot_trial.number,
        )

    def _end_as_failed(
        self, ot_trial: optuna.Trial, reason: str, *, given_back: bool = False
    ) -> None:
        ledger.fail_trial(
            _compat.storage_of(self._ot_study),
            _compat.trial_id(ot_trial),
            reason,
            given_back=given_back,
        )
        self._heartbeat.release(_compat.trial_id(ot_trial))
        self._waiting.source_ended(self._ot_study, ot_trial)  # those waiting for it fail too

    # Tune pickles the searcher into tuner.pkl and its experiment snapshots, for Tuner.restore.
    # The Optuna study, not Tune, is what this project resumes from; and a storage inside would
    # write the database password to disk. So both copies hold plain values only: the study,
    # the storage, threads and callbacks (and anything added later that is not plain data)
    # stay out.
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if _plain(v)}

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

    def lost(self) -> list[int]:
        """The trials whose results could not be recorded (the database stayed away)."""
        return self._recorder.lost()

    def unfinished(self) -> int:
        """Trials handed to Tune that have not ended (as far as this searcher was told)."""
        return sum(1 for trial_id in self._ot_trials if trial_id not in self._completed_trials)

    def after_recorded(self, call: Callable[[], None]) -> None:
        """Run ``call`` on the recorder thread once everything handed over so far is recorded."""
        self._recorder.submit(call)

    def best_so_far(self, *, refresh: bool) -> str:
        """' | best so far <winner>' by :func:`scaling_search.results.ranking.best_triple`, or
        '' before any trial completed its budget (recorder thread). ``refresh``: rank again (a
        result that can change the winner arrived); else the last answer, without reading the
        study."""
        from scaling_search.results.ranking import ResultsError, best_triple
        from scaling_search.results.verdict import format_accuracy

        if not refresh and self._best_line is not None:
            return self._best_line
        try:
            best = best_triple(self._ot_study, statistics=False)
        except ResultsError:
            self._best_line = ""
            return ""
        except Exception as exc:  # a progress line must never stop the search
            if not unreachable(exc):  # the database away is said once, by the watch
                logger.warning("best so far not computed: %s", describe_error(exc))
            return self._best_line or ""
        accuracy = format_accuracy(best.mean_accuracy, best.std_accuracy, best.n_seeds)
        self._best_line = f" | best so far {best.coefficients.label()} {accuracy}"
        return self._best_line

    def _give_back(self, ahead: list[Future[Prepared]]) -> None:
        """End the trials claimed ahead that no Ray trial took (planning queues their points
        again), and those still waiting for a result another driver's trial will give. An error
        on one (other than the database's absence, which the recorder waits out) does not stop
        the others; those left are said, and the next run recovers them."""
        failures: list[str] = []
        # A claim whose preparing failed was ended there, or is stranded (given back below).
        claimed = [f.result() for f in ahead if f.exception() is None]
        for ot_trial in [p[0] for p in claimed if p is not None] + self._stranded:
            try:
                reason = "prepared ahead, but the run ended first"
                self._end_as_failed(ot_trial, reason, given_back=True)
            except Exception as exc:
                if unreachable(exc):
                    raise
                failures.append(f"trial {ot_trial.number}: {describe_error(exc)}")
        self._stranded.clear()
        self._waiting.end_all(self._ot_study, failures)
        if failures:
            self._say(
                f"{len(failures)} trial(s) claimed by this run could not be given back "
                f"({'; '.join(failures)}); the next run recovers them"
            )

    def _give_back_stranded(self) -> None:
        """Give back the trials claimed while the database went away (recorder thread)."""
        while self._stranded:
            reason = "claimed as the study's database stopped answering; given back"
            self._end_as_failed(self._stranded[0], reason, given_back=True)
            self._stranded.pop(0)


def _plain(value: Any) -> bool:
    """Whether ``value`` is plain data: numbers, strings, None, and containers of them."""
    if value is None or isinstance(value, bool | int | float | str):
        return True
    if isinstance(value, list | tuple | set | frozenset):
        return all(_plain(item) for item in value)
    if isinstance(value, dict):
        return all(_plain(key) and _plain(item) for key, item in value.items())
    return False
