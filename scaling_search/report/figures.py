"""Draw the report's figures from the data of ``scaling_search.report.data`` (nothing is computed
here).

Markers mean the same in every figure: a filled circle coloured by accuracy is a trial trained for
the full budget (it can win); a filled diamond a triple that builds a network already trained and
shares its result; an open grey circle one stopped early (it cannot win); a grey cross a failed
trial; an open grey diamond one still running; a star the winning triple, open stars the other
triples of its class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from scaling_search.report.data import (
    EARLY,
    FAILED,
    FULL,
    PAPER_TRIPLE,
    RUNNING,
    SHARED,
    class_cell,
    mean_spread,
    test_cell,
)
from scaling_search.space import log_flops_shares

if TYPE_CHECKING:
    from scaling_search.report.data import (
        CurvesInfo,
        FamilyInfo,
        TopInfo,
        TrialPoint,
        TrialsInfo,
    )
    from scaling_search.space import Coefficients

__all__ = ["cost_figure", "curves_figure", "family_figure", "simplex_figure", "top_table_figure"]

_COLORSCALE = "Viridis"
_GREY = "#9a9a9a"
_WINNER = "#d62728"
_LAYOUT: dict[str, Any] = {
    "template": "plotly_white",
    "margin": {"l": 60, "r": 30, "t": 60, "b": 50},
    "legend": {"orientation": "h", "yanchor": "bottom", "y": -0.25},
}


def _hover(point: TrialPoint) -> str:
    accuracy = "—" if point.accuracy is None else f"{point.accuracy:.4f}"
    c = point.coefficients
    text = (
        f"trial #{point.number} ({point.outcome})<br>{c.label()} seed {point.seed}<br>"
        f"validation accuracy {accuracy} after {point.epochs} epoch(s)"
    )
    if point.shared_from is not None:
        text += f"<br>builds the network trial #{point.shared_from} trained: its result"
    elif point.sharers:
        text += f"<br>{point.sharers} other triple(s) build this network and share the result"
    return text


def _accuracy_marker(points: list[TrialPoint], lo: float, hi: float) -> dict[str, Any]:
    return {
        "color": [p.accuracy if p.accuracy is not None else lo for p in points],
        "cmin": lo,
        "cmax": hi,
        "colorscale": _COLORSCALE,
        "line": {"width": 0.5, "color": "#333"},
    }


def _marker(outcome: str, points: list[TrialPoint], lo: float, hi: float) -> dict[str, Any]:
    if outcome == SHARED:
        return {**_accuracy_marker(points, lo, hi), "symbol": "diamond", "size": 9}
    if outcome == FAILED:
        return {"symbol": "x", "color": _GREY, "size": 9}
    if outcome == RUNNING:
        return {"symbol": "diamond-open", "color": _GREY, "size": 10}
    if outcome == EARLY:  # dimmed: its accuracy is of a lower fidelity (in the hover text)
        return {"symbol": "circle-open", "color": "#7f7f7f", "size": 10, "line": {"width": 2}}
    return {
        **_accuracy_marker(points, lo, hi),
        "size": 11,
        "colorbar": {"title": {"text": "validation accuracy"}},
    }


def _by_outcome(info: TrialsInfo) -> list[tuple[str, list[TrialPoint], dict[str, Any]]]:
    scored = [p.accuracy for p in info.points if p.outcome == FULL and p.accuracy is not None]
    lo, hi = (min(scored), max(scored)) if scored else (0.0, 1.0)
    groups = []
    for outcome in (FULL, SHARED, EARLY, RUNNING, FAILED):
        points = [p for p in info.points if p.outcome == outcome]
        if points:
            groups.append((outcome, points, _marker(outcome, points, lo, hi)))
    return groups


def simplex_figure(info: TrialsInfo) -> go.Figure:
    """Ternary plot of each trial's shares of log2 FLOPs on depth, width and resolution."""
    figure = go.Figure()
    for outcome, points, marker in _by_outcome(info):
        figure.add_trace(
            go.Scatterternary(
                a=[p.shares[0] for p in points],
                b=[p.shares[1] for p in points],
                c=[p.shares[2] for p in points],
                mode="markers",
                name=f"{outcome} ({len(points)})",
                marker=marker,
                text=[_hover(p) for p in points],
                hoverinfo="text",
            )
        )
    for name, triples, symbol, color in _marks(info):
        shares = [log_flops_shares(triple) for triple in triples]
        figure.add_trace(
            go.Scatterternary(
                a=[s[0] for s in shares], b=[s[1] for s in shares], c=[s[2] for s in shares],
                mode="markers", name=name, hoverinfo="name+text",
                text=[triple.label() for triple in triples],
                marker={"symbol": symbol, "size": 18, "color": color, "line": {"width": 1.5}},
            )
        )  # fmt: skip
    figure.update_layout(
        _LAYOUT,
        title={"text": "Where the FLOPs go: shares of log2(α·β²·γ²) per trial"},
        ternary={
            "aaxis": {"title": {"text": "depth log2 α"}, "min": 0},
            "baxis": {"title": {"text": "width 2·log2 β"}, "min": 0},
            "caxis": {"title": {"text": "resolution 2·log2 γ"}, "min": 0},
        },
    )
    return figure


