"""Does the candidates' accuracy track their measured cost? Spearman's rank correlation over the
full-budget networks (results.BestTriple.cost_tracking), exact for a few networks.

On the nominal constraint α·β²·γ² ≈ c, rounding hands some networks more compute than others at
φ = 1; when accuracy rises with the measured MACs ratio, the search is rewarding that.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

__all__ = ["CostTracking", "cost_tracking"]

_TRACKING_LEVEL = 0.05  # a rank correlation with p below this is reported as tracking cost


@dataclass(frozen=True)
class CostTracking:
    """How full-budget accuracy follows the measured cost: Spearman's rank correlation over the
    candidate networks. Positive and significant: the networks that rounding makes more
    expensive win more often, which a nominal constraint does not see."""

    rho: float
    p_value: float
    n_networks: int

    @property
    def tracks(self) -> bool:
        return self.rho > 0 and self.p_value < _TRACKING_LEVEL

    def to_dict(self) -> dict[str, Any]:
        return {
            "spearman_rho": round(self.rho, 6),
            "p_value": round(self.p_value, 6),
            "n_networks": self.n_networks,
            "accuracy_tracks_cost": self.tracks,
        }


def cost_tracking(ranked: pd.DataFrame) -> CostTracking | None:
    """Spearman's rank correlation of the candidates' mean accuracy with their measured cost;
    None with fewer than three networks or no spread in either."""
    usable = ranked.dropna(subset=["mean_accuracy", "flops_ratio_measured"])
    accuracy = usable["mean_accuracy"].astype(float)
    cost = usable["flops_ratio_measured"].astype(float)
    if len(usable) < 3 or accuracy.nunique() < 2 or cost.nunique() < 2:
        return None
    result = stats.spearmanr(accuracy, cost)
    rho, p_value = float(result.statistic), float(result.pvalue)
    if len(usable) <= _EXACT_UP_TO:
        p_value = _exact_spearman_p(list(accuracy), list(cost), rho)
    return CostTracking(rho, p_value, len(usable))


_EXACT_UP_TO = 8  # networks: below this the t approximation of Spearman's p is far off


def _exact_spearman_p(x: list[float], y: list[float], rho: float) -> float:
    """Two-sided permutation p-value of Spearman's ρ: the share of all pairings of ``y`` with
    ``x`` whose |ρ| is at least the observed one (exact; 8! = 40,320 pairings at most)."""
    ranks_x = stats.rankdata(x)
    ranks_x = ranks_x - ranks_x.mean()
    pairings = np.array(list(itertools.permutations(stats.rankdata(y))))
    pairings = pairings - pairings.mean(axis=1, keepdims=True)
    spread = np.linalg.norm(ranks_x) * np.linalg.norm(pairings, axis=1)
    rhos = pairings @ ranks_x / spread
    return float(np.mean(np.abs(rhos) >= abs(rho) - 1e-12))
