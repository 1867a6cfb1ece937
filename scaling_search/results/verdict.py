"""The winner in words: one text for ``best``, the end of ``run``, the report and the dashboard
note, so that all of them name the same winner and print its numbers the same way.

It says what the winner was chosen on (validation; the test accuracy beside it, never used to
choose), what it costs beside the constraint's c, the class of triples that build the same φ = 1
network with what the choice among them changes at B7, the set tied with it, and whether the
candidates' accuracy tracks their measured cost.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, NamedTuple

from scaling_search.network import B0_RESOLUTION_PX
from scaling_search.results.family import make_family
from scaling_search.results.ranking import TIE_LEVEL, BestTriple
from scaling_search.space import Coefficients

__all__ = [
    "REPRESENTATIVE_RULE",
    "ClassSpread",
    "best_view",
    "class_label",
    "class_lines",
    "class_spread",
    "format_accuracy",
    "tied_lines",
    "tracking_lines",
]


def format_accuracy(mean: float, std: float, n_seeds: int) -> str:
    """The one printed form of a mean accuracy: '0.7070 ± 0.0120 (2 seeds)', '0.7070 (1 seed)'.

    >>> format_accuracy(0.70701, 0.012, 2), format_accuracy(0.7, float("nan"), 1)
    ('0.7070 ± 0.0120 (2 seeds)', '0.7000 (1 seed)')
    """
    seeds = f"({n_seeds} seed{'s' if n_seeds != 1 else ''})"
    if n_seeds < 2 or math.isnan(std):
        return f"{mean:.4f} {seeds}"
    return f"{mean:.4f} ± {std:.4f} {seeds}"


def class_label(members: tuple[Coefficients, ...] | list[Coefficients]) -> str:
    """The triples of one class in words: what varies, and what they share.

    >>> class_label([Coefficients(1.2, 1.1, 1.15), Coefficients(1.25, 1.1, 1.15)])
    'α ∈ {1.2, 1.25} with β = 1.1, γ = 1.15'
    >>> class_label([Coefficients(1.2, 1.1, 1.15)])
    'α = 1.2, β = 1.1, γ = 1.15'
    """
    names = ("α", "β", "γ")
    columns = [sorted({m.as_tuple()[i] for m in members}) for i in range(3)]
    varying = [i for i in range(3) if len(columns[i]) > 1]
    fixed = ", ".join(f"{names[i]} = {columns[i][0]:g}" for i in range(3) if i not in varying)
    if not varying:
        return fixed
    if len(varying) == 1:
        i = varying[0]
        values = ", ".join(f"{v:g}" for v in columns[i])
        return f"{names[i]} ∈ {{{values}}}" + (f" with {fixed}" if fixed else "")
    triples = ", ".join(f"({m.alpha:g}, {m.beta:g}, {m.gamma:g})" for m in sorted(members))
    return f"(α, β, γ) ∈ {{{triples}}}"


class ClassSpread(NamedTuple):
    """What the choice among triples that build one φ = 1 network changes at a larger φ: the
    smallest and largest of each member's depth, width, resolution, MACs and params there."""

    phi: float
    depth: tuple[float, float]  # α^φ
    width: tuple[float, float]  # β^φ
    resolution_px: tuple[int, int]
    macs: tuple[int, int]
    params: tuple[int, int]

    def to_dict(self) -> dict[str, object]:
        return {name: list(value) if isinstance(value, tuple) else value
                for name, value in self._asdict().items()}  # fmt: skip


