"""The report: each figure's data (tested without drawing), the page, the live dashboard figures."""

from __future__ import annotations

import pickle
import re
import statistics
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from conftest import (
    CRAFTED_BUDGET,
    CRAFTED_SEEDS,
    CRAFTED_TRIALS,
    cli_env,
    crafted_accuracy,
    make_crafted_study,
)
from hypothesis import given
from hypothesis import strategies as st

from scaling_search.config import load_study
from scaling_search.report import figures as _figures
from scaling_search.report import publish as report
from scaling_search.report.data import (
    EARLY,
    FAILED,
    FULL,
    RUNNING,
    _get_curves_info,
    _get_family_info,
    _get_top_info,
    _get_trials_info,
)
from scaling_search.results.family import OFFICIAL_FAMILY, make_family
from scaling_search.space import Coefficients, log_flops_shares

_OUTCOME = {"COMPLETE": FULL, "PRUNED": EARLY, "FAIL": FAILED, "RUNNING": RUNNING}


def _expected_outcome(state: str, epochs: int) -> str:
    return EARLY if state == "COMPLETE" and epochs < CRAFTED_BUDGET else _OUTCOME[state]


def _mean(base: float, epochs: int) -> float:
    return statistics.mean(crafted_accuracy(base, epochs, s) for s in CRAFTED_SEEDS)


# The winner of the crafted study, worked out by hand from CRAFTED_TRIALS: only COMPLETE trials
# with the full 3 epochs may win; of those (1.4, 1.05, 1.1) starts highest (0.45 + 0.2 + 0.005).
WINNER = Coefficients(1.4, 1.05, 1.1)


@pytest.fixture
def crafted(tmp_path: Path) -> optuna.Study:
    return make_crafted_study(f"sqlite:///{tmp_path / 'crafted.db'}")


# --- shares of log2 FLOPs ------------------------------------------------------------------------


def test_shares_of_pure_directions() -> None:
    assert log_flops_shares(Coefficients(2.0, 1.0, 1.0)) == pytest.approx((1, 0, 0))
    assert log_flops_shares(Coefficients(1.0, 2**0.5, 1.0)) == pytest.approx((0, 1, 0))
    assert log_flops_shares(Coefficients(1.0, 1.0, 2**0.5)) == pytest.approx((0, 0, 1))


@given(
    st.floats(1.0, 2.0), st.floats(1.0, 1.5), st.floats(1.0, 1.5)
)  # α·β²·γ² > 1 unless all are 1
def test_shares_sum_to_one_and_give_back_the_triple(alpha: float, beta: float, gamma: float):
    c = Coefficients(alpha, beta, gamma)
    if c.flops_product < 1.0001:
        return
    a, b, g = log_flops_shares(c)
    assert min(a, b, g) >= -1e-12 and a + b + g == pytest.approx(1.0)
    product = c.flops_product  # α = P^a, β = P^(b/2), γ = P^(g/2)
    assert (product**a, product ** (b / 2), product ** (g / 2)) == pytest.approx(c.as_tuple())


# --- the data of each figure ---------------------------------------------------------------------


def test_trials_info_places_every_trained_trial_with_its_outcome(crafted: optuna.Study) -> None:
    info = _get_trials_info(crafted)
    assert info.budget_epochs == CRAFTED_BUDGET and info.product == 2.0
    assert info.winner == WINNER
    # The queued trial and the skipped duplicate were never trained: not shown.
    assert len(info.points) == len(CRAFTED_TRIALS) * len(CRAFTED_SEEDS)
    by_number = {p.number: p for p in info.points}
    number = 0
    for triple, state, epochs, base in CRAFTED_TRIALS:
        for seed in CRAFTED_SEEDS:
            point = by_number[number]
            assert point.coefficients.as_tuple() == triple and point.seed == seed
            assert point.outcome == _expected_outcome(state, epochs)
            assert point.epochs == epochs
            if state == "FAIL":
                assert point.accuracy is None
            else:  # the value, or for a trial without one its last reported accuracy
                assert point.accuracy == pytest.approx(crafted_accuracy(base, epochs, seed))
            assert point.shares == pytest.approx(log_flops_shares(point.coefficients))
            assert point.flops_ratio_measured is not None and point.flops_ratio_measured > 1.0
            number += 1


