"""Trials → a pandas frame → the best network and its triples, with honest statistics.

**Chosen on validation.** A trial's value is its validation accuracy (images held out of the
training set); the winner, its spread and its ties are all chosen on it. The test split is
evaluated once per full-budget trial and only shown beside the winner, never used to choose. A
study recorded before validation splits is reported as "chosen on the test split".

**Networks, not triples.** Several triples build the same φ = 1 network; it is trained once per
seed and the other triples share its result (:mod:`scaling_search.study.sharing`). Candidates are
ranked by network: its trained trials give the statistics (copies never count twice), and the
triples that build it form its *class*, named by one representative
(:func:`scaling_search.space.representative`: the member whose α·β²·γ² is closest to the
constraint). The search cannot tell a class's members apart, but their families differ.

Only trials that COMPLETED the full epoch budget can win: a trial stopped early by a scheduler has
a lower-fidelity accuracy. A network trained with several seeds is ranked by its mean accuracy and
reported with the sample standard deviation and the number of seeds.

When the study ran a racing stage (:mod:`scaling_search.study.racing`), the race decides: the winner
is the raced network with the best mean, and the networks the search left out of the race rank after
the raced ones (their single runs were the search's best guesses, biased upward by being picked as
the best of many).

The winner comes with the candidates statistically tied with it: those whose mean accuracy a
two-sided t-test at the 5% level cannot tell from the winner's. Seed noise is taken as one
variance for all candidates, pooled over those trained with two or more seeds (degrees of
freedom Σ(nᵢ − 1)), so a candidate run once is still tested against it; with no repeated
candidate there is no estimate of the noise, and no tied set. After a race, only raced networks
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

from scaling_search.results._cost_tracking import CostTracking, cost_tracking
from scaling_search.space import Coefficients, representative
from scaling_search.study import record as rec
from scaling_search.study.record import RACING_STAGE, StudyRecord, TrialRecord

__all__ = [
    "TIE_LEVEL",
    "BestTriple",
    "CostTracking",
    "ResultsError",
    "Tied",
    "best_triple",
    "budget_epochs",
    "by_network",
    "chosen_on",
    "class_members",
    "cost_tracking",
    "pooled_noise",
    "rank",
    "study_product",
    "tied_with_best",
    "trials_frame",
]

# The frame's columns of trial attributes, named as the attributes are (study/record.py).
_COLUMNS = (
    rec.ALPHA_ATTR,
    rec.BETA_ATTR,
    rec.GAMMA_ATTR,
    rec.SEED_ATTR,
    rec.EPOCHS_ATTR,
    rec.FLOPS_NOMINAL_ATTR,
    rec.FLOPS_MEASURED_ATTR,
    rec.PARAMS_ATTR,
    rec.MACS_ATTR,
    rec.RESOLUTION_ATTR,
    rec.TEST_ACCURACY_ATTR,
    rec.FAIL_REASON_ATTR,
    rec.STAGE_ATTR,
)
_TRIPLE = [rec.ALPHA_ATTR, rec.BETA_ATTR, rec.GAMMA_ATTR]
_KEY = rec.NETWORK_ATTR
TIE_LEVEL = 0.05  # two-sided; a candidate with p ≥ this is tied with the winner


class ResultsError(ValueError):
    """No result can be given yet (e.g. no trial finished its full budget)."""


@dataclass(frozen=True)
class Tied:
    """A candidate network that the t-test cannot tell from the winner."""

    coefficients: Coefficients  # its class's representative
    mean_accuracy: float
    n_seeds: int
    p_value: float
    members: tuple[Coefficients, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "alpha": self.coefficients.alpha,
            "beta": self.coefficients.beta,
            "gamma": self.coefficients.gamma,
            "mean_accuracy": round(self.mean_accuracy, 6),
            "n_seeds": self.n_seeds,
            "p_value": round(self.p_value, 6),
            "members": [list(m.as_tuple()) for m in self.members],
        }


@dataclass(frozen=True)
class BestTriple:
    """The winning network, the triple that stands for it, and the evidence for them."""

    coefficients: Coefficients  # the representative of the winning class
    mean_accuracy: float  # validation (or test, for a study recorded before validation splits)
    std_accuracy: float  # sample standard deviation over seeds; NaN with one seed
    n_seeds: int
    flops_ratio_nominal: float
    flops_ratio_measured: float
    params: int
    resolution_px: int
    n_candidates: int  # full-budget networks it was chosen among
    noise_std: float = math.nan  # pooled seed standard deviation; NaN: no repeated candidate
    noise_df: int = 0  # its degrees of freedom
    tied: tuple[Tied, ...] | None = None  # None: no noise estimate, so no test
    members: tuple[Coefficients, ...] = ()  # every triple that builds the winning network
    network_key: str = ""
    test_accuracy: float = math.nan  # mean over the seeds that measured it; never used to choose
    n_test: int = 0
    chosen_on: str = "validation"  # "test": recorded before validation splits
    product: float = 2.0  # the constraint's c
    cost_tracking: CostTracking | None = None  # None: fewer than 3 networks to correlate
    whole_class: bool = True  # members are every triple of the grid's class, not those sampled
    builtin: bool = True  # trained the built-in B0 (False: an objective; cost and px are B0's)

    def to_dict(self) -> dict[str, Any]:
        def number(value: float) -> float | None:
            return None if math.isnan(value) else round(value, 6)

        return {
            "alpha": self.coefficients.alpha,
            "beta": self.coefficients.beta,
            "gamma": self.coefficients.gamma,
            "chosen_on": self.chosen_on,
            "mean_accuracy": round(self.mean_accuracy, 6),
            "std_accuracy": number(self.std_accuracy),
            "n_seeds": self.n_seeds,
            "test_accuracy": number(self.test_accuracy),
            "n_test": self.n_test,
            "product": self.product,
            "flops_ratio_nominal": round(self.flops_ratio_nominal, 6),
            # An objective's networks are its own: the built-in B0's counts would mislead.
            "flops_ratio_measured": round(self.flops_ratio_measured, 6) if self.builtin else None,
            "params": self.params if self.builtin else None,
            "resolution_px": self.resolution_px,
            "network_key": self.network_key,
            "members": [list(m.as_tuple()) for m in self.members],
            "n_candidates": self.n_candidates,
            "noise_std": number(self.noise_std),
            "noise_df": self.noise_df,
            "tied": None if self.tied is None else [t.to_dict() for t in self.tied],
            "cost_tracking": None if self.cost_tracking is None else self.cost_tracking.to_dict(),
            "whole_class": self.whole_class,
        }


def budget_epochs(study: optuna.Study) -> int:
    """The full epoch budget recorded with the study by the driver."""
    epochs = StudyRecord.of(study).budget_epochs
    if epochs is None:
        raise ResultsError(
            f"study {study.study_name!r} was not created by scaling-search (no recorded budget)"
        )
    return epochs


def study_product(study: optuna.Study) -> float:
    """The constraint's c (α·β²·γ² ≈ c) recorded with the study; 2 if it says none."""
    return StudyRecord.of(study).product