def _marks(info: TrialsInfo) -> list[tuple[str, list[Coefficients], str, str]]:
    """The triples marked on the simplex: (legend name, triples, marker symbol, colour)."""
    marks = [("paper (ImageNet) 1.2, 1.1, 1.15", [PAPER_TRIPLE], "square-open", "#555")]
    if info.winner is not None:
        others = [m for m in info.winner_class if m != info.winner]
        marks.append((f"winner {info.winner.label()}", [info.winner], "star", _WINNER))
        if others:
            marks.append((f"its class (+{len(others)}, same φ = 1 network)", others,
                          "star-open", _WINNER))  # fmt: skip
    return marks


def cost_figure(info: TrialsInfo) -> go.Figure:
    """Accuracy against the measured MACs ratio to B0 (after rounding channels, repeats, pixels)."""
    figure = go.Figure()
    for outcome, points, marker in _by_outcome(info):
        if outcome in (FAILED, SHARED):
            continue  # no accuracy to place; a copy sits on the trial that trained
        shown = [p for p in points if p.accuracy is not None and p.flops_ratio_measured]
        figure.add_trace(
            go.Scatter(
                x=[p.flops_ratio_measured for p in shown],
                y=[p.accuracy for p in shown],
                mode="markers",
                name=f"{outcome} ({len(shown)})",
                marker={**marker, "color": [p.accuracy for p in shown]}
                if outcome == FULL
                else marker,
                text=[_hover(p) for p in shown],
                hoverinfo="text",
            )
        )
    _add_cost_winners(figure, info)
    figure.add_vline(
        x=info.product,
        line={"dash": "dash", "color": "#555"},
        annotation_text=f"nominal α·β²·γ² = {info.product:g}",
    )
    figure.update_layout(
        _LAYOUT,
        title={"text": "Accuracy against what each network really costs"},
        xaxis={"title": {"text": "measured MACs / B0's MACs (after rounding)"}},
        yaxis={
            "title": {
                "text": f"validation accuracy after {info.budget_epochs} epoch(s) or when stopped"
            }
        },
    )
    return figure


def _add_cost_winners(figure: go.Figure, info: TrialsInfo) -> None:
    """A star on each full-budget trial of the winning class, if any."""
    winners = [p for p in info.points if p.outcome == FULL and p.coefficients in info.winner_class]
    if winners:
        figure.add_trace(
            go.Scatter(
                x=[p.flops_ratio_measured for p in winners],
                y=[p.accuracy for p in winners],
                mode="markers",
                name="winner",
                marker={"symbol": "star", "size": 18, "color": _WINNER},
                hoverinfo="skip",
            )
        )


def curves_figure(info: CurvesInfo) -> go.Figure:
    """Accuracy per epoch for every trial; those stopped early or failed are dimmed."""
    figure = go.Figure()
    shown: set[str] = set()
    for curve in info.curves:
        full = curve.outcome == FULL
        style = (
            {"color": "#1f77b4", "width": 1.6}
            if full
            else {"color": _GREY, "width": 1, "dash": "dot" if curve.outcome == FAILED else None}
        )
        figure.add_trace(
            go.Scatter(
                x=list(curve.epochs),
                y=list(curve.accuracy),
                mode="lines+markers",
                line=style,
                marker={"size": 4},
                opacity=0.85 if full else 0.35,
                name=curve.outcome,
                legendgroup=curve.outcome,
                showlegend=curve.outcome not in shown,
                text=curve.label,
                hoverinfo="text+y",
            )
        )
        shown.add(curve.outcome)
    figure.update_layout(
        _LAYOUT,
        title={"text": f"Learning curves ({len(info.curves)} trials)"},
        xaxis={"title": {"text": "epoch"}, "range": [0.5, max(info.budget_epochs, 1) + 0.5]},
        yaxis={"title": {"text": "validation accuracy"}},
    )
    return figure


