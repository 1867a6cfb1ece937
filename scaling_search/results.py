"""Trials → a pandas frame → the best triple, with honest statistics.

Only trials that COMPLETED the full epoch budget can win: a trial stopped early by a scheduler has
a lower-fidelity accuracy. When a candidate was trained with several seeds it is ranked by its mean
accuracy and reported with the sample standard deviation and the number of seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import optuna
import pandas as pd
from optuna.trial import TrialState

from scaling_search.space import Coefficients

__all__ = [
    "BestTriple",
    "ResultsError",
    "best_triple",
    "budget_epochs",
    "by_triple",
    "rank",
    "trials_frame",
]

_ATTRS = (
    "alpha",
    "beta",
    "gamma",
    "seed",
    "epochs_completed",
    "flops_ratio_nominal",
    "flops_ratio_measured",
    "params",
    "macs",
    "resolution_px",
    "fail_reason",
)
_KEY = ["alpha", "beta", "gamma"]


class ResultsError(ValueError):
    """No result can be given yet (e.g. no trial finished its full budget)."""


@dataclass(frozen=True)
class BestTriple:
    """The winning coefficients and the evidence for them."""

    coefficients: Coefficients
    mean_accuracy: float
    std_accuracy: float  # sample standard deviation over seeds; NaN with one seed
    n_seeds: int
    flops_ratio_nominal: float
    flops_ratio_measured: float
    params: int
    resolution_px: int
    n_candidates: int  # full-budget candidates it was chosen among

    def to_dict(self) -> dict[str, Any]:
        return {
            "alpha": self.coefficients.alpha,
            "beta": self.coefficients.beta,
            "gamma": self.coefficients.gamma,
            "mean_accuracy": round(self.mean_accuracy, 6),
            "std_accuracy": None if math.isnan(self.std_accuracy) else round(self.std_accuracy, 6),
            "n_seeds": self.n_seeds,
            "flops_ratio_nominal": round(self.flops_ratio_nominal, 6),
            "flops_ratio_measured": round(self.flops_ratio_measured, 6),
            "params": self.params,
            "resolution_px": self.resolution_px,
            "n_candidates": self.n_candidates,
        }


def budget_epochs(study: optuna.Study) -> int:
    """The full epoch budget recorded with the study by the driver."""
    try:
        return int(study.user_attrs["study_config"]["train"]["epochs"])
    except (KeyError, TypeError, ValueError):
        raise ResultsError(
            f"study {study.study_name!r} was not created by scaling-search (no recorded budget)"
        ) from None


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: number, state, accuracy, duration and the derived attributes."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        row: dict[str, Any] = {
            "number": trial.number,
            "state": trial.state.name,
            "accuracy": trial.value,
            "duration_s": trial.duration.total_seconds() if trial.duration else None,
        }
        row.update({key: trial.user_attrs.get(key) for key in _ATTRS})
        rows.append(row)
    columns = ["number", "state", "accuracy", "duration_s", *_ATTRS]
    return pd.DataFrame(rows, columns=columns)


def by_triple(frame: pd.DataFrame) -> pd.DataFrame:
    """Trials grouped by (α, β, γ): mean accuracy, its sample std over seeds (NaN with one seed),
    the number of seeds, and the triple's cost columns."""
    return frame.groupby(_KEY, as_index=False).agg(
        mean_accuracy=("accuracy", "mean"),
        std_accuracy=("accuracy", "std"),
        n_seeds=("accuracy", "size"),
        flops_ratio_nominal=("flops_ratio_nominal", "first"),
        flops_ratio_measured=("flops_ratio_measured", "first"),
        params=("params", "first"),
        resolution_px=("resolution_px", "first"),
    )


def rank(frame: pd.DataFrame, *, epochs: int) -> pd.DataFrame:
    """Full-budget COMPLETE trials grouped by triple, best mean accuracy first.

    Ties in mean accuracy go to the cheaper candidate (lower measured FLOPs ratio).
    """
    full = frame[
        (frame["state"] == TrialState.COMPLETE.name)
        & (frame["epochs_completed"].fillna(0) >= epochs)
        & frame["accuracy"].notna()
    ]
    if full.empty:
        return pd.DataFrame(columns=[*_KEY, "mean_accuracy", "std_accuracy", "n_seeds"])
    ordered = by_triple(full).sort_values(
        ["mean_accuracy", "flops_ratio_measured"], ascending=[False, True], kind="mergesort"
    )
    return ordered.reset_index(drop=True)


def best_triple(study: optuna.Study) -> BestTriple:
    """The best full-budget triple of ``study``.

    Raises:
        ResultsError: when no trial has completed the full budget yet.
    """
    epochs = budget_epochs(study)
    ranked = rank(trials_frame(study), epochs=epochs)
    if ranked.empty:
        raise ResultsError(
            f"study {study.study_name!r} has no trial that completed its full budget of "
            f"{epochs} epoch(s) yet"
        )
    top = ranked.iloc[0]
    return BestTriple(
        coefficients=Coefficients(float(top.alpha), float(top.beta), float(top.gamma)),
        mean_accuracy=float(top.mean_accuracy),
        std_accuracy=float(top.std_accuracy),
        n_seeds=int(top.n_seeds),
        flops_ratio_nominal=float(top.flops_ratio_nominal),
        flops_ratio_measured=float(top.flops_ratio_measured),
        params=int(top.params),
        resolution_px=int(top.resolution_px),
        n_candidates=len(ranked),
    )
