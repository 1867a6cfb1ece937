"""Racing with repeats: the search's top triples trained again with new seeds."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import optuna
import pytest
from conftest import run_study_cli
from optuna.trial import TrialState, create_trial

from scaling_search.config import parse_study
from scaling_search.results.ranking import best_triple
from scaling_search.space import Coefficients
from scaling_search.study import ledger, racing, record

optuna.logging.set_verbosity(optuna.logging.WARNING)

BUDGET = 4
_DIST: dict[str, optuna.distributions.BaseDistribution] = {
    name: optuna.distributions.FloatDistribution(1.0, 2.0) for name in ("a", "b", "c")
}


def _study(storage: optuna.storages.BaseStorage | None = None) -> optuna.Study:
    study = optuna.create_study(storage=storage, direction="maximize")
    study.set_user_attr("study_config", {"train": {"epochs": BUDGET}})
    return study


def _add(
    study: optuna.Study,
    triple: tuple[float, float, float],
    accuracy: float,
    *,
    epochs: int = BUDGET,
    seed: int = 0,
    stage: str | None = None,
) -> None:
    alpha, beta, gamma = triple
    attrs: dict[str, object] = {
        "alpha": alpha,
        "beta": beta,
        "gamma": gamma,
        "seed": seed,
        "epochs_completed": epochs,
        "flops_ratio_nominal": alpha * beta**2 * gamma**2,
        "flops_ratio_measured": alpha * beta**2 * gamma**2,
        "params": 1,
        "resolution_px": 32,
    }
    if stage:
        attrs[record.STAGE_ATTR] = stage
    full = epochs >= BUDGET
    study.add_trial(
        create_trial(
            state=TrialState.COMPLETE if full else TrialState.PRUNED,
            value=accuracy if full else None,
            intermediate_values={epochs: accuracy},
            params={"a": alpha, "b": beta, "c": gamma},
            distributions=_DIST,
            user_attrs=attrs,
        )
    )


A, B, C, D = (1.2, 1.1, 1.15), (1.4, 1.05, 1.1), (1.0, 1.2, 1.15), (1.1, 1.1, 1.2)


def test_the_search_ranks_by_how_far_a_trial_got_then_its_accuracy() -> None:
    study = _study()
    _add(study, A, 0.60)  # full budget
    _add(study, B, 0.70, epochs=2)  # better, but stopped at a lower rung
    _add(study, C, 0.65)  # full budget, best of those
    _add(study, C, 0.50, seed=1)  # the triple scores its best trial
    _add(study, D, 0.99, stage="racing")  # racing trials are not the search's
    ranked = racing.search_ranking(study.get_trials(), top_k=3)
    assert [c.as_tuple() for _, c in ranked] == [C, A, B]
    assert [c.as_tuple() for _, c in racing.search_ranking(study.get_trials(), top_k=1)] == [C]


def test_racing_queues_new_seeds_for_the_top_k_once(tmp_path: Path) -> None:
    config = parse_study(
        {"name": "r", "search": {"repeats": 2, "seed": 10, "racing": {"top_k": 2, "repeats": 3}}}
    )
    assert racing.racing_seeds(config) == [12, 13, 14]  # after the search's seeds 10 and 11
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = _study(storage)
    for triple, accuracy in ((A, 0.6), (B, 0.7), (C, 0.5)):
        _add(study, triple, accuracy)
    assert racing.plan_racing(config, study) == 6
    queued = study.get_trials(states=(TrialState.WAITING,))
    points = sorted(
        (t.system_attrs["fixed_params"]["alpha"], t.system_attrs["fixed_params"]["beta"],
         t.system_attrs["fixed_params"]["gamma"], t.user_attrs["seed"])
        for t in queued
    )  # fmt: skip
    assert points == sorted((*t, s) for t in (A, B) for s in (12, 13, 14))
    assert {t.user_attrs[record.STAGE_ATTR] for t in queued} == {"racing"}
    # Queued with the network key of the trials they race (here: trials without one, so the
    # triple), so that planning again sees them as held.
    assert {ledger.point_of(t) for t in queued} == {
        (f"triple {t[0]:g},{t[1]:g},{t[2]:g}", s) for t in (A, B) for s in (12, 13, 14)
    }
    assert racing.plan_racing(config, study) == 6  # planning again queues nothing more


def test_racing_trials_do_not_use_up_the_searchs_trials() -> None:
    config = parse_study({"name": "r", "search": {"sampler": "tpe", "n_trials": 5}})
    study = _study()
    for triple in (A, B, C):
        _add(study, triple, 0.6)
    for seed in (1, 2):
        _add(study, A, 0.6, seed=seed, stage="racing")
    assert ledger.plan_trials(config, study) == 5 - 3


def test_racing_picks_the_true_best_more_often_than_one_run_per_candidate() -> None:
    """Ten candidates 0.0025 apart in true accuracy, seed noise 0.01 (std): one run each picks
    the true best a third of the time (50 of 150 here); racing the top 3 of those runs with 4
    more seeds each picks it more than half the time (79 of 150). Seeded: the same counts on
    every run."""
    rng = random.Random(2019)
    means = [0.70 - 0.0025 * k for k in range(10)]
    triples = [(1.0 + 0.01 * k, 1.1, 1.1) for k in range(10)]
    single = raced = 0
    runs = 150
    for _ in range(runs):
        study = _study(optuna.storages.InMemoryStorage())
        for triple, mean in zip(triples, means, strict=True):
            _add(study, triple, rng.gauss(mean, 0.01))
        one_run = best_triple(study).coefficients.as_tuple()
        single += one_run == triples[0]
        for _, finalist in racing.search_ranking(study.get_trials(), top_k=3):
            mean = means[triples.index(finalist.as_tuple())]
            for seed in range(1, 5):
                _add(study, finalist.as_tuple(), rng.gauss(mean, 0.01), seed=seed, stage="racing")
        raced += best_triple(study).coefficients.as_tuple() == triples[0]
    assert single / runs < 0.45
    assert raced / runs > single / runs + 0.15, (single, raced)


def test_after_a_race_the_winner_is_a_raced_triple() -> None:
    """A triple the search left out of the race can have a higher single run than the raced
    means (it was picked as one of the best of many, so it is biased upward); the race decides."""
    study = _study()
    _add(study, A, 0.710)  # the search's top two, raced with two more seeds each
    _add(study, B, 0.700)
    _add(study, C, 0.699)  # third: higher than A's mean, but not raced
    _add(study, D, 0.690)
    for seed, (a, b) in enumerate(((0.69, 0.66), (0.69, 0.67)), start=1):
        _add(study, A, a, seed=seed, stage="racing")
        _add(study, B, b, seed=seed, stage="racing")
    best = best_triple(study)
    assert best.coefficients.as_tuple() == A and best.n_seeds == 3
    assert best.mean_accuracy == pytest.approx((0.71 + 0.69 + 0.69) / 3)
    assert best.mean_accuracy < 0.699
    assert best.tied is not None
    assert {t.coefficients.as_tuple() for t in best.tied} <= {B}  # C and D were not raced


# --- through the CLI, Ray and Optuna -------------------------------------------------------------

SURFACE = """
import random


