"""Racing with repeats: the search's best few networks, trained again with new seeds.

A search (grid or sampler, often with ASHA stopping most trials early) ranks its candidates on one
noisy run each. The racing stage takes its ``top_k`` networks (each as the triple that stands for
the triples that build it) and trains each at the full budget
with ``repeats`` seeds that the search did not use (``search.seed + search.repeats + k``), so the
winner is the best *mean* over seeds, with a spread and a set of candidates tied with it
(:mod:`scaling_search.results.ranking`). A full-budget run from the search counts as one more seed.

Racing trials are queued (``Study.enqueue_trial``) with their triple as parameters and the user
attributes ``stage: racing`` and ``seed``; a rerun queues again only what no trial holds, as the
grid does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import optuna
from optuna.trial import FrozenTrial, TrialState

from scaling_search.config import StudyConfig
from scaling_search.space import Coefficients, representative
from scaling_search.study import ledger
from scaling_search.study.record import (
    NETWORK_ATTR,
    RACING_STAGE,
    SEED_ATTR,
    STAGE_ATTR,
    TrialRecord,
    stage_of,
)

__all__ = ["plan_racing", "racing_seeds", "search_ranking", "search_trials"]

_HELD = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)


def racing_seeds(study: StudyConfig) -> list[int]:
    """The seeds of the racing stage: new to the search (which used the first ``repeats``)."""
    racing = study.search.racing
    if racing is None:
        return []
    first = study.search.seed + study.search.repeats
    return [first + k for k in range(racing.repeats)]


def search_trials(trials: Iterable[FrozenTrial]) -> list[FrozenTrial]:
    """The trials of the search stage (not racing)."""
    return [t for t in trials if stage_of(t) != RACING_STAGE]


def search_ranking(
    trials: Iterable[FrozenTrial], top_k: int, *, product: float = 2.0
) -> list[tuple[str, Coefficients]]:
    """The ``top_k`` best distinct networks of the search stage, best first, each with the
    triple that stands for its class (:func:`scaling_search.space.representative`).

    A trial's score is how far it got, then its accuracy there: a trial that a scheduler let run
    more epochs beats one it stopped sooner (the scheduler compared them at equal epochs), and
    among equals the higher accuracy wins. A network scores its best trained trial; trials that
    shared another's result only name the members of its class.
    """
    best: dict[str, tuple[int, float]] = {}
    members: dict[str, set[Coefficients]] = {}
    for trial in search_trials(trials):
        record = TrialRecord.of(trial)
        point, triple = record.point, record.coefficients
        if point is None or triple is None:
            continue
        members.setdefault(point[0], set()).add(triple)
        if trial.state not in (TrialState.COMPLETE, TrialState.PRUNED) or record.shared:
            continue
        epochs = record.epochs_completed or 0
        value = trial.value if trial.value is not None else trial.intermediate_values.get(epochs)
        if value is None or not math.isfinite(value):
            continue
        best[point[0]] = max(best.get(point[0], (-1, -math.inf)), (epochs, float(value)))
    ranked = sorted(best, key=lambda key: best[key], reverse=True)[:top_k]
    return [(key, representative(members[key], product)) for key in ranked]


def plan_racing(study: StudyConfig, ot_study: optuna.Study) -> int:
    """Queue the racing trials no trial holds yet; the number of racing trials waiting."""
    racing = study.search.racing
    if racing is None:
        return 0
    trials = ot_study.get_trials(deepcopy=False)
    held = {ledger.point_of(t) for t in trials if t.state in _HELD}
    for key, coefficients in search_ranking(trials, racing.top_k, product=study.space.product):
        for seed in racing_seeds(study):
            if (key, seed) not in held:
                # The seed rides as a user attribute: see study.define.DefineByRun(seed_attr=True).
                params = ledger.point_params(coefficients, seed)
                del params["seed"]
                attrs = {STAGE_ATTR: RACING_STAGE, SEED_ATTR: seed, NETWORK_ATTR: key}
                ot_study.enqueue_trial(params, user_attrs=attrs)
    waiting = ot_study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    return sum(1 for t in waiting if stage_of(t) == RACING_STAGE)