def test_curves_info_is_each_trials_intermediate_values(crafted: optuna.Study) -> None:
    info = _get_curves_info(crafted)
    assert len(info.curves) == len(CRAFTED_TRIALS) * len(CRAFTED_SEEDS)
    for curve in info.curves:
        trial = crafted.trials[curve.number]
        assert curve.epochs == tuple(sorted(trial.intermediate_values))
        assert curve.accuracy == tuple(trial.intermediate_values[e] for e in curve.epochs)
        assert f"#{curve.number} " in curve.label
    outcomes = {curve.number: curve.outcome for curve in info.curves}
    assert outcomes[6] == EARLY and outcomes[10] == FAILED and outcomes[12] == RUNNING


def test_top_info_ranks_full_budget_candidates_and_never_an_early_one_first(crafted) -> None:
    info = _get_top_info(crafted)
    full = [(t, b) for t, s, e, b in CRAFTED_TRIALS if s == "COMPLETE" and e == CRAFTED_BUDGET]
    expected = sorted(full, key=lambda tb: -_mean(tb[1], CRAFTED_BUDGET))
    assert info.n_eligible == len(full)
    eligible = [c for c in info.candidates if c.eligible]
    assert [c.coefficients.as_tuple() for c in eligible] == [t for t, _ in expected]
    for candidate, (_, base) in zip(eligible, expected, strict=True):
        scores = [crafted_accuracy(base, CRAFTED_BUDGET, s) for s in CRAFTED_SEEDS]
        assert candidate.mean_accuracy == pytest.approx(statistics.mean(scores))
        assert candidate.std_accuracy == pytest.approx(statistics.stdev(scores))
        assert candidate.n_seeds == len(CRAFTED_SEEDS) and candidate.epochs == CRAFTED_BUDGET
    # The two stopped early score higher than every full-budget one, yet come after them all.
    early = info.candidates[len(eligible) :]
    assert {c.coefficients.as_tuple() for c in early} == {(1.1, 1.0, 1.35), (1.9, 1.0, 1.02)}
    assert all(not c.eligible and c.epochs == 1 for c in early)
    assert min(c.mean_accuracy for c in early) > eligible[0].mean_accuracy
    top_two = _get_top_info(crafted, k=2).candidates
    assert [c.coefficients for c in top_two] == [c.coefficients for c in info.candidates[:2]]


@pytest.mark.parametrize("classes", [10, 1000])
def test_family_info_matches_the_exported_families(classes: int) -> None:
    triple = Coefficients(1.2, 1.1, 1.15)
    info = _get_family_info(triple, base_resolution_px=224, num_classes=classes)
    phis = tuple(range(8))
    for mode, costs in (("formula", info.formula), ("flops-matched", info.flops_matched)):
        family = make_family(triple, mode=mode, phis=phis, num_classes=classes)
        assert [(c.name, c.phi, c.params) for c in costs] == [
            (m.name, m.phi, m.params) for m in family.members
        ]
        assert costs[0].macs_ratio == pytest.approx(1.0, abs=0.02)  # φ ≈ 0 is B0 itself
    assert [c.name for c in info.official] == [m.name for m in OFFICIAL_FAMILY]
    assert info.official[0].macs_ratio == 1.0
    # Flops-matched members hit each official model's MACs ratio (within the rounding steps).
    for matched, official in zip(info.flops_matched, info.official, strict=True):
        assert matched.macs_ratio == pytest.approx(official.macs_ratio, rel=0.05)
    ratios = [c.macs_ratio for c in info.formula]
    assert ratios == sorted(ratios) and ratios[-1] > 50  # about 2^7 at φ = 7


