"""The constrained search space of compound-scaling coefficients (Tan & Le 2019, eq. 3).

Points are generated on the constraint α·β²·γ² ≈ c, never checked after a trial has run:

* the paper's **grid**: α, β, γ on a step grid inside their bounds, kept where
  |α·β²·γ² − c| ≤ tolerance;
* **continuous coordinates** for TPE, random and QMC samplers: two numbers u, v in [0, 1] that map
  onto the part of the surface α·β²·γ² = c inside the bounds, so every sample is feasible. With
  shares of log FLOPs a = log_c α, b = 2·log_c β, g = 2·log_c γ (a + b + g = 1), u places a in its
  feasible range and v places b in the range left for it given a; g = 1 − a − b.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna

    from scaling_search.config import SpaceConfig

__all__ = [
    "Candidate",
    "Coefficients",
    "DefineByRun",
    "SimplexCoordinates",
    "SpaceError",
    "describe",
    "grid_candidates",
]

_DECIMALS = 6  # grid values are rounded so that 1.0 + 3 × 0.05 is exactly 1.15


class SpaceError(ValueError):
    """A space that admits no feasible point; the message names the nearest ones."""


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

    def as_tuple(self) -> tuple[float, float, float]:
        return (self.alpha, self.beta, self.gamma)

    def label(self) -> str:
        """Short human form, e.g. 'α=1.20 β=1.10 γ=1.15'."""
        return f"α={self.alpha:.3g} β={self.beta:.3g} γ={self.gamma:.3g}"


def _steps(low: float, high: float, step: float) -> list[float]:
    count = math.floor((high - low) / step + 1e-9)
    return [round(low + k * step, _DECIMALS) for k in range(count + 1)]


def _grid(space: SpaceConfig) -> list[Coefficients]:
    return [
        Coefficients(a, b, g)
        for a in _steps(space.alpha.low, space.alpha.high, space.step)
        for b in _steps(space.beta.low, space.beta.high, space.step)
        for g in _steps(space.gamma.low, space.gamma.high, space.step)
    ]


def grid_candidates(space: SpaceConfig) -> list[Coefficients]:
    """The paper's grid: points on the step grid within ``tolerance`` of the constraint.

    Raises:
        SpaceError: when no grid point is feasible; names the nearest points and their products.

    >>> from scaling_search.config import SpaceConfig
    >>> cands = grid_candidates(SpaceConfig(step=0.05, tolerance=0.1))
    >>> Coefficients(1.2, 1.1, 1.15) in cands
    True
    """
    grid = _grid(space)
    feasible = [c for c in grid if abs(c.flops_product - space.product) <= space.tolerance + 1e-12]
    if not feasible:
        nearest = sorted(grid, key=lambda c: abs(c.flops_product - space.product))[:3]
        shown = ", ".join(
            f"({c.alpha:g}, {c.beta:g}, {c.gamma:g}) with α·β²·γ²={c.flops_product:.4f}"
            for c in nearest
        )
        raise SpaceError(
            f"space.tolerance {space.tolerance:g} admits no grid point with α·β²·γ² near "
            f"{space.product:g} (step {space.step:g}); nearest: {shown}"
        )
    return feasible


class SimplexCoordinates:
    """Maps (u, v) ∈ [0, 1]² onto the feasible part of α·β²·γ² = c within the bounds.

    >>> from scaling_search.config import SpaceConfig
    >>> coords = SimplexCoordinates(SpaceConfig())
    >>> c = coords.to_coefficients(0.3, 0.6)
    >>> round(c.flops_product, 9)
    2.0
    """

    def __init__(self, space: SpaceConfig) -> None:
        self.product = space.product
        log_c = math.log(space.product)
        # Shares of log FLOPs: α = c^a, β = c^(b/2), γ = c^(g/2).
        self._a = (math.log(space.alpha.low) / log_c, math.log(space.alpha.high) / log_c)
        self._b = (2 * math.log(space.beta.low) / log_c, 2 * math.log(space.beta.high) / log_c)
        self._g = (2 * math.log(space.gamma.low) / log_c, 2 * math.log(space.gamma.high) / log_c)
        a_low = max(self._a[0], 1.0 - self._b[1] - self._g[1])
        a_high = min(self._a[1], 1.0 - self._b[0] - self._g[0])
        if a_low > a_high + 1e-12:
            raise SpaceError(
                f"the bounds alpha {space.alpha.low:g}..{space.alpha.high:g}, beta "
                f"{space.beta.low:g}..{space.beta.high:g}, gamma {space.gamma.low:g}.."
                f"{space.gamma.high:g} contain no point with α·β²·γ² = {space.product:g}"
            )
        self._a_range = (a_low, max(a_low, a_high))

    def shares(self, u: float, v: float) -> tuple[float, float, float]:
        """Shares (a, b, g) of log FLOPs spent on depth, width and resolution; they sum to 1."""
        if not (0.0 <= u <= 1.0 and 0.0 <= v <= 1.0):
            raise ValueError(f"coordinates must lie in [0, 1], got u={u!r}, v={v!r}")
        a = self._a_range[0] + u * (self._a_range[1] - self._a_range[0])
        b_low = max(self._b[0], 1.0 - a - self._g[1])
        b_high = max(b_low, min(self._b[1], 1.0 - a - self._g[0]))
        b = b_low + v * (b_high - b_low)
        return a, b, 1.0 - a - b

    def to_coefficients(self, u: float, v: float) -> Coefficients:
        a, b, g = self.shares(u, v)
        c = self.product
        # max(1, ·) only absorbs float error at the lower bounds.
        return Coefficients(max(1.0, c**a), max(1.0, c ** (b / 2)), max(1.0, c ** (g / 2)))


@dataclass(frozen=True)
class Candidate:
    """A point with what it costs: nominal and measured FLOPs ratios, params, pixels."""

    coefficients: Coefficients
    flops_ratio_nominal: float
    flops_ratio_measured: float  # MACs of the scaled B0 / MACs of B0, both after rounding
    params: int
    macs: int
    resolution_px: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "alpha": self.coefficients.alpha,
            "beta": self.coefficients.beta,
            "gamma": self.coefficients.gamma,
            "flops_ratio_nominal": round(self.flops_ratio_nominal, 6),
            "flops_ratio_measured": round(self.flops_ratio_measured, 6),
            "params": self.params,
            "macs": self.macs,
            "resolution_px": self.resolution_px,
        }


def describe(coefficients: Coefficients, *, base_resolution_px: int, num_classes: int) -> Candidate:
    """Cost of the B0 scaled by ``coefficients`` at φ = 1, counted exactly (no training)."""
    from scaling_search.model import architecture, count_macs, count_params

    resolution_px = round(base_resolution_px * coefficients.gamma)
    scaled = architecture(
        width=coefficients.beta, depth=coefficients.alpha, num_classes=num_classes
    )
    base = architecture(width=1.0, depth=1.0, num_classes=num_classes)
    macs = count_macs(scaled, resolution_px=resolution_px)
    return Candidate(
        coefficients=coefficients,
        flops_ratio_nominal=coefficients.flops_product,
        flops_ratio_measured=macs / count_macs(base, resolution_px=base_resolution_px),
        params=count_params(scaled),
        macs=macs,
        resolution_px=resolution_px,
    )


class DefineByRun:
    """The define-by-run function handed to OptunaSearch (a class, so Ray can pickle it).

    Grid trials arrive with α, β, γ and seed fixed by the queue (``Study.enqueue_trial``); the
    call re-checks the constraint so that a point outside the queue is refused, never trained.
    Continuous samplers suggest (u, v) and every pair is feasible. Derived values are stored on
    the trial as user attributes so the dashboard and SQL clients see them.
    """

    def __init__(
        self,
        space: SpaceConfig,
        *,
        sampler: str,
        seeds: Sequence[int],
        base_resolution_px: int,
        num_classes: int,
        seed_attr: bool = False,
    ) -> None:
        if not seeds:
            raise ValueError("seeds must name at least one seed")
        self.space, self.seeds = space, list(seeds)
        # Queued points whose seed is the user attribute "seed", not a parameter (racing: new
        # seeds as a parameter would change its distribution, which Optuna refuses).
        self.seed_attr = seed_attr
        self.base_resolution_px, self.num_classes = base_resolution_px, num_classes
        self.coordinates = None if sampler == "grid" else SimplexCoordinates(space)

    def __call__(self, trial: optuna.trial.BaseTrial) -> dict[str, Any]:
        coefficients, seed = self._suggest(trial)
        candidate = describe(
            coefficients, base_resolution_px=self.base_resolution_px, num_classes=self.num_classes
        )
        for key, value in candidate.to_dict().items():
            trial.set_user_attr(key, value)
        trial.set_user_attr("seed", seed)
        return {
            "alpha": coefficients.alpha,
            "beta": coefficients.beta,
            "gamma": coefficients.gamma,
            "seed": seed,
        }

    def _suggest(self, trial: optuna.trial.BaseTrial) -> tuple[Coefficients, int]:
        space = self.space
        if self.coordinates is None:
            coefficients = Coefficients(
                trial.suggest_float("alpha", space.alpha.low, space.alpha.high),
                trial.suggest_float("beta", space.beta.low, space.beta.high),
                trial.suggest_float("gamma", space.gamma.low, space.gamma.high),
            )
            in_bounds = all(
                bounds.low - 1e-9 <= value <= bounds.high + 1e-9
                for bounds, value in zip(
                    (space.alpha, space.beta, space.gamma), coefficients.as_tuple(), strict=True
                )
            )
            off = abs(coefficients.flops_product - space.product) > space.tolerance + 1e-9
            if off or not in_bounds:
                raise SpaceError(f"grid trial got a point outside the space: {coefficients}")
            if self.seed_attr:
                return coefficients, int(trial.user_attrs["seed"])
            return coefficients, int(trial.suggest_categorical("seed", self.seeds))
        u = trial.suggest_float("depth_coordinate", 0.0, 1.0)
        v = trial.suggest_float("width_coordinate", 0.0, 1.0)
        for name, share in zip(
            ("depth", "width", "resolution"), self.coordinates.shares(u, v), strict=True
        ):
            trial.set_user_attr(f"{name}_share", round(share, 6))
        return self.coordinates.to_coefficients(u, v), self.seeds[0]
