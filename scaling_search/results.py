"""Trials → a pandas frame → the best triple, with honest statistics.

Only trials that COMPLETED the full epoch budget can win: a trial stopped early by a scheduler has
a lower-fidelity accuracy. When a candidate was trained with several seeds it is ranked by its mean
accuracy and reported with the sample standard deviation and the number of seeds.

When the study ran a racing stage (:mod:`scaling_search.racing`), the race decides: the winner is
the raced triple with the best mean, and the triples the search left out of the race rank after
the raced ones (their single runs were the search's best guesses, biased upward by being picked
as the best of many).

The winner comes with the candidates statistically tied with it: those whose mean accuracy a
two-sided t-test at the 5% level cannot tell from the winner's. Seed noise is taken as one
variance for all candidates, pooled over those trained with two or more seeds (degrees of
freedom Σ(nᵢ − 1)), so a candidate run once is still tested against it; with no repeated
candidate there is no estimate of the noise, and no tied set. After a race, only raced triples
are tested.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import optuna
import pandas as pd
from optuna.trial import TrialState
from scipy import stats

from scaling_search.ledger import RACING_STAGE, STAGE_ATTR
from scaling_search.space import Coefficients

__all__ = [
    "TIE_LEVEL",
    "BestTriple",
    "ResultsError",
    "Tied",
    "best_triple",
    "budget_epochs",
    "by_triple",
    "pooled_noise",
    "rank",
    "tied_with_best",
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
    STAGE_ATTR,
)
_KEY = ["alpha", "beta", "gamma"]
TIE_LEVEL = 0.05  # two-sided; a candidate with p ≥ this is tied with the winner


class ResultsError(ValueError):
    """No result can be given yet (e.g. no trial finished its full budget)."""


@dataclass(frozen=True)
class Tied:
    """A candidate that the t-test cannot tell from the winner."""

    coefficients: Coefficients
    mean_accuracy: float
    n_seeds: int
    p_value: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "alpha": self.coefficients.alpha,
            "beta": self.coefficients.beta,
            "gamma": self.coefficients.gamma,
            "mean_accuracy": round(self.mean_accuracy, 6),
            "n_seeds": self.n_seeds,
            "p_value": round(self.p_value, 6),
        }


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
    noise_std: float = math.nan  # pooled seed standard deviation; NaN: no repeated candidate
    noise_df: int = 0  # its degrees of freedom
    tied: tuple[Tied, ...] | None = None  # None: no noise estimate, so no test

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
            "noise_std": None if math.isnan(self.noise_std) else round(self.noise_std, 6),
            "noise_df": self.noise_df,
            "tied": None if self.tied is None else [t.to_dict() for t in self.tied],
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
        for key in _KEY:  # 6 decimals, as the ledger keys points (racing queues rounded ones)
            if row[key] is not None:
                row[key] = round(float(row[key]), 6)
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
    """Full-budget COMPLETE trials grouped by triple, best mean accuracy first; after a racing
    stage, the raced triples first (column ``raced``).

    Ties in mean accuracy go to the cheaper candidate (lower measured FLOPs ratio).
    """
    full = frame[
        (frame["state"] == TrialState.COMPLETE.name)
        & (frame["epochs_completed"].fillna(0) >= epochs)
        & frame["accuracy"].notna()
    ]
    if full.empty:
        return pd.DataFrame(columns=[*_KEY, "mean_accuracy", "std_accuracy", "n_seeds", "raced"])
    grouped = by_triple(full)
    raced = full.loc[full[STAGE_ATTR] == RACING_STAGE].set_index(_KEY).index
    grouped["raced"] = grouped.set_index(_KEY).index.isin(raced)
    ordered = grouped.sort_values(
        ["raced", "mean_accuracy", "flops_ratio_measured"],
        ascending=[False, False, True],
        kind="mergesort",
    )
    return ordered.reset_index(drop=True)


def pooled_noise(ranked: pd.DataFrame) -> tuple[float, int]:
    """Seed standard deviation pooled over candidates with ≥ 2 seeds, and its degrees of freedom
    Σ(nᵢ − 1); (NaN, 0) when no candidate was trained twice."""
    repeated = ranked[ranked["n_seeds"] >= 2]
    df = int((repeated["n_seeds"] - 1).sum())
    if df == 0:
        return math.nan, 0
    variance = float(((repeated["n_seeds"] - 1) * repeated["std_accuracy"] ** 2).sum()) / df
    return math.sqrt(variance), df


def tied_with_best(ranked: pd.DataFrame) -> tuple[Tied, ...] | None:
    """The candidates after the first of ``ranked`` (see :func:`rank`) that a two-sided t-test
    at :data:`TIE_LEVEL`, with the pooled seed noise, cannot tell from it; None without noise."""
    return _tied(ranked, *pooled_noise(ranked))


def _tied(ranked: pd.DataFrame, noise: float, df: int) -> tuple[Tied, ...] | None:
    if df == 0:
        return None
    best, *others = ranked.to_dict("records")
    tied = []
    for row in others:
        if row["raced"] != best["raced"]:
            continue  # after a race, only the raced triples could win
        scale = noise * math.sqrt(1 / best["n_seeds"] + 1 / row["n_seeds"])
        gap = float(best["mean_accuracy"] - row["mean_accuracy"])
        p = 1.0 if gap == 0 else (0.0 if scale == 0 else 2 * stats.t.sf(abs(gap) / scale, df))
        if p >= TIE_LEVEL:
            coefficients = Coefficients(
                float(row["alpha"]), float(row["beta"]), float(row["gamma"])
            )
            tied.append(
                Tied(coefficients, float(row["mean_accuracy"]), int(row["n_seeds"]), float(p))
            )
    return tuple(tied)


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
    noise, noise_df = pooled_noise(ranked)
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
        noise_std=noise,
        noise_df=noise_df,
        tied=_tied(ranked, noise, noise_df),
    )