def noisy(point):
    a, b, g = point["alpha"], point["beta"], point["gamma"]
    rng = random.Random(hash((a, b, g, point["seed"])))
    top = 0.9 - (a - 1.2) ** 2 - (b - 1.1) ** 2 - (g - 1.15) ** 2 + rng.gauss(0, 0.002)
    for epoch in range(1, point["epochs"] + 1):
        point["report"](epoch=epoch, accuracy=top * epoch / point["epochs"])
    return {"accuracy": top}
"""

STUDY = """\
name: race
output_dir: {out}
objective: "surface:noisy"
space: {{alpha: [1.1, 1.3], beta: [1.0, 1.2], gamma: [1.05, 1.25], step: 0.1, tolerance: 0.12}}
search: {{scheduler: asha, racing: {{top_k: 2, repeats: 2}}}}
train: {{epochs: 4}}
resources: {{num_cpus: 2}}
"""


@pytest.mark.slow
def test_a_study_with_racing_trains_the_top_triples_again_at_the_full_budget(
    tmp_path: Path, ray_tmp: str
) -> None:
    (tmp_path / "surface.py").write_text(SURFACE, encoding="utf-8")
    study_file = tmp_path / "study.yaml"
    study_file.write_text(STUDY.format(out=tmp_path / "runs"), encoding="utf-8")

    def run() -> subprocess.CompletedProcess[str]:
        return run_study_cli(study_file, ray_tmp, pythonpath=tmp_path)

    # The search alone first; then the same study with racing added (its new seeds must not
    # clash with the seeds the search recorded).
    search_only = STUDY.replace(", racing: {{top_k: 2, repeats: 2}}", "")
    study_file.write_text(search_only.format(out=tmp_path / "runs"), encoding="utf-8")
    alone = run()
    assert alone.returncode == 0 and "racing: " not in alone.stdout, alone.stderr[-3000:]
    study_file.write_text(STUDY.format(out=tmp_path / "runs"), encoding="utf-8")
    first = run()
    assert first.returncode == 0, first.stderr[-3000:]
    storage = f"sqlite:///{tmp_path / 'runs' / 'optuna.db'}"
    trials = optuna.load_study(study_name="race", storage=storage).get_trials()
    raced = [t for t in trials if t.user_attrs.get(record.STAGE_ATTR) == "racing"]
    searched = [t for t in trials if t not in raced]
    assert len(raced) == 2 * 2 and "racing: the top 2 triple(s)" in first.stdout
    # Racing trials run at the full budget under FIFO: none is stopped early.
    assert all(t.state == TrialState.COMPLETE for t in raced)
    assert all(t.user_attrs["epochs_completed"] == 4 for t in raced)
    assert {t.user_attrs["seed"] for t in raced} == {1, 2}  # new seeds: the search used 0
    finalists = {
        (t.user_attrs["alpha"], t.user_attrs["beta"], t.user_attrs["gamma"]) for t in raced
    }
    expected = racing.search_ranking(searched, top_k=2)
    assert finalists == {c.as_tuple() for _, c in expected}
    assert any(t.state == TrialState.PRUNED for t in searched)  # ASHA stopped some
    best = best_triple(optuna.load_study(study_name="race", storage=storage))
    assert best.n_seeds >= 2 and best.coefficients == Coefficients(1.2, 1.1, 1.15)

    again = run()
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to train" in again.stdout
    assert len(optuna.load_study(study_name="race", storage=storage).get_trials()) == len(trials)


def test_racing_needs_two_repeats() -> None:
    with pytest.raises(ValueError, match=r"search.racing.repeats"):
        parse_study({"name": "r", "search": {"racing": {"repeats": 1}}})
