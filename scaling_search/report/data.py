"""What a study's report shows, as data: one ``_get_X_info`` function per figure.

As in Optuna's visualization code, each function here reads a study (or a triple) and returns a
NamedTuple of plain values, tested without drawing; ``scaling_search/report/figures.py`` only draws,
and ``scaling_search/report/publish.py`` puts the figures into a page and into optuna-dashboard.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, cast

import optuna
import pandas as pd
from optuna.trial import TrialState

from scaling_search.network import architecture, count_macs, count_params
from scaling_search.results.family import OFFICIAL_FAMILY, make_family
from scaling_search.results.ranking import (
    BestTriple,
    ResultsError,
    best_triple,
    budget_epochs,
    by_network,
    class_members,
    rank,
    study_product,
    trials_frame,
)
from scaling_search.results.verdict import class_label
from scaling_search.space import Coefficients, log_flops_shares
from scaling_search.study.record import TrialRecord

FULL, EARLY, FAILED, RUNNING = "full budget", "stopped early", "failed", "running"
SHARED = "shares a trained network"  # a triple given the result of its network's training
OUTCOMES = (FULL, EARLY, FAILED, RUNNING, SHARED)
PAPER_TRIPLE = Coefficients(1.2, 1.1, 1.15)  # Tan & Le (2019), §3.3, found on ImageNet
_TOP_K = 10
_FAMILY_PHIS = tuple(range(len(OFFICIAL_FAMILY)))  # φ = 0…7, beside B0…B7


class TrialPoint(NamedTuple):
    """One trained (or training, or failed) trial, placed on the constraint surface."""

    number: int
    outcome: str  # one of OUTCOMES
    coefficients: Coefficients
    seed: int | None
    shares: tuple[float, float, float]  # of log2 nominal FLOPs: depth, width, resolution
    accuracy: float | None  # the trial's last reported accuracy
    flops_ratio_measured: float | None  # MACs after rounding / B0's MACs
    epochs: int
    shared_from: int | None = None  # SHARED: the number of the trial that trained its network
    sharers: int = 0  # trained: how many other triples share its result


class TrialsInfo(NamedTuple):
    """Data of the simplex and the accuracy-vs-MACs figures."""

    study_name: str
    budget_epochs: int
    product: float  # the constraint's c in α·β²·γ² ≈ c
    points: tuple[TrialPoint, ...]
    winner: Coefficients | None  # the winning class's representative; None before any
    winner_class: tuple[Coefficients, ...] = ()  # every triple that builds the winning network


class Curve(NamedTuple):
    number: int
    label: str
    outcome: str
    epochs: tuple[int, ...]
    accuracy: tuple[float, ...]


class CurvesInfo(NamedTuple):
    budget_epochs: int
    curves: tuple[Curve, ...]


class MemberCost(NamedTuple):
    name: str
    phi: float
    params: int
    macs_ratio: float  # MACs / MACs of B0 at the base resolution


class FamilyInfo(NamedTuple):
    """Params and MACs against φ: formula and flops-matched families beside the official one."""

    coefficients: Coefficients
    num_classes: int
    formula: tuple[MemberCost, ...]
    flops_matched: tuple[MemberCost, ...]
    official: tuple[MemberCost, ...]  # B_k at φ = k, MACs relative to B0 at 224 px
    # The formula families of the other triples that build the winner's φ = 1 network.
    class_formulas: tuple[tuple[MemberCost, ...], ...] = ()


class Candidate(NamedTuple):
    """One network of the top table, named by its class's representative."""

    coefficients: Coefficients
    mean_accuracy: float
    std_accuracy: float  # sample standard deviation over seeds; NaN with one seed
    n_seeds: int
    epochs: int  # the most epochs any of its trials completed
    eligible: bool  # trained for the full budget, so it can win
    flops_ratio_measured: float
    params: int
    members: tuple[Coefficients, ...] = ()  # every triple that builds this network
    test_accuracy: float = math.nan  # mean over seeds; shown, never used to choose


class TopInfo(NamedTuple):
    budget_epochs: int
    candidates: tuple[Candidate, ...]  # full-budget triples, best mean first
    n_eligible: int  # full-budget triples in all


