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


# --- noisy response surfaces over built networks (bench/search_efficiency.py) ---------------------
#
# A real study scores networks, not triples: two triples that build the same φ = 1 network train
# to the same numbers with the same seed. So each surface is a function of the network a triple
# builds (its realised depth, width and resolution after rounding repeats, channels and pixels),
# plus seed noise drawn from the network and the seed.

NOISE = 0.01  # seed-to-seed standard deviation of a trial's accuracy
BASE_PX = 32  # the benchmark's base resolution (train.base_resolution_px)
SURFACES = {  # name: (the triple whose network is the optimum; curvature)
    "interior": ((1.2, 1.1, 1.15), 2.0),
    "border": ((1.4, 1.05, 1.15), 2.0),  # α at the top of the space
    "flat": ((1.2, 1.1, 1.15), 0.2),  # ten times flatter: many near-ties
}


def realised(alpha: float, beta: float, resolution_px: int) -> tuple[float, float, float]:
    """The network's depth (blocks / B0's 16), width (head channels / 1280) and resolution
    (px / BASE_PX) once rounded, as the built-in trainer builds it at φ = 1."""
    from scaling_search.network import architecture

    arch = architecture(width=round(beta, 6), depth=round(alpha, 6), num_classes=10)
    return arch.num_blocks / 16, arch.head_channels / 1280, resolution_px / BASE_PX


def network(point: Mapping[str, Any]) -> list[object]:
    """The network key function (study ``network_key``): what the surfaces depend on."""
    from scaling_search.network import architecture

    arch = architecture(width=round(point["beta"], 6), depth=round(point["alpha"], 6))
    repeats = [stage.repeats for stage in arch.stages]
    channels = [stage.out_channels for stage in arch.stages]
    return [point["resolution_px"], arch.stem_channels, *repeats, *channels, arch.head_channels]


def true_accuracy_of(surface: str, depth: float, width: float, resolution: float) -> float:
    """The noise-free full-budget accuracy of a network with these realised multipliers."""
    (a, b, g), curvature = SURFACES[surface]
    best = realised(a, b, _px(g))
    return 0.8 - curvature * sum(
        (math.log(x) - math.log(x0)) ** 2
        for x, x0 in zip((depth, width, resolution), best, strict=True)
    )


def true_accuracy(surface: str, alpha: float, beta: float, gamma: float) -> float:
    """The noise-free full-budget accuracy of the network a triple builds."""
    return true_accuracy_of(surface, *realised(alpha, beta, _px(gamma)))


def _px(gamma: float) -> int:
    from scaling_search.network import scale_resolution

    return scale_resolution(BASE_PX, gamma)


def _noisy_run(surface: str, point: Mapping[str, Any]) -> dict[str, float]:
    """Epoch e of a budget E scores true − 0.3·(1 − e/E) plus noise seeded by the network and the
    seed, so that triples of one network score alike."""
    multipliers = realised(point["alpha"], point["beta"], point["resolution_px"])
    final = true_accuracy_of(surface, *multipliers)
    budget, key = point["epochs"], " ".join(map(str, network(point)))
    accuracy = final
    for epoch in range(1, budget + 1):
        rng = random.Random(f"{key} {point['seed']} {epoch}")
        accuracy = final - 0.3 * (1 - epoch / budget) + rng.gauss(0.0, NOISE)
        point["report"](epoch=epoch, accuracy=accuracy)
    return {"accuracy": accuracy}


def interior(point: Mapping[str, Any]) -> dict[str, float]:
    return _noisy_run("interior", point)


def border(point: Mapping[str, Any]) -> dict[str, float]:
    return _noisy_run("border", point)


def flat(point: Mapping[str, Any]) -> dict[str, float]:
    return _noisy_run("flat", point)
