"""Trial workloads for the benchmarks: fixed seconds of real CPU work, as an objective.

``spin`` follows the objective contract of :mod:`scaling_search.objective`; ``tune_spin`` is the
same work as a plain Ray Tune function trainable. Both append "start end" (unix seconds) to the
file named by ``$SCALING_SEARCH_BENCH_LOG``, so a benchmark can tell how long each trial worked.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from typing import Any

SECONDS = float(os.environ.get("SCALING_SEARCH_BENCH_SECONDS", "2.0"))


def _work(alpha: float, beta: float, gamma: float) -> tuple[float, float, float]:
    """Arithmetic for SECONDS of wall time; a smooth score with its top at (1.2, 1.1, 1.15)."""
    start = time.time()
    total = 0.0
    while time.time() - start < SECONDS:
        for step in range(10_000):
            total += math.sin(step * alpha) * beta
    score = 0.9 - (alpha - 1.2) ** 2 - (beta - 1.1) ** 2 - (gamma - 1.15) ** 2 + 0 * total
    return start, time.time(), score


def _log(start: float, end: float) -> None:
    path = os.environ.get("SCALING_SEARCH_BENCH_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as log:
            log.write(f"{start:.6f} {end:.6f}\n")


def spin(point: Mapping[str, Any]) -> dict[str, float]:
    """The objective: one epoch of SECONDS of work."""
    start, end, score = _work(point["alpha"], point["beta"], point["gamma"])
    _log(start, end)
    point["report"](epoch=1, accuracy=score)
    return {"accuracy": score}


def tune_spin(config: dict[str, float]) -> None:
    """The same work as a Ray Tune function trainable."""
    from ray import tune

    start, end, score = _work(config["alpha"], config["beta"], config["gamma"])
    _log(start, end)
    tune.report({"accuracy": score})
