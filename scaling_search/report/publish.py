"""A study's report: five plotly figures in one offline HTML file, and live in optuna-dashboard.

:func:`write_report` puts the five parts (constraint simplex, accuracy against measured MACs,
learning curves, the family against the official B0–B7, the top candidates) into one
self-contained HTML file: plotly's JavaScript is embedded and nothing is fetched. The figures'
data come from ``scaling_search.report.data`` and are drawn by ``scaling_search.report.figures``.
:func:`publish_live` stores the two search figures and a note with the winner in the study,
where optuna-dashboard shows them; the driver keeps them current through :class:`LiveDashboard`.
"""

from __future__ import annotations

import html
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from scaling_search.report.data import (
    _get_curves_info,
    _get_family_info,
    _get_top_info,
    _get_trials_info,
    class_cell,
    mean_spread,
    test_cell,
)
from scaling_search.results.export import write_text_atomic
from scaling_search.results.ranking import BestTriple, ResultsError, best_triple
from scaling_search.study.ledger import DONE, is_shared
from scaling_search.study.record import StudyRecord
from scaling_search.study.storage import describe_error, unreachable

__all__ = ["LIVE_FIGURES", "PARTS", "LiveDashboard", "publish_live", "report_html", "write_report"]

LIVE_FIGURES = ("constraint-simplex", "accuracy-vs-macs")  # graph ids in optuna-dashboard

# --- in optuna-dashboard ------------------------------------------------------------------------


def publish_live(study: optuna.Study) -> None:
    """Store the simplex and accuracy-vs-MACs figures and a note with the winner in ``study``.

    optuna-dashboard shows them on the study's page; each call replaces the previous ones.
    """
    from optuna_dashboard import save_note, save_plotly_graph_object

    from scaling_search.report import figures as draw

    best = _best(study)
    info = _get_trials_info(study, best)
    for graph_id, figure in zip(
        LIVE_FIGURES, (draw.simplex_figure(info), draw.cost_figure(info)), strict=True
    ):
        save_plotly_graph_object(study, figure, graph_object_id=graph_id)
    save_note(study, _note(study, best))


