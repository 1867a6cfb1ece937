"""Bring your own objective: a study's ``objective: "package.module:function"`` trains its trials.

The function is called once per trial, in the Ray worker, with one mapping:

- ``alpha``, ``beta``, ``gamma``: the trial's triple (floats);
- ``resolution_px``: train.base_resolution_px · γ rounded to the nearest pixel, halves up (the
  one rounding rule: :func:`scaling_search.network.scale_resolution`);
- ``epochs``: the trial's budget (train.epochs); ``seed``: the trial's seed;
- ``report``: call ``report(epoch=..., accuracy=...)`` once per epoch, epochs counted from 1 in
  increasing order, so that a scheduler (ASHA) can stop the trial early.

It returns a mapping with at least ``accuracy`` (a finite number, higher is better): the trial's
**validation** accuracy at its full budget, what trials are compared and chosen on. It may also
return ``test_accuracy``, measured once on a held-out test split: recorded and shown beside the
winner, never used to choose. A study without ``objective`` trains the built-in scaled B0
(:func:`scaling_search.train.fit`); this hook lets users scale their own base network and recipe,
and lets benchmarks plug in fast surrogates.

**One network, one training.** Several triples can build the same network (depth, channels and
pixels are rounded). The study's ``network_key: "package.module:function"`` names a function that
is given ``alpha``, ``beta``, ``gamma`` and ``resolution_px`` and returns what identifies the
network (a string, number, or a list of them); triples with the same key are trained once per
seed and share the result. Without it, no two triples are assumed to build the same network.

An objective keeps no checkpoint: a trial retried after a lost worker starts over, and the epochs
it had reported already are not reported again.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from scaling_search._hooks import ObjectiveError, hook_point, load_function, show
from scaling_search.config import TrainConfig
from scaling_search.data.sources import ImageData
from scaling_search.sampling import ObjectiveNetworkKey
from scaling_search.space import Coefficients
from scaling_search.train import EpochMetrics, Report

__all__ = [
    "Objective",
    "ObjectiveError",
    "ObjectiveFit",
    "ObjectiveNetworkKey",
    "load_objective",
]

Objective = Callable[[Mapping[str, Any]], Mapping[str, Any]]


def load_objective(spec: str) -> Objective:
    """The function that ``spec`` ("package.module:function") names.

    Raises:
        ObjectiveError: the module does not import, or has no such callable.
    """
    return load_function(spec, what="objective")


class ObjectiveFit:
    """The study's objective with :func:`scaling_search.train.fit`'s signature, for the trainable.

    Pickled to the workers by name; each worker imports the function on its first trial.
    """

    def __init__(self, spec: str) -> None:
        self.spec = spec

    def __call__(
        self,
        config: TrainConfig,
        data: ImageData,  # the built-in trainer's data; an objective brings its own
        coefficients: Coefficients,
        *,
        seed: int,
        report: Report | None = None,
        resume: Mapping[str, Any] | None = None,
        device: Any = None,
    ) -> Mapping[str, Any]:
        function = load_objective(self.spec)
        done = int(resume["epoch"]) if resume else 0  # reported by an earlier attempt
        started_at, last = time.time(), time.perf_counter()
        reported: list[int] = []
        final: dict[str, float] = {}

        def report_epoch(*, epoch: int, accuracy: float) -> None:
            nonlocal last
            self._check_epoch(epoch, reported[-1] if reported else 0, config.epochs)
            value = self._accuracy(accuracy, "reported")
            reported.append(epoch)
            now = time.perf_counter()
            metrics = _metrics(epoch, value, now - last, started_at)
            last = now
            if epoch == config.epochs:
                final["seconds"] = metrics.epoch_seconds  # reported with the returned accuracy
            elif epoch > done and report is not None:
                report(metrics, {"epoch": epoch})

        result = function(_point(config, coefficients, seed, report_epoch))
        accuracy, test_accuracy = self._accuracies(result)
        seconds = final.get("seconds", time.perf_counter() - last)
        if report is not None:
            metrics = _metrics(config.epochs, accuracy, seconds, started_at, test_accuracy)
            report(metrics, {"epoch": config.epochs})
        return result

    def _check_epoch(self, epoch: object, previous: int, budget_epochs: int) -> None:
        """An objective reports epochs 1, 2, ... in increasing order, up to its budget."""
        if not isinstance(epoch, int) or not previous < epoch <= budget_epochs:
            raise ObjectiveError(
                f"objective {self.spec!r} reported epoch {epoch!r}; expected an integer "
                f"after {previous} and at most the budget, {budget_epochs}"
            )

    def _accuracies(self, result: object) -> tuple[float, float]:
        """The returned validation and test accuracy (NaN when not given), or ObjectiveError."""
        if not isinstance(result, Mapping) or "accuracy" not in result:
            raise ObjectiveError(
                f"objective {self.spec!r} returned {show(result)}; expected a mapping with "
                "'accuracy'"
            )
        accuracy = self._accuracy(result["accuracy"], "returned accuracy")
        test_accuracy = math.nan
        if result.get("test_accuracy") is not None:
            test_accuracy = self._accuracy(result["test_accuracy"], "returned test_accuracy")
        return accuracy, test_accuracy

    def _accuracy(self, value: object, what: str) -> float:
        number = value if isinstance(value, int | float) and not isinstance(value, bool) else None
        if number is None or not math.isfinite(number):
            raise ObjectiveError(
                f"objective {self.spec!r} {what} {show(value)}; expected a finite number"
            )
        return float(number)


def _point(
    config: TrainConfig, coefficients: Coefficients, seed: int, report: Callable[..., None]
) -> dict[str, Any]:
    """The one mapping an objective is called with (see the module's docstring)."""
    return {
        **hook_point(coefficients, base_resolution_px=config.base_resolution_px),
        "epochs": config.epochs,
        "seed": seed,
        "report": report,
    }


def _metrics(
    epoch: int,
    accuracy: float,
    seconds: float,
    started_at: float,
    test_accuracy: float = math.nan,
) -> EpochMetrics:
    """What the built-in trainer reports per epoch; what an objective does not say is NaN."""
    return EpochMetrics(
        epoch=epoch,
        accuracy=accuracy,
        val_loss=math.nan,
        train_loss=math.nan,
        train_accuracy=math.nan,
        epoch_seconds=seconds,
        images_per_second=math.nan,
        started_at=started_at,
        test_accuracy=test_accuracy,
    )
