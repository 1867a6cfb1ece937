"""Bring your own objective: a study's ``objective: "package.module:function"`` trains its trials.

The function is called once per trial, in the Ray worker, with one mapping:

- ``alpha``, ``beta``, ``gamma``: the trial's triple (floats);
- ``resolution_px``: round(train.base_resolution_px · γ);
- ``epochs``: the trial's budget (train.epochs); ``seed``: the trial's seed;
- ``report``: call ``report(epoch=..., accuracy=...)`` once per epoch, epochs counted from 1 in
  increasing order, so that a scheduler (ASHA) can stop the trial early.

It returns a mapping with at least ``accuracy`` (a finite number, higher is better): the trial's
value at its full budget. A study without ``objective`` trains the built-in scaled B0
(:func:`scaling_search.train.fit`); this hook lets users scale their own base network and recipe,
and lets benchmarks plug in fast surrogates.

An objective keeps no checkpoint: a trial retried after a lost worker starts over, and the epochs
it had reported already are not reported again.
"""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from scaling_search.config import StudyError, TrainConfig
from scaling_search.data import ImageData
from scaling_search.space import Coefficients
from scaling_search.train import EpochMetrics, Report

__all__ = ["Objective", "ObjectiveError", "ObjectiveFit", "load_objective"]

Objective = Callable[[Mapping[str, Any]], Mapping[str, Any]]


class ObjectiveError(StudyError):
    """An objective that cannot be loaded or broke its contract; one line for the user."""


def load_objective(spec: str) -> Objective:
    """The function that ``spec`` ("package.module:function") names.

    Raises:
        ObjectiveError: the module does not import, or has no such callable.
    """
    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ObjectiveError(
            f"objective {spec!r}: no module named {exc.name or module_name!r} "
            "(is it installed, or on PYTHONPATH?)"
        ) from None
    except Exception as exc:
        raise ObjectiveError(
            f"objective {spec!r}: importing {module_name!r} failed: {_first_line(exc)}"
        ) from None
    function = getattr(module, name, None)
    if function is None:
        raise ObjectiveError(f"objective {spec!r}: module {module_name!r} has no {name!r}")
    if not callable(function):
        raise ObjectiveError(
            f"objective {spec!r}: {name!r} is not callable (it is {_show(function)})"
        )
    return function


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
            previous = reported[-1] if reported else 0
            if not isinstance(epoch, int) or not previous < epoch <= config.epochs:
                raise ObjectiveError(
                    f"objective {self.spec!r} reported epoch {epoch!r}; expected an integer "
                    f"after {previous} and at most the budget, {config.epochs}"
                )
            value = self._accuracy(accuracy, "reported")
            reported.append(epoch)
            now = time.perf_counter()
            metrics = _metrics(epoch, value, now - last, started_at)
            last = now
            if epoch == config.epochs:
                final["seconds"] = metrics.epoch_seconds  # reported with the returned accuracy
            elif epoch > done and report is not None:
                report(metrics, {"epoch": epoch})

        point = {
            "alpha": coefficients.alpha,
            "beta": coefficients.beta,
            "gamma": coefficients.gamma,
            "resolution_px": round(config.base_resolution_px * coefficients.gamma),
            "epochs": config.epochs,
            "seed": seed,
            "report": report_epoch,
        }
        result = function(point)
        if not isinstance(result, Mapping) or "accuracy" not in result:
            raise ObjectiveError(
                f"objective {self.spec!r} returned {_show(result)}; expected a mapping with "
                "'accuracy'"
            )
        accuracy = self._accuracy(result["accuracy"], "returned accuracy")
        seconds = final.get("seconds", time.perf_counter() - last)
        if report is not None:
            report(_metrics(config.epochs, accuracy, seconds, started_at), {"epoch": config.epochs})
        return result

    def _accuracy(self, value: object, what: str) -> float:
        number = value if isinstance(value, int | float) and not isinstance(value, bool) else None
        if number is None or not math.isfinite(number):
            raise ObjectiveError(
                f"objective {self.spec!r} {what} {_show(value)}; expected a finite number"
            )
        return float(number)


def _metrics(epoch: int, accuracy: float, seconds: float, started_at: float) -> EpochMetrics:
    """What the built-in trainer reports per epoch; what an objective does not say is NaN."""
    return EpochMetrics(
        epoch=epoch,
        accuracy=accuracy,
        test_loss=math.nan,
        train_loss=math.nan,
        train_accuracy=math.nan,
        epoch_seconds=seconds,
        images_per_second=math.nan,
        started_at=started_at,
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."