# --- drawing and the page ------------------------------------------------------------------------


def test_figures_draw_each_outcome_and_mark_the_winner(crafted: optuna.Study) -> None:
    info = _get_trials_info(crafted)
    simplex = _figures.simplex_figure(info)
    names = [trace.name for trace in simplex.data]
    assert [n.split(" (")[0] for n in names[:4]] == [FULL, EARLY, RUNNING, FAILED]
    assert any(n.startswith("winner α=1.4") for n in names)
    full = simplex.data[0]
    assert len(full.a) == 6 and sum(full.a) + sum(full.b) + sum(full.c) == pytest.approx(6)
    cost = _figures.cost_figure(info)
    assert FAILED not in " ".join(t.name for t in cost.data)  # no accuracy to place
    [winner] = [t for t in cost.data if t.name == "winner"]
    assert len(winner.x) == len(CRAFTED_SEEDS)


def test_report_page_holds_five_parts_and_needs_no_network(crafted, tmp_path: Path) -> None:
    path = report.write_report(
        crafted, tmp_path / "out" / "r.html", base_resolution_px=32, num_classes=10
    )
    page = path.read_text(encoding="utf-8")
    for part in report.PARTS:
        assert f'<section id="part-{part}">' in page and f'id="plot-{part}"' in page
    # plotly.js is inside the page, once; nothing is loaded from elsewhere.
    assert page.count("<script") == 1 + len(report.PARTS)
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=|@import", page)
    assert len(page) > 3_000_000  # plotly.min.js alone is over 3 MB
    assert "α=1.4 β=1.05 γ=1.1" in page  # the winner in the summary
    assert not list(path.parent.glob(".*partial"))


def test_report_without_a_full_budget_result_says_so(tmp_path: Path) -> None:
    study = make_crafted_study(f"sqlite:///{tmp_path / 'c.db'}")
    config = study.user_attrs["study_config"]
    study.set_user_attr("study_config", {**config, "train": {**config["train"], "epochs": 4}})
    page = report.report_html(study, base_resolution_px=32, num_classes=10)
    assert "no full-budget result yet" in page and "no family" in page


# --- optuna-dashboard ----------------------------------------------------------------------------


def _dashboard_view(study: optuna.Study) -> tuple[dict[str, str], str]:
    """The figures and the note as optuna-dashboard reads them from the storage."""
    from optuna_dashboard._custom_plot_data import get_plotly_graph_objects
    from optuna_dashboard._note import get_note_from_system_attrs

    attrs = study._storage.get_study_system_attrs(study._study_id)
    return get_plotly_graph_objects(attrs), get_note_from_system_attrs(attrs, None)["body"]


def test_publish_live_stores_two_figures_and_a_note(storage_url: str) -> None:
    study = make_crafted_study(storage_url)
    report.publish_live(study)
    figures, note = _dashboard_view(study)
    assert sorted(figures) == sorted(report.LIVE_FIGURES)
    assert "scatterternary" in figures["constraint-simplex"]
    assert "best: α=1.4 β=1.05 γ=1.1  validation accuracy 0.6550 ± 0.0071 (2 seeds)" in note
    assert "| 1 | 1.4 | 1.05 | 1.1 |" in note
    # Publishing again replaces them: still two figures, the note shows the new state.
    assert "16 trials (8 complete, 2 stopped early, 3 failed, 2 running, 1 queued)" in note
    study.tell(study.ask(), 0.99)  # the queued trial; without triple attributes it is not drawn
    report.publish_live(study)
    again, note = _dashboard_view(study)
    assert sorted(again) == sorted(report.LIVE_FIGURES) and "(9 complete," in note


