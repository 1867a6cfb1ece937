"""The winner in words: the class of a winning network, its B7 span, and one printed form."""

from __future__ import annotations

import math

from scaling_search.results.family import make_family
from scaling_search.results.ranking import BestTriple, CostTracking
from scaling_search.results.verdict import best_view, class_label, class_spread, format_accuracy
from scaling_search.space import Coefficients, describe

PAPER = Coefficients(1.2, 1.1, 1.15)


def test_the_class_spread_shows_what_the_choice_among_equal_networks_changes_at_b7() -> None:
    """The issue's numbers: (1.2, 1.1, 1.15) and (1.25, 1.1, 1.15) build one φ = 1 network,
    yet their B7 depth multipliers are 1.2⁷ = 3.58 and 1.25⁷ = 4.77."""
    members = [Coefficients(1.2, 1.1, 1.15), Coefficients(1.25, 1.1, 1.15)]
    nets = [describe(m, base_resolution_px=224, num_classes=1000) for m in members]
    assert nets[0].network_key == nets[1].network_key  # the same φ = 1 network
    assert (nets[0].macs, nets[0].params) == (nets[1].macs, nets[1].params)
    spread = class_spread(members, phi=7)
    assert spread.depth == (round(1.2**7, 6), round(1.25**7, 6))
    assert spread.width == (round(1.1**7, 6),) * 2
    assert spread.macs[0] < spread.macs[1]
    sevens = [make_family(m, phis=[7]).members[0] for m in members]
    assert spread.macs == (sevens[0].macs, sevens[1].macs)


def test_format_accuracy_and_class_label_are_the_one_printed_form() -> None:
    assert format_accuracy(0.70701, 0.01204, 3) == "0.7070 ± 0.0120 (3 seeds)"
    assert format_accuracy(0.7, math.nan, 1) == "0.7000 (1 seed)"
    label = class_label([Coefficients(1.05, 1.0, 1.35), Coefficients(1.15, 1.0, 1.35),
                         Coefficients(1.1, 1.0, 1.35)])  # fmt: skip
    assert label == "α ∈ {1.05, 1.1, 1.15} with β = 1, γ = 1.35"
    mixed = class_label([Coefficients(1.2, 1.1, 1.15), Coefficients(1.25, 1.15, 1.15)])
    assert mixed == "(α, β, γ) ∈ {(1.2, 1.1, 1.15), (1.25, 1.15, 1.15)}"


def _best(**changes: object) -> BestTriple:
    fields: dict[str, object] = {
        "coefficients": Coefficients(1.25, 1.1, 1.15),
        "mean_accuracy": 0.70701,
        "std_accuracy": 0.012,
        "n_seeds": 2,
        "flops_ratio_nominal": 2.0003,
        "flops_ratio_measured": 2.5712,
        "params": 9_109_994,
        "resolution_px": 258,
        "n_candidates": 5,
        "members": (PAPER, Coefficients(1.25, 1.1, 1.15)),
        "test_accuracy": 0.69,
        "n_test": 2,
        "noise_std": 0.01,
        "noise_df": 5,
        "tied": (),
        "cost_tracking": CostTracking(1.0, 2 / 120, 5),
    }
    fields.update(changes)
    return BestTriple(**fields)  # type: ignore[arg-type]


def test_best_names_the_class_its_b7_span_and_both_accuracies() -> None:
    data, lines = best_view(_best(), base_resolution_px=224, num_classes=1000)
    text = "\n".join(lines)
    assert lines[0] == (
        "best: α=1.25 β=1.1 γ=1.15  validation accuracy 0.7070 ± 0.0120 (2 seeds); test "
        "accuracy 0.6900 over 2 (never used to choose)"
    )
    assert "measured MACs ratio 2.5712 for c = 2 (α·β²·γ² = 2.0003)" in text
    assert "class: α ∈ {1.2, 1.25} with β = 1.1, γ = 1.15 build the same φ = 1 network" in text
    assert "at φ = 7 (B7) the choice changes depth ×3.583–4.768" in text
    assert "accuracy tracks cost" in text  # ρ = 1 over 5 networks, exact p = 1/60
    spread = data["class"]["phi_7"]
    assert spread["depth"] == [round(1.2**7, 6), round(1.25**7, 6)]
    assert data["members"] == [[1.2, 1.1, 1.15], [1.25, 1.1, 1.15]]
    assert "closest to c" in data["class"]["representative_rule"]


def test_a_study_chosen_on_test_says_so_and_a_lone_triple_has_no_span() -> None:
    best = _best(chosen_on="test", members=(Coefficients(1.25, 1.1, 1.15),), n_test=0,
                 test_accuracy=math.nan, tied=None, cost_tracking=None)  # fmt: skip
    _, lines = best_view(best, base_resolution_px=224, num_classes=1000)
    text = "\n".join(lines)
    assert "chosen on the test split (recorded before validation splits)" in lines[0]
    assert "test accuracy" not in lines[0]
    assert "no other triple builds this φ = 1 network" in text and "B7" not in text
    assert "tied: not tested" in text and "Spearman" not in text
