"""Trial workloads for the benchmarks: fixed seconds of real CPU work, and noisy surfaces.

``spin`` follows the objective contract of :mod:`scaling_search.objective`; ``tune_spin`` is the
same work as a plain Ray Tune function trainable. Both append "start end" (unix seconds) to the
file named by ``$SCALING_SEARCH_BENCH_LOG``, so a benchmark can tell how long each trial worked.
"""

from __future__ import annotations

import math
import os
import random
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


# --- noisy response surfaces with a known optimum (bench/search_efficiency.py) -------------------

NOISE = 0.01  # seed-to-seed standard deviation of a trial's accuracy
SURFACES = {  # name: (optimum α, β, γ; curvature)
    "interior": ((1.2, 1.1, 1.15), 4.0),
    "border": ((1.4, 1.05, 1.15), 4.0),  # α at the top of the space
    "flat": ((1.2, 1.1, 1.15), 0.4),  # ten times flatter: many near-ties
}


def true_accuracy(surface: str, alpha: float, beta: float, gamma: float) -> float:
    """The noise-free accuracy of a triple at the full budget."""
    (a, b, g), curvature = SURFACES[surface]
    return 0.8 - curvature * ((alpha - a) ** 2 + (beta - b) ** 2 + (gamma - g) ** 2)


def _noisy_run(surface: str, point: Mapping[str, Any]) -> dict[str, float]:
    """Epoch e of a budget E scores true − 0.3·(1 − e/E) plus noise, seeded by the trial."""
    a, b, g, seed = point["alpha"], point["beta"], point["gamma"], point["seed"]
    budget = point["epochs"]
    final = true_accuracy(surface, a, b, g)
    accuracy = final
    for epoch in range(1, budget + 1):
        rng = random.Random(f"{a:.6f} {b:.6f} {g:.6f} {seed} {epoch}")
        accuracy = final - 0.3 * (1 - epoch / budget) + rng.gauss(0.0, NOISE)
        point["report"](epoch=epoch, accuracy=accuracy)
    return {"accuracy": accuracy}


def interior(point: Mapping[str, Any]) -> dict[str, float]:
    return _noisy_run("interior", point)


def border(point: Mapping[str, Any]) -> dict[str, float]:
    return _noisy_run("border", point)


def flat(point: Mapping[str, Any]) -> dict[str, float]:
    return _noisy_run("flat", point)
