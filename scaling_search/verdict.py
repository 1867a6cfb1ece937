"""The winner in words: one text for ``best``, the end of ``run``, the report and the dashboard
note, so that all of them name the same winner and print its numbers the same way.

It says what the winner was chosen on (validation; the test accuracy beside it, never used to
choose), what it costs beside the constraint's c, the class of triples that build the same φ = 1
network with what the choice among them changes at B7, the set tied with it, and whether the
candidates' accuracy tracks their measured cost.
"""

from __future__ import annotations

from typing import Any

from scaling_search.family import ClassSpread, class_spread
from scaling_search.results import BestTriple, class_label, format_accuracy

__all__ = ["REPRESENTATIVE_RULE", "best_view", "class_lines", "tied_lines", "tracking_lines"]

REPRESENTATIVE_RULE = "the member whose α·β²·γ² is closest to c, then the smallest (α, β, γ)"
_SPREAD_PHI = 7  # B7


def best_view(
    best: BestTriple, *, base_resolution_px: int, num_classes: int
) -> tuple[dict[str, Any], list[str]]:
    """The winner as ``best --format json`` writes it and as the lines ``best`` and ``run``
    print: validation mean ± spread beside the test accuracy, the cost beside c, the class of
    triples that build the winning network with what the choice among them changes at B7, the
    tied set and whether accuracy tracks the measured cost."""
    spread = class_spread(
        best.members or (best.coefficients,),
        phi=_SPREAD_PHI,
        base_resolution_px=base_resolution_px,
        num_classes=num_classes,
    )
    data = best.to_dict()
    data["class"] = {
        "label": class_label(best.members or (best.coefficients,)),
        "representative_rule": REPRESENTATIVE_RULE,
        f"phi_{_SPREAD_PHI}": spread.to_dict(),
    }
    accuracy = format_accuracy(best.mean_accuracy, best.std_accuracy, best.n_seeds)
    if best.chosen_on == "validation":
        chosen = f"validation accuracy {accuracy}"
        if best.n_test:
            chosen += (
                f"; test accuracy {best.test_accuracy:.4f} over {best.n_test} "
                "(never used to choose)"
            )
    else:
        chosen = (
            f"accuracy {accuracy}, chosen on the test split (recorded before validation splits)"
        )
    lines = [
        f"best: {best.coefficients.label()}  {chosen}",
        f"  among {best.n_candidates} full-budget network(s); cost: measured MACs ratio "
        f"{best.flops_ratio_measured:.4f} for c = {best.product:g} (α·β²·γ² = "
        f"{best.flops_ratio_nominal:.4f}), params {best.params:,}, {best.resolution_px} px",
        *class_lines(best, spread),
        *tied_lines(data),
        *tracking_lines(best),
    ]
    return data, lines


def class_lines(best: BestTriple, spread: ClassSpread) -> list[str]:
    """The winner's class and, when it has several members, what the choice changes at B7."""
    members = best.members or (best.coefficients,)
    if len(members) < 2:
        return [f"  class: no other triple builds this φ = 1 network ({class_label(members)})"]

    def span(low: float, high: float, fmt: str) -> str:
        return format(low, fmt) if low == high else f"{format(low, fmt)}–{format(high, fmt)}"

    return [
        f"  class: {class_label(members)} build the same φ = 1 network; the search cannot tell "
        f"them apart; exported: {best.coefficients.label()} ({REPRESENTATIVE_RULE})",
        f"  at φ = {spread.phi:g} (B7) the choice changes depth ×{span(*spread.depth, '.3f')}, "
        f"width ×{span(*spread.width, '.3f')}, resolution {span(*spread.resolution_px, 'd')} px, "
        f"MACs {span(spread.macs[0] / 1e9, spread.macs[1] / 1e9, '.2f')} G "
        "(choose another member with `export --coefficients A,B,G`)",
    ]


def tracking_lines(best: BestTriple) -> list[str]:
    """Whether the candidates' accuracy tracks their measured cost (Spearman's ρ)."""
    tracking = best.cost_tracking
    if tracking is None:
        return []
    head = (
        f"  accuracy vs measured cost: Spearman ρ {tracking.rho:+.2f} (p {tracking.p_value:.3f}) "
        f"over {tracking.n_networks} networks"
    )
    if not tracking.tracks:
        return [head]
    return [
        head + ": accuracy tracks cost, so networks that rounding makes more expensive are "
        "favoured; space.cost: measured holds every candidate to c × B0"
    ]


def tied_lines(best: dict[str, Any]) -> list[str]:
    """The tied set of ``best`` (BestTriple.to_dict()) as table lines."""
    if best["tied"] is None:
        return [
            "  tied: not tested (no network has 2 or more seeds to estimate the seed noise; "
            "set search.repeats to 2 or add a racing stage)"
        ]
    head = (
        f"  seed noise: std {best['noise_std']:.4f} pooled over repeated networks "
        f"(df {best['noise_df']}); tied with the winner (two-sided t-test, p >= 0.05): "
        f"{len(best['tied'])}"
    )
    return [head] + [
        f"    α={t['alpha']:g} β={t['beta']:g} γ={t['gamma']:g}  accuracy "
        f"{t['mean_accuracy']:.4f} ({t['n_seeds']} seed{'s' if t['n_seeds'] != 1 else ''})  "
        f"p {t['p_value']:.3f}"
        + (f"  (+{len(t['members']) - 1} triple(s) of its class)" if len(t["members"]) > 1 else "")
        for t in best["tied"]
    ]