def chosen_on(study: optuna.Study) -> str:
    """ "validation", or "test" for a study recorded before trials were chosen on a validation
    split (its trials' values are test accuracies)."""
    return StudyRecord.of(study).chosen_on


def _row(record: TrialRecord) -> dict[str, Any]:
    """A trial's attributes in the frame: α, β, γ to 6 decimals, as the ledger keys points (a
    queued trial's are not yet its own: none); a search trial's stage is none, as recorded."""
    triple = None if record.from_queue else record.coefficients
    alpha, beta, gamma = (None, None, None) if triple is None else triple.as_tuple()
    return {
        rec.ALPHA_ATTR: alpha,
        rec.BETA_ATTR: beta,
        rec.GAMMA_ATTR: gamma,
        rec.SEED_ATTR: record.seed,
        rec.EPOCHS_ATTR: record.epochs_completed,
        rec.FLOPS_NOMINAL_ATTR: record.flops_ratio_nominal,
        rec.FLOPS_MEASURED_ATTR: record.flops_ratio_measured,
        rec.PARAMS_ATTR: record.params,
        rec.MACS_ATTR: record.macs,
        rec.RESOLUTION_ATTR: record.resolution_px,
        rec.TEST_ACCURACY_ATTR: record.test_accuracy,
        rec.FAIL_REASON_ATTR: record.fail_reason,
        rec.STAGE_ATTR: None if record.stage == rec.SEARCH_STAGE else record.stage,
    }


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: number, state, accuracy, duration, the derived attributes, the
    network it trains (``network_key``) and whether it shares another trial's result."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        record = TrialRecord.of(trial)
        row: dict[str, Any] = {
            "number": trial.number,
            "state": trial.state.name,
            "accuracy": trial.value,
            "duration_s": trial.duration.total_seconds() if trial.duration else None,
        }
        row.update(_row(record))
        row[_KEY] = None if record.point is None else record.point[0]
        row["shared"] = record.shared
        rows.append(row)
    columns = ["number", "state", "accuracy", "duration_s", *_COLUMNS, _KEY, "shared"]
    frame = pd.DataFrame(rows, columns=columns)
    frame["test_accuracy"] = pd.to_numeric(frame["test_accuracy"], errors="coerce")
    return frame


def class_members(frame: pd.DataFrame) -> dict[str, tuple[Coefficients, ...]]:
    """The distinct triples that each network key was recorded with, in any trial."""
    known = frame.dropna(subset=[_KEY, *_TRIPLE])
    return {
        str(key): tuple(
            sorted({Coefficients(a, b, g) for a, b, g in group[_TRIPLE].itertuples(index=False)})
        )
        for key, group in known.groupby(_KEY, sort=False)
    }


