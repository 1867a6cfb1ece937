"""One network, one training: the triples that build a network already trained share its result.

At φ = 1 many triples build the same network (depth is ceil(α·repeats), channels are multiples of 8,
the input is whole pixels), and with the same seed they would train to the same numbers. The ledger
trains each (network, seed) once (:func:`scaling_search.study.ledger.plan_trials`); this module
gives that result to the other triples, as Optuna trials marked ``shared_from`` (the number of the
trial that trained), so that the dashboard, the report and the samplers see every candidate
with its result and nothing is dropped:

- grid: once a trial ends (complete or stopped early), each other member of its class gets a
  trial with the same state, value, epochs and learning curve (:func:`share_with_class`);
- TPE, random, QMC: a sampled triple whose network and seed are trained already is told that
  result instead of training (:func:`copy_result`); the searcher keeps one whose network is in
  flight until it ends.

Results and statistics count the trial that trained, never its copies
(:func:`scaling_search.study.ledger.is_shared`). Two grid drivers can, in a rare race, both add a
copy for one member (checking and adding are not one transaction): the statistics are unaffected,
since copies never count and a class's members form a set, but the dashboard lists both.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import optuna
from optuna.trial import FrozenTrial, TrialState, create_trial

from scaling_search import _compat
from scaling_search.space import Coefficients, describe
from scaling_search.study import ledger
from scaling_search.study.ledger import DONE
from scaling_search.study.record import (
    RACING_STAGE,
    SHARED_ATTR,
    TrialRecord,
    point_attrs,
    point_of,
    result_attrs,
)

__all__ = ["copy_result", "share_missing", "share_with_class"]


def share_with_class(
    ot_study: optuna.Study,
    source: FrozenTrial,
    members: Iterable[Coefficients],
    *,
    base_resolution_px: int,
    num_classes: int,
) -> int:
    """Give ``source``'s result to each member of its class that has no trial for its point yet;
    the number of trials added. Only a trial that trained and ended (complete or stopped early)
    is shared."""
    record = TrialRecord.of(source)
    point = record.point
    if source.state not in DONE or record.shared or point is None:
        return 0
    trials = ot_study.get_trials(deepcopy=False)
    have = {TrialRecord.of(t).coefficients for t in trials if point_of(t) == point}
    added = 0
    for member in members:
        if member.rounded() in have:
            continue
        cost = describe(member, base_resolution_px=base_resolution_px, num_classes=num_classes)
        attrs = {
            **point_attrs(cost, network_key=point[0], seed=point[1]),
            **result_attrs(source),
            SHARED_ATTR: source.number,
        }
        params = {**source.params, **_params(member, source.params)}
        ot_study.add_trial(
            create_trial(
                state=source.state,
                value=source.value,  # stopped early: its last value, as Optuna's tell gives
                params=params,
                distributions=source.distributions,
                user_attrs=attrs,
                intermediate_values=dict(source.intermediate_values),
            )
        )
        added += 1
    return added


def _params(member: Coefficients, like: Mapping[str, object]) -> dict[str, float]:
    """The member's triple as parameters, where the source's parameters are the triple."""
    values = {"alpha": member.alpha, "beta": member.beta, "gamma": member.gamma}
    return {name: value for name, value in values.items() if name in like}


def share_missing(
    ot_study: optuna.Study,
    classes: Mapping[str, Iterable[Coefficients]],
    *,
    base_resolution_px: int,
    num_classes: int,
) -> int:
    """Share every ended trial of the search with the members of its class that lack their copy
    (a driver that stopped between a trial's end and its sharing); the number added."""
    added = 0
    for trial in ot_study.get_trials(deepcopy=False, states=DONE):
        record = TrialRecord.of(trial)
        point = record.point
        if point is None or record.shared or point[0] not in classes:
            continue
        if record.stage == RACING_STAGE:
            continue
        added += share_with_class(
            ot_study,
            trial,
            classes[point[0]],
            base_resolution_px=base_resolution_px,
            num_classes=num_classes,
        )
    return added


def copy_result(ot_study: optuna.Study, trial: optuna.Trial, source: FrozenTrial) -> bool:
    """End ``trial`` (asked, not trained, and already marked ``shared_from`` the source) with
    ``source``'s result: the same learning curve, epochs and value. False when the source has
    not ended yet; a source that failed fails the trial too (its point is then free to be
    trained)."""
    if source.state == TrialState.RUNNING or source.state == TrialState.WAITING:
        return False
    if source.state == TrialState.FAIL:
        ledger.fail_trial(
            _compat.storage_of(ot_study),
            _compat.trial_id(trial),
            f"shared trial {source.number}, which failed",
        )
        return True
    for step, value in sorted(source.intermediate_values.items()):
        trial.report(value, step)
    for name, value in result_attrs(source).items():
        trial.set_user_attr(name, value)
    if source.state == TrialState.COMPLETE:
        ot_study.tell(trial, source.value, skip_if_finished=True)
    else:
        ot_study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
    return True
