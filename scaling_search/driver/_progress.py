"""One line per finished trial on the driver's console, and a live view (the CLI's: the
dashboard's figures) kept current."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import optuna
from ray import tune

from scaling_search.driver._search import StudySearch
from scaling_search.driver._trainable import METRIC
from scaling_search.space import Coefficients
from scaling_search.study.record import FAIL_REASON_ATTR

Progress = Callable[[str], None]


class LiveView(Protocol):
    """What a run keeps current as trials report and end, given by its caller (the CLI: the
    dashboard's figures and note, :class:`scaling_search.report.publish.LiveDashboard`). `update` is
    called on Ray Tune's event loop and must return at once; ``force``: the run has ended."""

    def update(self, *, force: bool = False) -> None: ...


# Makes a run's view from its study and its progress lines.
LiveViewFactory = Callable[[optuna.Study, Progress], LiveView]


class NoView:
    """The view of a run whose caller gave none."""

    def __init__(self, study: optuna.Study | None = None, say: Progress | None = None) -> None:
        pass

    def update(self, *, force: bool = False) -> None:
        pass


class ProgressCallback(tune.Callback):
    """One line per finished trial (counts, the best result so far); hands the reason of each
    errored trial to the searcher.

    The best so far is :func:`scaling_search.results.ranking.best_triple` on the study, the same
    rule as ``best``, the report and the dashboard note: the line is written once the searcher has
    recorded the trial (on its recorder thread), so it includes it.
    """

    def __init__(
        self, budget_epochs: int, progress: Progress, searcher: StudySearch, live: LiveView
    ) -> None:
        self._budget, self._say = budget_epochs, progress
        self._searcher, self._live = searcher, live
        self._done = self._failed = 0
        self._last: dict[str, dict[str, Any]] = {}

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        self._last[trial.trial_id] = result
        self._live.update()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = self._last.get(trial.trial_id, {})
        point = _label(trial.config)
        if FAIL_REASON_ATTR in result:
            self._failed += 1
            self._line(trials, trial, f"{point} FAILED: {result[FAIL_REASON_ATTR]}")
            self._live.update()
            return
        self._done += 1
        self._line(
            trials,
            trial,
            f"{point} validation accuracy {result.get(METRIC, float('nan')):.4f} "
            f"after {result.get('epoch', 0)} epoch(s)",
            full_budget=result.get("epoch") == self._budget,
        )
        self._live.update()

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._say(f"{_label(trial.config)} retrying from its last checkpoint: {_reason(trial)}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._failed += 1
        reason = _reason(trial)
        self._searcher.fail(trial.trial_id, reason)
        self._line(trials, trial, f"{_label(trial.config)} FAILED: {reason}")
        self._live.update()

    def _line(
        self, trials: list, finished_trial: Any, event: str, *, full_budget: bool = False
    ) -> None:
        finished = self._done + self._failed
        # Tune still lists the trial that just ended as RUNNING when it calls back.
        running = sum(1 for t in trials if t.status == "RUNNING" and t is not finished_trial)
        head = f"[{finished} done, {running} running, {self._failed} failed] {event}"
        # Only a full-budget result can change the winner.
        self._searcher.after_recorded(
            lambda: self._say(head + self._searcher.best_so_far(refresh=full_budget))
        )


def _reason(trial: Any) -> str:
    """Why a Tune trial errored, in one line: what took its worker away where Ray says so,
    else the last line of the error (the exception, without Ray's traceback)."""
    # Tune writes the error next to the trial first (local_path) and syncs it to storage later.
    local = Path(trial.error_file) if trial.error_file else None
    text = local.read_text(errors="replace") if local and local.is_file() else trial.get_error()
    text = str(text or "")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return worker_lost(text) or (lines[-1] if lines else "unknown error")


def worker_lost(error: str) -> str | None:
    """What took a trial's worker away, from Ray's error text; None for an error that the
    trial raised itself (the last line says that one best)."""
    flat = " ".join(error.split())
    pid = _field(error, "pid")
    which = f"its worker process (pid {pid})" if pid else "its worker process"
    if "running low on memory" in flat:
        return (
            f"{which} was killed by Ray's memory monitor: the node ran low on memory (lower "
            "search.max_concurrent_trials, or raise resources.memory_per_trial)"
        )
    if "owner has died" in flat or "node has crashed" in flat:
        return f"{which} was lost with its Ray node (the node's raylet died or was killed)"
    if "preempted" in flat:
        return f"{which} was lost: its Ray node was preempted"
    if "worker process has died" in flat or "worker died unexpectedly" in flat.lower():
        return (
            f"{which} died without a Python error: killed (SIGKILL, or the kernel's "
            "out-of-memory killer) or crashed (e.g. SIGSEGV)"
        )
    return None


def _field(text: str, name: str) -> str | None:
    """The value of a ``name: value`` line in Ray's actor error text."""
    for line in text.splitlines():
        key, _, value = line.strip().partition(":")
        if key == name and value.strip():
            return value.strip()
    return None


def _label(config: dict[str, Any]) -> str:
    triple = Coefficients(
        config.get("alpha", 1.0), config.get("beta", 1.0), config.get("gamma", 1.0)
    )
    return f"{triple.label()} seed={config.get('seed', 0)}"
