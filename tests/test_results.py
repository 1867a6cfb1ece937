"""Tests for scaling_search.results.ranking: trials → frame → the best full-budget triple.

Studies are written into real storage (SQLite file and PostgreSQL, via ``storage_url``) with the
user attributes the driver records; expected means and spreads are recomputed with ``statistics``.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Iterator
from itertools import permutations

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from scaling_search.results.ranking import ResultsError, best_triple, budget_epochs, trials_frame

optuna.logging.set_verbosity(optuna.logging.WARNING)

BUDGET = 3
_DIST: dict[str, optuna.distributions.BaseDistribution] = {
    name: optuna.distributions.FloatDistribution(1.0, 2.0) for name in ("alpha", "beta", "gamma")
}


_STORAGES: dict[str, optuna.storages.RDBStorage] = {}


def _study(url: str, *, budget: int | None = BUDGET, name: str = "s") -> optuna.Study:
    """A new study in ``url`` with the budget recorded the way the driver records it."""
    storage = _STORAGES.get(url) or _STORAGES.setdefault(url, optuna.storages.RDBStorage(url))
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize")
    if budget is not None:
        config = {"data": {"kind": "synthetic"}, "space": {}, "train": {"epochs": budget}}
        study.set_user_attr("study_config", config)
        study.set_user_attr("chosen_on", "validation")  # as ledger.open_study records it
    return study


@pytest.fixture(autouse=True)
def _close_storages() -> Iterator[None]:
    yield
    for storage in _STORAGES.values():
        storage.engine.dispose()  # before the fixture drops the PostgreSQL database
    _STORAGES.clear()


def _add(
    study: optuna.Study,
    triple: tuple[float, float, float],
    accuracy: float | None,
    *,
    seed: int = 0,
    epochs: int | None = BUDGET,
    state: TrialState = TrialState.COMPLETE,
    measured: float | None = None,
    network: str | None = None,
    shared_from: int | None = None,
    test: float | None = None,
) -> None:
    alpha, beta, gamma = triple
    nominal = alpha * beta**2 * gamma**2
    attrs: dict[str, object] = {
        "alpha": alpha,
        "beta": beta,
        "gamma": gamma,
        "seed": seed,
        "flops_ratio_nominal": nominal,
        "flops_ratio_measured": nominal * 1.1 if measured is None else measured,
        "params": int(5_000_000 * beta**2 * alpha),
        "resolution_px": round(48 * gamma),
    }
    if epochs is not None:
        attrs["epochs_completed"] = epochs
    if network is not None:
        attrs["network_key"] = network
    if shared_from is not None:
        attrs["shared_from"] = shared_from
    if test is not None:
        attrs["test_accuracy"] = test
    study.add_trial(
        create_trial(
            state=state,
            value=accuracy,
            params={"alpha": alpha, "beta": beta, "gamma": gamma},
            distributions=_DIST,
            user_attrs=attrs,
        )
    )


A, B, C = (1.2, 1.1, 1.15), (1.4, 1.05, 1.1), (1.0, 1.2, 1.15)


def test_highest_accuracy_wins(storage_url: str) -> None:
    study = _study(storage_url)
    _add(study, A, 0.61)
    _add(study, B, 0.67)
    _add(study, C, 0.64)
    best = best_triple(study)
    assert best.coefficients.as_tuple() == B
    assert best.mean_accuracy == pytest.approx(0.67)
    assert best.n_seeds == 1 and best.n_candidates == 3
    assert math.isnan(best.std_accuracy)
    assert best.to_dict()["std_accuracy"] is None
    assert best.flops_ratio_nominal == pytest.approx(1.4 * 1.05**2 * 1.1**2)
    assert best.resolution_px == round(48 * 1.1)
    assert best.params == int(5_000_000 * 1.05**2 * 1.4)


def test_trials_that_stopped_early_never_win(storage_url: str) -> None:
    study = _study(storage_url)
    _add(study, A, 0.60)
    # Each of these has a higher accuracy than A but not from the full budget.
    _add(study, B, 0.95, state=TrialState.PRUNED, epochs=1)
    _add(study, C, 0.94, state=TrialState.PRUNED, epochs=BUDGET)  # stopped by the scheduler
    _add(study, (1.1, 1.1, 1.2), 0.93, epochs=BUDGET - 1)  # COMPLETE but short
    _add(study, (1.3, 1.05, 1.15), 0.92, epochs=None)  # COMPLETE with no epoch record
    _add(study, (1.5, 1.0, 1.15), None, state=TrialState.FAIL, epochs=None)
    best = best_triple(study)
    assert best.coefficients.as_tuple() == A
    assert best.mean_accuracy == pytest.approx(0.60)
    assert best.n_candidates == 1


def test_seeds_are_averaged_with_the_sample_spread(storage_url: str) -> None:
    study = _study(storage_url)
    a_runs, b_runs = [0.70, 0.64, 0.73], [0.76, 0.60]
    for seed, acc in enumerate(a_runs):
        _add(study, A, acc, seed=seed)
    for seed, acc in enumerate(b_runs):  # B has the best single run but a lower mean
        _add(study, B, acc, seed=seed)
    _add(study, A, 0.99, seed=7, state=TrialState.PRUNED, epochs=1)  # not a full-budget seed
    _add(study, A, None, seed=8, state=TrialState.FAIL, epochs=None)
    best = best_triple(study)
    assert best.coefficients.as_tuple() == A
    assert best.n_seeds == len(a_runs)
    assert best.mean_accuracy == pytest.approx(statistics.mean(a_runs), rel=1e-12)
    assert best.std_accuracy == pytest.approx(statistics.stdev(a_runs), rel=1e-9)  # ddof = 1
    assert best.to_dict()["std_accuracy"] == pytest.approx(statistics.stdev(a_runs), abs=1e-6)
    assert best.n_candidates == 2


def test_ties_go_to_the_lower_measured_flops(storage_url: str) -> None:
    # Same accuracy; the cheaper candidate wins whichever was recorded first.
    for name, entries in (
        ("cheap-first", [(A, 1.9), (B, 2.3)]),
        ("cheap-last", [(B, 2.3), (A, 1.9)]),
    ):
        study = _study(storage_url, name=name)
        for triple, measured in entries:
            _add(study, triple, 0.5, measured=measured)
        best = best_triple(study)
        assert best.coefficients.as_tuple() == A, name
        assert best.flops_ratio_measured == pytest.approx(1.9)


def test_randomised_study_matches_an_independent_ranking(storage_url: str) -> None:
    rng = random.Random(20190528)  # any fixed seed; the expectation is recomputed below
    triples = [(1.0 + 0.05 * i, 1.05, 1.1) for i in range(6)]
    full: dict[tuple[float, float, float], list[float]] = {t: [] for t in triples}
    study = _study(storage_url)
    for triple in triples:
        for seed in range(3):
            accuracy = round(rng.uniform(0.3, 0.9), 4)
            kind = rng.choice(["full", "full", "pruned", "short", "fail"])
            if kind == "full":
                full[triple].append(accuracy)
                _add(study, triple, accuracy, seed=seed)
            elif kind == "pruned":
                _add(study, triple, accuracy + 0.5, seed=seed, state=TrialState.PRUNED, epochs=1)
            elif kind == "short":
                _add(study, triple, accuracy + 0.5, seed=seed, epochs=BUDGET - 1)
            else:
                _add(study, triple, None, seed=seed, state=TrialState.FAIL, epochs=None)
    means = {t: statistics.mean(runs) for t, runs in full.items() if runs}
    winner = max(means, key=lambda t: means[t])
    best = best_triple(study)
    assert best.coefficients.as_tuple() == pytest.approx(winner)
    assert best.mean_accuracy == pytest.approx(means[winner])
    assert best.n_seeds == len(full[winner])
    assert best.n_candidates == len(means)


def test_no_full_budget_trial_or_no_recorded_budget_is_an_error(storage_url: str) -> None:
    study = _study(storage_url)
    with pytest.raises(ResultsError):  # nothing at all yet
        best_triple(study)
    _add(study, A, 0.9, state=TrialState.PRUNED, epochs=1)
    _add(study, B, 0.8, epochs=BUDGET - 1)
    _add(study, C, None, state=TrialState.FAIL, epochs=None)
    with pytest.raises(ResultsError) as info:
        best_triple(study)
    assert f"{BUDGET} epoch" in str(info.value) and "'s'" in str(info.value)

    foreign = _study(storage_url, budget=None, name="foreign")  # not made by scaling-search
    _add(foreign, A, 0.9)
    with pytest.raises(ResultsError) as info:
        best_triple(foreign)
    assert "budget" in str(info.value) and "'foreign'" in str(info.value)
    foreign.set_user_attr("study_config", {"train": {"epochs": "many"}})
    with pytest.raises(ResultsError):
        budget_epochs(foreign)
    foreign.set_user_attr("study_config", {"train": {"epochs": 5}})
    assert budget_epochs(foreign) == 5


def test_trials_frame_has_one_row_per_trial_with_the_attributes(storage_url: str) -> None:
    study = _study(storage_url)
    empty = trials_frame(study)
    assert empty.empty
    assert {"number", "state", "accuracy", "alpha", "beta", "gamma", "seed"} <= set(empty.columns)
    _add(study, A, 0.7, seed=2)
    _add(study, B, 0.4, seed=1, state=TrialState.PRUNED, epochs=1)
    _add(study, C, None, state=TrialState.FAIL, epochs=None)
    frame = trials_frame(study)
    assert len(frame) == 3
    assert list(frame["number"]) == [0, 1, 2]
    assert list(frame["state"]) == ["COMPLETE", "PRUNED", "FAIL"]
    first = frame.iloc[0]
    assert first["accuracy"] == pytest.approx(0.7)
    assert (first["alpha"], first["beta"], first["gamma"]) == A
    assert first["seed"] == 2 and first["epochs_completed"] == BUDGET
    assert first["resolution_px"] == round(48 * 1.15)
    assert first["flops_ratio_nominal"] == pytest.approx(1.2 * 1.1**2 * 1.15**2)
    assert frame.iloc[1]["epochs_completed"] == 1
    assert frame.iloc[2]["accuracy"] is None or math.isnan(frame.iloc[2]["accuracy"])
    for column in ("params", "flops_ratio_measured", "duration_s"):
        assert column in frame.columns


# --- the set tied with the winner ----------------------------------------------------------------


def test_with_two_repeated_candidates_the_tie_test_is_students_t_test(storage_url: str) -> None:
    from scipy import stats

    study = _study(storage_url)
    a_runs, b_runs = [0.70, 0.64, 0.73, 0.69], [0.66, 0.62, 0.70]
    for seed, acc in enumerate(a_runs):
        _add(study, A, acc, seed=seed)
    for seed, acc in enumerate(b_runs):
        _add(study, B, acc, seed=seed)
    best = best_triple(study)
    # Pooling the seed variance of the two is Student's two-sample t-test (equal variances).
    expected = stats.ttest_ind(a_runs, b_runs, equal_var=True).pvalue
    assert expected > 0.05  # so B is tied with A
    assert best.tied is not None and len(best.tied) == 1
    assert best.tied[0].coefficients.as_tuple() == B
    assert best.tied[0].p_value == pytest.approx(expected, rel=1e-9)
    assert best.noise_df == len(a_runs) + len(b_runs) - 2
    pooled = ((3 * statistics.variance(a_runs)) + 2 * statistics.variance(b_runs)) / 5
    assert best.noise_std == pytest.approx(math.sqrt(pooled), rel=1e-9)


def test_a_clearly_worse_candidate_is_not_tied_and_one_run_is_tested_on_the_pooled_noise(
    storage_url: str,
) -> None:
    study = _study(storage_url)
    for seed, acc in enumerate([0.700, 0.702, 0.698]):
        _add(study, A, acc, seed=seed)  # seed noise ≈ 0.002
    _add(study, B, 0.699)  # one run, within the noise of A
    _add(study, C, 0.600)  # one run, fifty noise widths below
    best = best_triple(study)
    assert best.coefficients.as_tuple() == A
    assert best.tied is not None
    assert [t.coefficients.as_tuple() for t in best.tied] == [B]
    assert best.tied[0].n_seeds == 1 and best.tied[0].p_value > 0.5
    assert best.to_dict()["tied"][0]["alpha"] == B[0]


def test_without_a_repeated_candidate_there_is_no_tie_test(storage_url: str) -> None:
    study = _study(storage_url)
    _add(study, A, 0.70)
    _add(study, B, 0.69)
    best = best_triple(study)
    assert best.tied is None and math.isnan(best.noise_std) and best.noise_df == 0
    assert best.to_dict()["tied"] is None and best.to_dict()["noise_std"] is None


# --- networks, not triples; validation, not test --------------------------------------------


def test_a_network_is_ranked_once_with_its_trained_seeds_and_named_by_its_class(
    storage_url: str,
) -> None:
    study = _study(storage_url)
    # Network "n1" is built by A and by (1.25, 1.1, 1.15); trained twice as A, shared with the
    # other triple (copies of trials 0 and 1: they add a member, never a seed).
    other = (1.25, 1.1, 1.15)
    _add(study, A, 0.70, seed=0, network="n1", test=0.60)
    _add(study, A, 0.68, seed=1, network="n1", test=0.62)
    _add(study, other, 0.70, seed=0, network="n1", shared_from=0, test=0.60)
    _add(study, other, 0.68, seed=1, network="n1", shared_from=1, test=0.62)
    _add(study, B, 0.66, seed=0, network="n2", test=0.90)  # best on test: never chosen on it
    best = best_triple(study)
    assert best.network_key == "n1" and best.n_seeds == 2 and best.n_candidates == 2
    assert best.mean_accuracy == pytest.approx(0.69)
    assert best.test_accuracy == pytest.approx(0.61) and best.n_test == 2
    assert {m.as_tuple() for m in best.members} == {A, other}
    # The class's representative: α·β²·γ² closest to c = 2 (2.0003 against A's 1.9203).
    assert best.coefficients.as_tuple() == other
    assert best.flops_ratio_nominal == pytest.approx(1.25 * 1.1**2 * 1.15**2)
    assert best.chosen_on == "validation"
    frame = trials_frame(study)
    assert list(frame["shared"]) == [False, False, True, True, False]


def test_a_study_recorded_before_validation_splits_says_it_chose_on_test(storage_url: str) -> None:
    study = _study(storage_url)
    study.set_user_attr("chosen_on", None)  # what an older driver left: no such attribute
    _add(study, A, 0.7)
    assert best_triple(study).chosen_on == "test"
    assert best_triple(study).to_dict()["chosen_on"] == "test"


def test_cost_tracking_is_spearmans_rank_correlation_over_the_networks(storage_url: str) -> None:
    from scipy import stats

    study = _study(storage_url)
    rows = [((1.0 + 0.05 * k, 1.05, 1.1), 0.5 + 0.03 * k, 1.9 + 0.2 * k) for k in range(5)]
    rows[1], rows[2] = (rows[1][0], 0.58, rows[1][2]), (rows[2][0], 0.55, rows[2][2])
    for triple, value, measured in rows:
        _add(study, triple, value, measured=measured)
    tracking = best_triple(study).cost_tracking
    accuracy, cost = [r[1] for r in rows], [r[2] for r in rows]
    expected = stats.spearmanr(accuracy, cost)
    assert tracking is not None and tracking.n_networks == 5
    assert tracking.rho == pytest.approx(expected.statistic) and tracking.rho == pytest.approx(0.9)
    # With 5 networks the p-value is exact: of the 120 pairings, those with |ρ| ≥ 0.9 (ρ = 1 and
    # the 4 one-swap neighbours, each way): 10 / 120.
    pairings = [stats.spearmanr(accuracy, order).statistic for order in permutations(cost)]
    exact = sum(abs(r) >= 0.9 - 1e-12 for r in pairings) / len(pairings)
    assert exact == pytest.approx(10 / 120)
    assert tracking.p_value == pytest.approx(exact)
    assert not tracking.tracks  # ρ 0.9 over 5 networks: p 0.083, not shown to track
    ordered = _study(storage_url, name="ordered")
    for k, (triple, _, measured) in enumerate(rows):
        _add(ordered, triple, 0.5 + 0.03 * k, measured=measured)
    monotone = best_triple(ordered).cost_tracking
    assert monotone is not None and monotone.rho == pytest.approx(1.0)
    assert monotone.p_value == pytest.approx(2 / 120) and monotone.tracks
    two = _study(storage_url, name="two")
    _add(two, A, 0.7)
    _add(two, B, 0.6)
    assert best_triple(two).cost_tracking is None  # too few networks to say
