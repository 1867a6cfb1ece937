"""Racing with repeats: the search's best few triples, trained again with new seeds.

A search (grid or sampler, often with ASHA stopping most trials early) ranks its candidates on one
noisy run each. The racing stage takes its ``top_k`` triples and trains each at the full budget
with ``repeats`` seeds that the search did not use (``search.seed + search.repeats + k``), so the
winner is the best *mean* over seeds, with a spread and a set of candidates tied with it
(:mod:`scaling_search.results`). A full-budget run from the search counts as one more seed.

Racing trials are queued (``Study.enqueue_trial``) with their triple as parameters and the user
attributes ``stage: racing`` and ``seed``; a rerun queues again only what no trial holds, as the
grid does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import optuna
from optuna.trial import FrozenTrial, TrialState

from scaling_search import ledger
from scaling_search.config import StudyConfig
from scaling_search.space import Coefficients

__all__ = ["plan_racing", "racing_seeds", "search_ranking", "search_trials"]

STAGE_ATTR, RACING = ledger.STAGE_ATTR, ledger.RACING_STAGE
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
    return [t for t in trials if t.user_attrs.get(STAGE_ATTR) != RACING]


def search_ranking(trials: Iterable[FrozenTrial], top_k: int) -> list[Coefficients]:
    """The ``top_k`` best distinct triples of the search stage, best first.

    A trial's score is how far it got, then its accuracy there: a trial that a scheduler let run
    more epochs beats one it stopped sooner (the scheduler compared them at equal epochs), and
    among equals the higher accuracy wins. A triple scores its best trial.
    """
    best: dict[tuple[float, float, float], tuple[int, float]] = {}
    for trial in search_trials(trials):
        if trial.state not in (TrialState.COMPLETE, TrialState.PRUNED):
            continue
        attrs = trial.user_attrs
        if not {"alpha", "beta", "gamma"} <= attrs.keys():
            continue
        epochs = int(attrs.get("epochs_completed", 0))
        value = trial.value if trial.value is not None else trial.intermediate_values.get(epochs)
        if value is None or not math.isfinite(value):
            continue
        triple = (round(attrs["alpha"], 6), round(attrs["beta"], 6), round(attrs["gamma"], 6))
        best[triple] = max(best.get(triple, (-1, -math.inf)), (epochs, float(value)))
    ranked = sorted(best, key=lambda triple: best[triple], reverse=True)
    return [Coefficients(*triple) for triple in ranked[:top_k]]


def plan_racing(study: StudyConfig, ot_study: optuna.Study) -> int:
    """Queue the racing trials no trial holds yet; the number of racing trials waiting."""
    racing = study.search.racing
    if racing is None:
        return 0
    trials = ot_study.get_trials(deepcopy=False)
    held = {ledger.point_of(t) for t in trials if t.state in _HELD}
    for coefficients in search_ranking(trials, racing.top_k):
        for seed in racing_seeds(study):
            params = ledger.point_params(coefficients, seed)
            if ledger.point_of_params(params) not in held:
                # The seed rides as a user attribute: see DefineByRun(seed_attr=True).
                seed = params.pop("seed")
                ot_study.enqueue_trial(params, user_attrs={STAGE_ATTR: RACING, "seed": seed})
    waiting = ot_study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    return sum(1 for t in waiting if t.user_attrs.get(STAGE_ATTR) == RACING)
