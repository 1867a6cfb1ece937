"""The constrained search space of compound-scaling coefficients (Tan & Le 2019, eq. 3)."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Coefficients"]


@dataclass(frozen=True, order=True)
class Coefficients:
    """Compound-scaling coefficients: depth α, width β, resolution γ, each ≥ 1.

    At φ = 1 the model is α deeper, β wider and takes γ times the base resolution; its FLOPs grow
    by about α·β²·γ² (the paper's constraint sets this to 2).

    >>> round(Coefficients(1.2, 1.1, 1.15).flops_product, 5)
    1.92027
    """

    alpha: float
    beta: float
    gamma: float

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "gamma"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 1.0:
                raise ValueError(f"{name} must be a finite number >= 1, got {value!r}")

    @property
    def flops_product(self) -> float:
        """Nominal FLOPs ratio at φ = 1: α·β²·γ²."""
        return self.alpha * self.beta**2 * self.gamma**2
