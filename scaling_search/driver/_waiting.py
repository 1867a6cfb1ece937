"""Sampled trials that share a network another trial trains: they wait for its result.

One network, one training (:mod:`scaling_search.study.sharing`): a sampled triple whose network and
seed are trained already gets that result at once instead of a training; one whose network is in
flight waits here, by the training trial's number, until that trial ends. The grid's classes get
each trained result too.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial

from scaling_search import _compat
from scaling_search.space import Coefficients
from scaling_search.study import ledger, sharing
from scaling_search.study.ledger import Heartbeat
from scaling_search.study.record import SHARED_ATTR
from scaling_search.study.storage import describe_error, unreachable

EndAsFailed = Callable[..., None]  # (trial, reason, *, given_back=False)


@dataclass(frozen=True)
class Classes:
    """The grid's triples by network key, to share each trained result with its class."""

    members: Mapping[str, Sequence[Coefficients]]
    base_resolution_px: int
    num_classes: int


class Waiting:
    """The trials waiting for another trial's result (recorder thread only).

    ``end_as_failed`` ends a trial as FAIL with a reason (the searcher's, which in turn fails
    those waiting for that trial).
    """

    def __init__(
        self, heartbeat: Heartbeat, classes: Classes | None, end_as_failed: EndAsFailed
    ) -> None:
        self._heartbeat, self._classes, self._end_as_failed = heartbeat, classes, end_as_failed
        self._by_source: defaultdict[int, list[optuna.Trial]] = defaultdict(list)

    def share(self, ot_study: optuna.Study, ot_trial: optuna.Trial) -> bool:
        """Whether a sampled trial's network and seed are trained (or training) already; if so
        it gets that result, now or when the training ends, instead of a training."""
        point = ledger.point_of(_compat.storage_of(ot_study).get_trial(_compat.trial_id(ot_trial)))
        source = None if point is None else ledger.holder_of(ot_study, point)
        if source is None or source.number == ot_trial.number:
            return False
        # Marked at once, so that no later sample takes it for the network's training.
        ot_trial.set_user_attr(SHARED_ATTR, source.number)
        if sharing.copy_result(ot_study, ot_trial, source):
            self._heartbeat.release(_compat.trial_id(ot_trial))
        else:
            self._by_source[source.number].append(ot_trial)
        return True

    def settle(self, ot_study: optuna.Study, *, except_sources: set[int]) -> None:
        """Give the waiting trials their result where its source has ended (those waiting for
        ``except_sources``, this driver's own trials, get it through :meth:`source_ended`)."""
        if not self._by_source:
            return
        trials = ot_study.get_trials(deepcopy=False)
        for number in list(self._by_source):
            if number not in except_sources:
                self._give(ot_study, trials[number], ended_run=False)

    def source_ended(self, ot_study: optuna.Study, ot_trial: optuna.Trial) -> None:
        """Give a trial's ended result to those that share its network."""
        if not self._by_source.get(ot_trial.number) and self._classes is None:
            return
        source = _compat.storage_of(ot_study).get_trial(_compat.trial_id(ot_trial))
        # Told or failed just now: if it is still RUNNING (its tell refused), nothing will end
        # it, and those waiting for it fail too.
        self._give(ot_study, source, ended_run=True)
        point = ledger.point_of(source)
        if self._classes is not None and point is not None and point[0] in self._classes.members:
            sharing.share_with_class(
                ot_study,
                source,
                self._classes.members[point[0]],
                base_resolution_px=self._classes.base_resolution_px,
                num_classes=self._classes.num_classes,
            )

    def end_all(self, ot_study: optuna.Study, failures: list[str]) -> None:
        """The run ends: every waiting trial gets its result, or fails; an error on one (other
        than the database's absence) is noted in ``failures`` and the others go on."""
        trials = ot_study.get_trials(deepcopy=False)
        for number in list(self._by_source):
            self._give(ot_study, trials[number], ended_run=True, failures=failures)

    def _give(
        self,
        ot_study: optuna.Study,
        source: FrozenTrial,
        *,
        ended_run: bool,
        failures: list[str] | None = None,
    ) -> None:
        """End the trials waiting for ``source`` with its result; one whose source has not ended
        goes on waiting, or, once nothing more will end it (``ended_run``), fails saying so.
        Each leaves the list once ended, so that a retry (the database away) ends only the
        rest."""
        waiting = self._by_source.get(source.number, [])
        for sharer in list(waiting):
            try:
                if sharing.copy_result(ot_study, sharer, source):
                    self._heartbeat.release(_compat.trial_id(sharer))
                elif ended_run:
                    reason = f"shares trial {source.number}, which had not ended when this run did"
                    self._end_as_failed(sharer, reason, given_back=True)
                else:
                    continue
            except Exception as exc:
                if failures is None or unreachable(exc):
                    raise
                failures.append(f"trial {sharer.number}: {describe_error(exc)}")
            waiting.remove(sharer)
        if not waiting:
            self._by_source.pop(source.number, None)