def test_live_dashboard_throttles_and_never_stops_the_search(tmp_path: Path) -> None:
    study = make_crafted_study(f"sqlite:///{tmp_path / 'c.db'}")
    said: list[str] = []
    live = report.LiveDashboard(study, said.append, interval_s=3600)
    live.update()  # published on a background thread
    live.wait()
    _, first = _dashboard_view(study)
    study.tell(study.ask(), 0.5)
    live.update()  # within the interval: skipped
    live.wait()
    assert _dashboard_view(study)[1] == first
    live.update(force=True)
    assert "(9 complete," in _dashboard_view(study)[1] and "(8 complete," in first
    # A study that is gone: the error is said once, and nothing is raised.
    optuna.delete_study(study_name=study.study_name, storage=study._storage)
    live.update(force=True)
    live.update(force=True)
    assert len(said) == 1 and said[0].startswith("optuna-dashboard figures not updated")


# --- the command ---------------------------------------------------------------------------------


def _report_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scaling_search.cli", "report", *args],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.slow
def test_run_and_report_write_the_page(finished_study: Path, tmp_path: Path) -> None:
    study = load_study(finished_study)
    default = study.out_dir / "report.html"
    run_output = (finished_study.parent / "run.out").read_text(encoding="utf-8")
    assert f"report: {default}" in run_output.splitlines()  # `run` writes it at the end
    default.unlink()
    result = _report_cli(str(finished_study))
    assert result.returncode == 0 and result.stdout == f"report: {default}\n", result.stderr
    page = default.read_text(encoding="utf-8")
    assert all(f'<section id="part-{part}">' in page for part in report.PARTS)
    assert f"scaling-search report: {study.name}" in page


@pytest.mark.slow
def test_report_into_a_folder_is_one_line(finished_study: Path, tmp_path: Path) -> None:
    result = _report_cli(str(finished_study), "--out", str(tmp_path))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "is a folder" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_another_member_exports_with_the_studys_resolution_classes_and_recipe(
    finished_study: Path,
) -> None:
    """`best` points at `export STUDY --coefficients A,B,G` for another member of the winning
    class: that triple's family with what the study trained, not the reference recipe."""
    import json

    from conftest import run_cli

    def cli(*args: str) -> dict:
        result = run_cli(*args)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    study = load_study(finished_study)
    best = cli("best", str(finished_study), "--format", "json")
    other = (1.3, 1.15, 1.15)  # any triple: this one is not a grid candidate (α·β²·γ² = 2.27)
    assert [best["alpha"], best["beta"], best["gamma"]] != list(other)
    chosen = cli("export", str(finished_study), "--phi", "1")
    picked = cli("export", str(finished_study), "--coefficients", "1.3,1.15,1.15", "--phi", "1")
    bare = cli("export", "--coefficients", "1.3,1.15,1.15", "--phi", "1")
    assert tuple(picked["coefficients"].values()) == other
    assert tuple(chosen["coefficients"].values()) == (best["alpha"], best["beta"], best["gamma"])
    study_recipe = (study.train.dropout, study.train.stochastic_depth, study.train.bn_momentum)
    for family in (chosen, picked):
        (member,) = family["members"]
        assert (member["dropout"], member["stochastic_depth"], member["bn_momentum"]) == (
            pytest.approx(study_recipe)
        )
        assert member["num_classes"] == study.data.num_classes
    assert picked["members"][0]["resolution_px"] == round(study.train.base_resolution_px * 1.15)
    (reference,) = bare["members"]
    assert (reference["num_classes"], reference["resolution_px"]) == (1000, 258)  # 224 × 1.15
    assert (reference["stochastic_depth"], reference["bn_momentum"]) == (0.2, 0.01)


def test_a_pickled_live_dashboard_holds_no_storage(tmp_path: Path) -> None:
    """Tune pickles its callbacks into tuner.pkl: no storage URL (password) may go with them."""
    study = make_crafted_study(f"sqlite:///{tmp_path / 'Sup3rSecretName.db'}")
    live = report.LiveDashboard(study, print)
    blob = pickle.dumps(live)
    assert b"Sup3rSecretName" not in blob
    copy = pickle.loads(blob)
    copy.update(force=True)  # a copy publishes nothing
    assert _dashboard_view(study)[0] == {}