class LiveDashboard:
    """Keeps the figures and note of :func:`publish_live` current while a study runs.

    :meth:`update` publishes at most once per interval (10 s, or 20 times what the last publish
    took) on a background thread, so that Ray Tune's event loop, which calls it, never waits for
    the figures while a worker waits for its next trial; ``force`` waits for a publish in flight
    and publishes at once. The dashboard is a view: an error here is said once and never stops
    the search.
    """

    def __init__(self, study: optuna.Study, say: Callable[[str], None], interval_s: float = 10.0):
        self._study: optuna.Study | None = study
        self._say, self._interval_s = say, interval_s
        self._next = 0.0
        self._warned = False
        self._thread: threading.Thread | None = None

    # Tune pickles its callbacks (tuner.pkl); the study inside would write the storage URL, and
    # with it a database password, to disk. A copy publishes nothing.
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_study": None, "_thread": None}

    def update(self, *, force: bool = False) -> None:
        if self._study is None:
            return
        if force:
            self.wait()
            self._publish(self._study)
            return
        busy = self._thread is not None and self._thread.is_alive()
        if busy or time.monotonic() < self._next:
            return
        self._thread = threading.Thread(target=self._publish, args=(self._study,), daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Return once no publish is in flight."""
        if self._thread is not None:
            self._thread.join()

    def _publish(self, study: optuna.Study) -> None:
        started = time.monotonic()
        try:
            publish_live(study)
        except Exception as exc:
            # The database away is said once by the run (scaling_search.study.outage); the next
            # publish tries again.
            if not self._warned and not unreachable(exc):
                self._say(f"optuna-dashboard figures not updated: {describe_error(exc)}")
                self._warned = True
        took = time.monotonic() - started
        self._next = time.monotonic() + max(self._interval_s, 20 * took)


def _best(study: optuna.Study) -> BestTriple | None:
    try:
        return best_triple(study)
    except ResultsError:
        return None


def _note(study: optuna.Study, best: BestTriple | None) -> str:
    lines = [f"## scaling-search: {study.study_name}", "", _counts(study) + "."]
    if best is not None:
        lines += ["", "```", *_verdict(study, best), "```"]
    top = _get_top_info(study, k=5).candidates
    if top:
        lines += [
            "",
            f"| rank | α | β | γ | class | {_chosen_word(best)} accuracy | test | seeds | epochs |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {rank if c.eligible else '–'} | {c.coefficients.alpha:g} | {c.coefficients.beta:g} "
            f"| {c.coefficients.gamma:g} | {class_cell(c)} | {mean_spread(c)} "
            f"| {test_cell(c)} | {c.n_seeds} | {c.epochs} |"
            for rank, c in enumerate(top, start=1)
        ]
    lines += ["", "Full report: `scaling-search report STUDY --out report.html`."]
    return "\n".join(lines)


def _chosen_word(best: BestTriple | None) -> str:
    return "validation" if best is None or best.chosen_on == "validation" else "test (chosen on)"


def _verdict(study: optuna.Study, best: BestTriple, num_classes: int | None = None) -> list[str]:
    """The lines ``best`` prints, for the report and the note. The number of classes: given,
    else as the driver recorded it (a study recorded before that: 1000, which only moves the
    B7 MACs of the class's span, by the classifier's share)."""
    from scaling_search.results.verdict import best_view

    recorded = StudyRecord.of(study)
    base_px = recorded.base_resolution_px or 224
    classes = num_classes or recorded.num_classes or 1000
    return best_view(best, base_resolution_px=base_px, num_classes=classes)[1]


# --- the report file ----------------------------------------------------------------------------

PARTS = ("simplex", "cost", "curves", "family", "top")  # element ids of the five parts: part-<name>
_CAPTIONS = {
    "simplex": "Each triple's split of its extra FLOPs (log2 α·β²·γ²) between depth, width and "
    "resolution. Colour: validation accuracy. Diamonds are triples that build a network already "
    "trained and share its result; open grey circles were stopped early and cannot win; grey "
    "crosses failed; the star is the winner, open stars the other triples of its class (same "
    "φ = 1 network, other families), the square the paper's ImageNet triple.",
    "cost": "Validation accuracy against the MACs ratio each trained network really has once "
    "channels, repeats and pixels are rounded; the dashed line is the nominal constraint c.",
    "curves": "Validation accuracy per epoch. Blue: full budget; grey: stopped early (dotted: "
    "failed).",
    "family": "The winner scaled to φ = 0…7 by the formula (α^φ, β^φ, γ^φ) and by matching each "
    "official model's MACs ratio, beside the official EfficientNet-B0…B7; thin dashed lines: the "
    "formula families of the other triples of its class, which the search cannot tell apart.",
    "top": "Full-budget networks ranked by mean validation accuracy over seeds (± sample standard "
    "deviation), each named by its class's representative, with the test accuracy beside it "
    "(never used to choose); then the best of those stopped early.",
}


def _figures(study: optuna.Study, *, base_resolution_px: int, num_classes: int) -> dict[str, Any]:
    from scaling_search.report import figures as draw

    trials = _get_trials_info(study)
    if trials.winner is None:
        family = draw.placeholder_figure("No trial has completed its full budget yet: no family.")
    else:
        family = draw.family_figure(
            _get_family_info(
                trials.winner,
                base_resolution_px=base_resolution_px,
                num_classes=num_classes,
                members=trials.winner_class,
            )
        )
    return {
        "simplex": draw.simplex_figure(trials),
        "cost": draw.cost_figure(trials),
        "curves": draw.curves_figure(_get_curves_info(study)),
        "family": family,
        "top": draw.top_table_figure(_get_top_info(study)),
    }


def report_html(study: optuna.Study, *, base_resolution_px: int, num_classes: int) -> str:
    """The whole report as one HTML document that needs no network (plotly.js inside)."""
    import plotly.io as pio
    from plotly.offline import get_plotlyjs

    figures = _figures(study, base_resolution_px=base_resolution_px, num_classes=num_classes)
    sections = []
    for name in PARTS:
        div = pio.to_html(
            figures[name],
            include_plotlyjs=False,
            full_html=False,
            div_id=f"plot-{name}",
            config={"displaylogo": False, "responsive": True},
        )
        sections.append(
            f'<section id="part-{name}"><p class="caption">{html.escape(_CAPTIONS[name])}</p>'
            f"{div}</section>"
        )
    lines = _summary(study, _best(study), num_classes)
    summary = "\n".join(html.escape(line) for line in lines)
    return _PAGE.format(
        title=html.escape(f"scaling-search report: {study.study_name}"),
        summary=summary,
        plotlyjs=get_plotlyjs(),
        sections="\n".join(sections),
    )


def write_report(
    study: optuna.Study, path: Path, *, base_resolution_px: int, num_classes: int
) -> Path:
    """Write :func:`report_html` to ``path`` (atomically: a half-written report never shows)."""
    text = report_html(study, base_resolution_px=base_resolution_px, num_classes=num_classes)
    return write_text_atomic(path, text)


def _counts(study: optuna.Study) -> str:
    trials = study.get_trials(deepcopy=False)
    trained = [t.state for t in trials if not is_shared(t)]
    shared = sum(1 for t in trials if is_shared(t) and t.state in DONE)
    words = {
        TrialState.COMPLETE: "complete",
        TrialState.PRUNED: "stopped early",
        TrialState.FAIL: "failed",
        TrialState.RUNNING: "running",
        TrialState.WAITING: "queued",
    }
    counts = ", ".join(
        f"{trained.count(state)} {word}" for state, word in words.items() if trained.count(state)
    )
    also = f"; {shared} more triple(s) share a trained network's result" if shared else ""
    return f"{len(trained)} trials ({counts}){also}"


def _summary(study: optuna.Study, best: BestTriple | None, num_classes: int) -> list[str]:
    """The report's first lines: the counts, then the winner as ``best`` prints it."""
    written = f"Written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}."
    if best is None:
        return [f"{_counts(study)}; no full-budget result yet. {written}"]
    return [f"{_counts(study)}. {written}", *_verdict(study, best, num_classes)]


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 1100px; color: #222; }}
section {{ margin: 2rem 0; border-top: 1px solid #ddd; }}
.caption {{ color: #555; font-size: 0.92rem; }}
#summary {{ white-space: pre-wrap; font-size: 0.9rem; }}
</style>
<script type="text/javascript">{plotlyjs}</script>
</head>
<body>
<h1>{title}</h1>
<pre id="summary">{summary}</pre>
{sections}
</body>
</html>
"""