def class_spread(
    members: Iterable[Coefficients],
    *,
    phi: float = 7.0,
    base_resolution_px: int = B0_RESOLUTION_PX,
    num_classes: int = 1000,
) -> ClassSpread:
    """The span, over ``members``, of their family's member at ``phi`` (B7's φ by default).

    The paper's (1.2, 1.1, 1.15) builds the same φ = 1 network as (1.25, 1.1, 1.15), yet at
    φ = 7 their depth multipliers are 1.2⁷ = 3.58 and 1.25⁷ = 4.77.

    >>> spread = class_spread([Coefficients(1.2, 1.1, 1.15), Coefficients(1.25, 1.1, 1.15)])
    >>> spread.depth
    (3.583181, 4.768372)
    """
    scaled = [
        make_family(
            coefficients, phis=[phi], base_resolution_px=base_resolution_px, num_classes=num_classes
        ).members[0]
        for coefficients in members
    ]
    if not scaled:
        raise ValueError("a class needs at least one member")

    def span(values: list[float] | list[int]) -> tuple[Any, Any]:
        return min(values), max(values)

    return ClassSpread(
        phi=float(phi),
        depth=span([m.depth for m in scaled]),
        width=span([m.width for m in scaled]),
        resolution_px=span([m.resolution_px for m in scaled]),
        macs=span([m.macs for m in scaled]),
        params=span([m.params for m in scaled]),
    )


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
    chosen, cost = _accuracy_text(best), _cost_text(best)
    lines = [
        f"best: {best.coefficients.label()}  {chosen}",
        f"  among {best.n_candidates} full-budget network(s); {cost}",
        *class_lines(best, spread),
        *tied_lines(data),
        *tracking_lines(best),
    ]
    return data, lines


def _accuracy_text(best: BestTriple) -> str:
    """The winner's accuracy, and the split it was chosen on."""
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
    return chosen


def _cost_text(best: BestTriple) -> str:
    """What the winner costs: measured (the built-in trainer), else its nominal α·β²·γ²."""
    if best.builtin:
        cost = (
            f"cost: measured MACs ratio {best.flops_ratio_measured:.4f} for c = {best.product:g} "
            f"(α·β²·γ² = {best.flops_ratio_nominal:.4f}), params {best.params:,}, "
            f"{best.resolution_px} px"
        )
    else:  # the objective trains its own networks: what they cost is not the tool's to say
        cost = f"α·β²·γ² = {best.flops_ratio_nominal:.4f} for c = {best.product:g}"
    return cost


def class_lines(best: BestTriple, spread: ClassSpread) -> list[str]:
    """The winner's class and, when it has several members, what the choice changes at B7."""
    members = best.members or (best.coefficients,)
    # A sampler's class holds the triples it happened to sample; the grid's, all of them.
    seen = "" if best.whole_class else " (of the triples sampled; others may build it too)"
    if len(members) < 2:
        return [
            f"  class: no other triple{seen} builds this φ = 1 network ({class_label(members)})"
        ]

    def span(low: float, high: float, fmt: str) -> str:
        return format(low, fmt) if low == high else f"{format(low, fmt)}–{format(high, fmt)}"

    return [
        f"  class: {class_label(members)} build the same φ = 1 network{seen}; the search "
        f"cannot tell them apart; exported: {best.coefficients.label()} ({REPRESENTATIVE_RULE})",
        f"  at φ = {spread.phi:g} (B7) the choice changes depth ×{span(*spread.depth, '.3f')}, "
        f"width ×{span(*spread.width, '.3f')}, resolution {span(*spread.resolution_px, 'd')} px, "
        f"MACs {span(spread.macs[0] / 1e9, spread.macs[1] / 1e9, '.2f')} G "
        "(choose another member: `export STUDY --coefficients A,B,G`)",
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
        f"(df {best['noise_df']}); tied with the winner (two-sided t-test, p >= {TIE_LEVEL:g}): "
        f"{len(best['tied'])}"
    )
    return [head] + [
        f"    α={t['alpha']:g} β={t['beta']:g} γ={t['gamma']:g}  accuracy "
        f"{t['mean_accuracy']:.4f} ({t['n_seeds']} seed{'s' if t['n_seeds'] != 1 else ''})  "
        f"p {t['p_value']:.3f}"
        + (f"  (+{len(t['members']) - 1} triple(s) of its class)" if len(t["members"]) > 1 else "")
        for t in best["tied"]
    ]