# --- triples that share a network ----------------------------------------------------------------


def _share(study: optuna.Study, source: optuna.trial.FrozenTrial, alpha: float) -> None:
    """Add a copy of ``source``'s result for another α (as scaling_search.study.sharing does)."""
    attrs = {**source.user_attrs, "alpha": alpha, "shared_from": source.number}
    attrs["flops_ratio_nominal"] = alpha * attrs["beta"] ** 2 * attrs["gamma"] ** 2
    for key in ("test_accuracy",):
        attrs.pop(key, None)
    study.add_trial(
        optuna.trial.create_trial(
            state=source.state,
            value=source.value,
            params={**source.params, "alpha": alpha},
            distributions=source.distributions,
            user_attrs=attrs,
            intermediate_values=source.intermediate_values,
        )
    )


def test_a_shared_result_is_drawn_as_such_and_names_the_winners_class(
    crafted: optuna.Study,
) -> None:
    from scaling_search.report.data import SHARED

    sources = [
        t for t in crafted.get_trials() if t.user_attrs.get("alpha") == 1.4 and t.value is not None
    ]
    for source in sources:  # both seeds of the winner: say 1.45 builds the same network
        _share(crafted, source, 1.45)
    trials = _get_trials_info(crafted)
    copies = [p for p in trials.points if p.outcome == SHARED]
    assert [p.shared_from for p in copies] == [s.number for s in sources]
    assert all(p.coefficients == Coefficients(1.45, 1.05, 1.1) for p in copies)
    by_number = {p.number: p for p in trials.points}
    assert all(by_number[s.number].sharers == 1 for s in sources)
    # The winning network's class has both triples; its representative is the one whose
    # α·β²·γ² is closer to 2 (1.45: 1.9379 against 1.4: 1.8711).
    assert set(trials.winner_class) == {WINNER, Coefficients(1.45, 1.05, 1.1)}
    assert trials.winner == Coefficients(1.45, 1.05, 1.1)
    # Copies add no learning curve, no seed and no row: the class is one candidate.
    assert len(_get_curves_info(crafted).curves) == len(CRAFTED_TRIALS) * len(CRAFTED_SEEDS)
    top = _get_top_info(crafted).candidates[0]
    assert top.n_seeds == 2 and set(top.members) == set(trials.winner_class)
    assert top.test_accuracy == pytest.approx(_mean(0.45, 3) - 0.03)
    page = report.report_html(crafted, base_resolution_px=32, num_classes=10)
    assert "α ∈ {1.4, 1.45} with β = 1.05, γ = 1.1 build the same φ = 1 network" in page
    assert "at φ = 7 (B7) the choice changes depth ×" in page
    assert "shares a trained network (2)" in _figures.simplex_figure(trials).to_json()


def test_writers_of_one_page_at_once_each_replace_it_whole(tmp_path: Path) -> None:
    # Two drivers on one study write the same report.html at the end of their runs (the CI
    # failure this guards against: both used one temporary name, and the later rename found it
    # gone). Many threads writing at once must all succeed and leave one whole page behind.
    import threading

    from scaling_search.results.export import write_text_atomic

    path = tmp_path / "runs" / "report.html"
    pages = [f"<p>{i}</p>" * 20_000 for i in range(16)]
    errors: list[BaseException] = []
    start = threading.Barrier(len(pages))

    def write(text: str) -> None:
        start.wait()
        try:
            write_text_atomic(path, text)
        except BaseException as error:  # collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=write, args=(text,)) for text in pages]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert path.read_text() in pages
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]
    assert oct(path.stat().st_mode & 0o777) == "0o644"