def family_figure(info: FamilyInfo) -> go.Figure:
    """Params and MACs against φ for both family modes beside the official B0–B7."""
    figure = make_subplots(
        rows=1, cols=2, subplot_titles=("parameters (millions)", "MACs / B0's MACs (log scale)")
    )
    series = (
        ("formula (eq. 3)", info.formula, "lines+markers", "circle", "#1f77b4"),
        ("flops-matched", info.flops_matched, "lines+markers", "square", "#2ca02c"),
        ("official B0–B7", info.official, "markers", "diamond-open", "#555"),
    )
    for name, members, mode, symbol, color in series:
        for col, values in (
            (1, [m.params / 1e6 for m in members]),
            (2, [m.macs_ratio for m in members]),
        ):
            figure.add_trace(
                go.Scatter(
                    x=[m.phi for m in members], y=values, mode=mode, name=name, legendgroup=name,
                    showlegend=col == 1, marker={"symbol": symbol, "size": 9, "color": color},
                    line={"color": color}, text=[m.name for m in members],
                    hovertemplate="%{text}: φ=%{x:.3f}, %{y:.3g}<extra>" + name + "</extra>",
                ),
                row=1, col=col,
            )  # fmt: skip
    _add_class_formulas(figure, info)
    figure.update_yaxes(type="log", row=1, col=2)
    figure.update_xaxes(title_text="φ")
    figure.update_layout(
        _LAYOUT,
        title={
            "text": f"The family of {info.coefficients.label()} "
            f"({info.num_classes} output classes) against the official B0–B7"
        },
    )
    return figure


def _add_class_formulas(figure: go.Figure, info: FamilyInfo) -> None:
    """Dashed: the formula families of the other triples of the winner's class."""
    for index, members in enumerate(info.class_formulas):
        name = "same φ = 1 network, other triples"
        for col, values in (
            (1, [m.params / 1e6 for m in members]),
            (2, [m.macs_ratio for m in members]),
        ):
            figure.add_trace(
                go.Scatter(
                    x=[m.phi for m in members], y=values, mode="lines", name=name,
                    legendgroup=name, showlegend=col == 1 and index == 0,
                    line={"color": "#1f77b4", "width": 1, "dash": "dash"}, opacity=0.6,
                    hovertemplate="φ=%{x:.3f}, %{y:.3g}<extra>" + name + "</extra>",
                ),
                row=1, col=col,
            )  # fmt: skip


def top_table_figure(info: TopInfo) -> go.Figure:
    """The best networks: mean validation accuracy ± sample std over seeds, test accuracy,
    seeds, epochs, cost; each named by its class's representative, with the class beside."""
    rows = _top_rows(info)
    header = [
        "rank",
        "α",
        "β",
        "γ",
        "class (same network)",
        "validation (mean ± std)",
        "test (never chosen on)",
        "seeds",
        "epochs",
        "MACs ×B0",
        "params (M)",
    ]
    columns = [list(column) for column in zip(*rows, strict=True)] if rows else [[] for _ in header]
    figure = go.Figure(
        go.Table(
            # Relative widths: the class and the accuracies need room on one line.
            columnwidth=[40, 45, 45, 45, 130, 140, 85, 45, 55, 70, 70],
            header={"values": header, "fill": {"color": "#e8eef7"}, "align": "left"},
            cells={"values": columns, "align": "left", "height": 26},
        )
    )
    figure.update_layout(
        margin={"l": 10, "r": 10, "t": 60, "b": 10},
        height=120 + 28 * max(len(rows), 1),
        title={
            "text": f"Top candidates ({info.n_eligible} trained for the full budget; "
            "rank – = stopped early, cannot win)"
        },
    )
    return figure


def _top_rows(info: TopInfo) -> list[tuple[str, ...]]:
    """One row of cells per candidate, best first."""
    return [
        (
            str(rank) if c.eligible else "–",
            f"{c.coefficients.alpha:.4g}",
            f"{c.coefficients.beta:.4g}",
            f"{c.coefficients.gamma:.4g}",
            class_cell(c),
            mean_spread(c),
            test_cell(c),
            str(c.n_seeds),
            f"{c.epochs}/{info.budget_epochs}",
            f"{c.flops_ratio_measured:.3f}",
            f"{c.params / 1e6:.2f}",
        )
        for rank, c in enumerate(info.candidates, start=1)
    ]


def placeholder_figure(text: str) -> go.Figure:
    """An empty plot that says why it is empty."""
    figure = go.Figure()
    figure.add_annotation(text=text, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    figure.update_layout(_LAYOUT, xaxis={"visible": False}, yaxis={"visible": False}, height=250)
    return figure