def _outcome(record: TrialRecord, budget: int) -> str | None:
    if record.shared:
        return SHARED if record.state in (TrialState.COMPLETE, TrialState.PRUNED) else None
    if record.state == TrialState.FAIL:
        return None if record.duplicate else FAILED  # a skipped copy
    if record.state == TrialState.RUNNING:
        return RUNNING
    if record.state == TrialState.WAITING:
        return None  # queued, nothing to show yet
    if record.state == TrialState.COMPLETE and (record.epochs_completed or 0) >= budget:
        return FULL
    return EARLY


def _coefficients(record: TrialRecord) -> Coefficients | None:
    # Drawn from what the driver recorded: a queued trial's parameters are not yet a triple.
    return record.coefficients if record.triple_recorded else None


def _winner(study: optuna.Study) -> BestTriple | None:
    try:
        return best_triple(study)
    except ResultsError:
        return None


def _get_trials_info(study: optuna.Study, best: BestTriple | None = None) -> TrialsInfo:
    budget = budget_epochs(study)
    best = best or _winner(study)
    trials = study.get_trials(deepcopy=False)
    records = [TrialRecord.of(trial) for trial in trials]
    sharers: dict[int, int] = {}
    for record in records:
        if record.shared_from is not None:
            sharers[record.shared_from] = sharers.get(record.shared_from, 0) + 1
    points = []
    for trial, record in zip(trials, records, strict=True):
        outcome, coefficients = _outcome(record, budget), _coefficients(record)
        if outcome is None or coefficients is None:
            continue
        last = trial.value
        if last is None and trial.intermediate_values:
            last = trial.intermediate_values[max(trial.intermediate_values)]
        points.append(
            TrialPoint(
                number=trial.number,
                outcome=outcome,
                coefficients=coefficients,
                seed=record.seed,
                shares=log_flops_shares(coefficients),
                accuracy=None if outcome == FAILED or last is None else float(last),
                flops_ratio_measured=record.flops_ratio_measured,
                epochs=record.epochs_completed or 0,
                shared_from=record.shared_from,
                sharers=sharers.get(trial.number, 0),
            )
        )
    return TrialsInfo(
        study.study_name,
        budget,
        study_product(study),
        tuple(points),
        None if best is None else best.coefficients,
        () if best is None else best.members,
    )


def _get_curves_info(study: optuna.Study) -> CurvesInfo:
    """One learning curve per trial that trained (a copy of a result repeats its source's)."""
    budget = budget_epochs(study)
    curves = []
    for trial in study.get_trials(deepcopy=False):
        record = TrialRecord.of(trial)
        outcome, coefficients = _outcome(record, budget), _coefficients(record)
        if outcome in (None, SHARED) or coefficients is None or not trial.intermediate_values:
            continue
        steps = sorted(trial.intermediate_values)
        seed = record.seed
        curves.append(
            Curve(
                number=trial.number,
                label=f"#{trial.number} {coefficients.label()} seed {seed}",
                outcome=outcome,
                epochs=tuple(steps),
                accuracy=tuple(float(trial.intermediate_values[step]) for step in steps),
            )
        )
    return CurvesInfo(budget, tuple(curves))


def _official_costs(base_macs: int, num_classes: int) -> tuple[MemberCost, ...]:
    costs = []
    for k, official in enumerate(OFFICIAL_FAMILY):
        arch = architecture(width=official.width, depth=official.depth, num_classes=num_classes)
        macs = count_macs(arch, resolution_px=official.resolution_px)
        costs.append(MemberCost(official.name, float(k), count_params(arch), macs / base_macs))
    return tuple(costs)