def by_network(
    frame: pd.DataFrame,
    *,
    product: float = 2.0,
    members: dict[str, tuple[Coefficients, ...]] | None = None,
) -> pd.DataFrame:
    """Trials grouped by network: mean accuracy, its sample std over seeds (NaN with one seed),
    the number of seeds, the mean test accuracy and how many trials measured it, the cost
    columns, the class's triples (``members``: by network key, default those in ``frame``) and
    its representative as ``alpha``, ``beta``, ``gamma``. Pass trained trials only."""
    grouped = frame.groupby(_KEY, as_index=False, sort=False).agg(
        mean_accuracy=("accuracy", "mean"),
        std_accuracy=("accuracy", "std"),
        n_seeds=("accuracy", "size"),
        test_accuracy=("test_accuracy", "mean"),
        n_test=("test_accuracy", "count"),
        flops_ratio_measured=("flops_ratio_measured", "first"),
        params=("params", "first"),
        resolution_px=("resolution_px", "first"),
    )
    return _with_class(grouped, class_members(frame) if members is None else members, product)


def _with_class(
    grouped: pd.DataFrame, members: dict[str, tuple[Coefficients, ...]], product: float
) -> pd.DataFrame:
    grouped["members"] = pd.Series(
        [members.get(str(key), ()) for key in grouped[_KEY]], index=grouped.index, dtype=object
    )
    chosen = [representative(m, product) if m else None for m in grouped["members"]]
    for index, name in enumerate(_TRIPLE):
        grouped[name] = [None if c is None else c.as_tuple()[index] for c in chosen]
    grouped["flops_ratio_nominal"] = [None if c is None else c.flops_product for c in chosen]
    return grouped


def rank(frame: pd.DataFrame, *, epochs: int, product: float = 2.0) -> pd.DataFrame:
    """Full-budget COMPLETE trained trials grouped by network, best mean accuracy first; after a
    racing stage, the raced networks first (column ``raced``). Trials that shared another's
    result only add their triples to the class (``members``).

    Ties in mean accuracy go to the cheaper network (lower measured FLOPs ratio).
    """
    trained = frame[~frame["shared"].astype(bool)]
    full = trained[
        (trained["state"] == TrialState.COMPLETE.name)
        & (trained["epochs_completed"].fillna(0) >= epochs)
        & trained["accuracy"].notna()
        & trained[_KEY].notna()
    ]
    if full.empty:
        columns = [*_TRIPLE, _KEY, "mean_accuracy", "std_accuracy", "n_seeds", "raced", "members"]
        return pd.DataFrame(columns=columns)
    grouped = by_network(full, product=product, members=class_members(frame))
    raced = set(full.loc[full[rec.STAGE_ATTR] == RACING_STAGE, _KEY])
    grouped["raced"] = grouped[_KEY].isin(raced)
    ordered = grouped.sort_values(
        ["raced", "mean_accuracy", "flops_ratio_measured", *_TRIPLE],
        ascending=[False, False, True, True, True, True],
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
            continue  # after a race, only the raced networks could win
        scale = noise * math.sqrt(1 / best["n_seeds"] + 1 / row["n_seeds"])
        gap = float(best["mean_accuracy"] - row["mean_accuracy"])
        p = 1.0 if gap == 0 else (0.0 if scale == 0 else 2 * stats.t.sf(abs(gap) / scale, df))
        if p >= TIE_LEVEL:
            coefficients = Coefficients(*(float(row[name]) for name in _TRIPLE))
            tied.append(
                Tied(
                    coefficients,
                    float(row["mean_accuracy"]),
                    int(row["n_seeds"]),
                    float(p),
                    tuple(row["members"]),
                )
            )
    return tuple(tied)


def best_triple(study: optuna.Study, *, statistics: bool = True) -> BestTriple:
    """The best full-budget network of ``study``, named by its class's representative triple.

    ``statistics=False`` skips the tie test and the cost tracking (``tied`` and
    ``cost_tracking`` are None): the winner alone, as the progress line shows it.

    Raises:
        ResultsError: when no trial has completed its full budget yet.
    """
    epochs = budget_epochs(study)
    product = study_product(study)
    ranked = rank(trials_frame(study), epochs=epochs, product=product)
    if ranked.empty:
        raise ResultsError(
            f"study {study.study_name!r} has no trial that completed its full budget of "
            f"{epochs} epoch(s) yet"
        )
    top = ranked.iloc[0]
    noise, noise_df = pooled_noise(ranked)
    recorded = StudyRecord.of(study)
    builtin = not recorded.objective
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
        tied=_tied(ranked, noise, noise_df) if statistics else None,
        members=tuple(top.members),
        network_key=str(top.network_key),
        test_accuracy=float(top.test_accuracy),
        n_test=int(top.n_test),
        chosen_on=chosen_on(study),
        product=product,
        # The measured cost is the built-in B0's: no word on an objective's own networks.
        cost_tracking=cost_tracking(ranked) if builtin and statistics else None,
        whole_class=recorded.sampler == "grid",
        builtin=builtin,
    )