def _get_family_info(
    coefficients: Coefficients,
    *,
    base_resolution_px: int,
    num_classes: int,
    members: tuple[Coefficients, ...] = (),
) -> FamilyInfo:
    """The family of ``coefficients``; ``members``: the triples of its class, whose formula
    families are drawn beside it (what choosing among them changes)."""

    def costs(
        mode: str, base_macs: int, triple: Coefficients = coefficients
    ) -> tuple[MemberCost, ...]:
        family = make_family(
            triple,
            mode=mode,
            phis=_FAMILY_PHIS,
            base_resolution_px=base_resolution_px,
            num_classes=num_classes,
        )
        return tuple(
            MemberCost(m.name, m.phi, m.params, m.macs / base_macs) for m in family.members
        )

    b0 = architecture(width=1.0, depth=1.0, num_classes=num_classes)
    base_macs = count_macs(b0, resolution_px=base_resolution_px)
    official_base = count_macs(b0, resolution_px=OFFICIAL_FAMILY[0].resolution_px)
    return FamilyInfo(
        coefficients=coefficients,
        num_classes=num_classes,
        formula=costs("formula", base_macs),
        flops_matched=costs("flops-matched", base_macs),
        official=_official_costs(official_base, num_classes),
        class_formulas=tuple(
            costs("formula", base_macs, member) for member in members if member != coefficients
        ),
    )


def _get_top_info(study: optuna.Study, k: int = _TOP_K) -> TopInfo:
    """The best ``k`` networks: full-budget ones by mean accuracy, then those only stopped
    early; each named by its class's representative, with the class's triples."""
    budget, product = budget_epochs(study), study_product(study)
    frame = trials_frame(study)
    last = {  # a trial stopped early has no value; its last reported accuracy stands in
        t.number: t.intermediate_values[max(t.intermediate_values)]
        for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
        if t.intermediate_values
    }
    stopped = frame["number"].isin(list(last))
    frame.loc[stopped, "accuracy"] = frame.loc[stopped, "number"].map(last)
    ranked = rank(frame, epochs=budget, product=product)
    ranked["eligible"] = True
    # Trials the driver recorded (a network, epochs, costs); copies of a result are not trained.
    recorded = frame["network_key"].notna() & frame["epochs_completed"].notna()
    trained = frame[~frame["shared"].astype(bool) & recorded & frame["params"].notna()]
    scored = trained[trained["state"].isin(["COMPLETE", "PRUNED"]) & trained["accuracy"].notna()]
    early = scored[~scored["network_key"].isin(ranked["network_key"])]
    if not early.empty:
        grouped = by_network(early, product=product, members=class_members(frame))
        grouped["eligible"] = False
        ordered = grouped.sort_values("mean_accuracy", ascending=False, kind="mergesort")
        ranked = ordered if ranked.empty else pd.concat([ranked, ordered], ignore_index=True)
    most = scored.groupby("network_key")["epochs_completed"].max().to_dict()
    rows = cast(list[dict[str, Any]], ranked.head(k).to_dict("records"))
    candidates = tuple(
        Candidate(
            coefficients=Coefficients(float(row["alpha"]), float(row["beta"]), float(row["gamma"])),
            mean_accuracy=float(row["mean_accuracy"]),
            std_accuracy=float(row["std_accuracy"]),
            n_seeds=int(row["n_seeds"]),
            epochs=int(most[row["network_key"]]),
            eligible=bool(row["eligible"]),
            flops_ratio_measured=float(row["flops_ratio_measured"]),
            params=int(row["params"]),
            members=tuple(row["members"]),
            test_accuracy=float(row["test_accuracy"]),
        )
        for row in rows
    )
    return TopInfo(budget, candidates, int(ranked["eligible"].sum()))


def mean_spread(candidate: Candidate) -> str:
    """'0.8125 ± 0.0120' (sample std over seeds), or the mean alone with one seed."""
    c = candidate
    if c.n_seeds < 2 or math.isnan(c.std_accuracy):
        return f"{c.mean_accuracy:.4f}"
    return f"{c.mean_accuracy:.4f} ± {c.std_accuracy:.4f}"


def class_cell(candidate: Candidate) -> str:
    """The candidate's class for a table cell: '' alone, else what varies ('α ∈ {1.2, 1.25}')."""
    if len(candidate.members) < 2:
        return ""
    label = class_label(candidate.members)
    return label.split(" with ")[0]


def test_cell(candidate: Candidate) -> str:
    """The mean test accuracy, or '—' where no full-budget trial measured it."""
    return "—" if math.isnan(candidate.test_accuracy) else f"{candidate.test_accuracy:.4f}"
