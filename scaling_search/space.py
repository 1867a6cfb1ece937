"""The constrained search space of compound-scaling coefficients (Tan & Le 2019, eq. 3), and the
network each triple builds.

Points are generated on the constraint α·β²·γ² ≈ c, never checked after a trial has run: the
paper's **grid** keeps the points of a step grid inside the bounds whose cost is within
``tolerance`` of c; the continuous samplers' coordinates are in :mod:`scaling_search.sampling`.
The cost is the nominal α·β²·γ² or, with ``space.cost: measured``, the MACs ratio of the network
as built (:class:`CostModel`).

At φ = 1 several triples build the same network: :func:`scaled_network` builds a triple's (one
rounding rule for repeats, channels and pixels, shared with the family), :func:`network_key` names
it, :func:`network_classes` groups triples by it, and :func:`representative` picks the one triple
that stands for a class.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from scaling_search.network import (
    B0_RESOLUTION_PX,
    Architecture,
    architecture,
    count_macs,
    count_params,
    scale_resolution,
)

if TYPE_CHECKING:
    from scaling_search.config import Bounds, SpaceConfig

__all__ = [
    "Candidate",
    "Coefficients",
    "CostModel",
    "NetworkKeyFn",
    "SpaceError",
    "compound_scale",
    "describe",
    "grid_candidates",
    "log_flops_shares",
    "network_classes",
    "network_key",
    "representative",
    "scaled_network",
    "triple_key",
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

    def rounded(self) -> Coefficients:
        """The triple to the 6 decimals that the ledger, results and family files keep."""
        return Coefficients(*(round(x, _DECIMALS) for x in self.as_tuple()))

    def label(self) -> str:
        """The one printed form, e.g. 'α=1.2 β=1.1 γ=1.15' (up to 6 significant digits)."""
        return f"α={self.alpha:g} β={self.beta:g} γ={self.gamma:g}"


# --- scaling a triple --------------------------------------------------------------------------


def compound_scale(
    coefficients: Coefficients, phi: float, *, base_resolution_px: int = B0_RESOLUTION_PX
) -> tuple[float, float, int]:
    """Depth, width and resolution at compound coefficient φ (Tan & Le 2019, eq. 3).

    d = α^φ, w = β^φ, r = γ^φ; depth and width are rounded to 6 decimals (the precision family
    files keep, so a file rebuilds the same model) and the resolution to the nearest pixel,
    halves up (:func:`scaling_search.network.scale_resolution`). Trials build their network from
    φ = 1 of this function, so a trial and its family's φ = 1 member are the same network.

    Args:
        coefficients: The triple (α, β, γ).
        phi: The compound coefficient, finite and >= 0.
        base_resolution_px: Input side of the base network in pixels.

    Returns:
        (depth multiplier, width multiplier, resolution in pixels).

    Raises:
        ValueError: If phi is negative, not finite or so large that the result overflows, or
            base_resolution_px < 1.

    >>> paper = Coefficients(1.2, 1.1, 1.15)
    >>> compound_scale(paper, 1)
    (1.2, 1.1, 258)
    >>> compound_scale(paper, 2)
    (1.44, 1.21, 296)
    >>> compound_scale(paper, 0, base_resolution_px=32)
    (1.0, 1.0, 32)
    """
    if isinstance(phi, bool) or not isinstance(phi, (int, float)) or not 0 <= phi < math.inf:
        raise ValueError(f"phi must be a finite number >= 0, got {phi!r}")
    if (
        isinstance(base_resolution_px, bool)
        or not isinstance(base_resolution_px, int)
        or base_resolution_px < 1
    ):
        raise ValueError(f"base_resolution_px must be an integer >= 1, got {base_resolution_px!r}")
    try:
        depth = round(coefficients.alpha**phi, _DECIMALS)
        width = round(coefficients.beta**phi, _DECIMALS)
        resolution_px = scale_resolution(base_resolution_px, coefficients.gamma**phi)
    except (OverflowError, ValueError):
        raise ValueError(f"phi={phi!r} is too large: the scaled model overflows") from None
    if not (math.isfinite(depth) and math.isfinite(width)):
        raise ValueError(f"phi={phi!r} is too large: the scaled model overflows")
    return depth, width, resolution_px


def scaled_network(
    coefficients: Coefficients, *, base_resolution_px: int, num_classes: int, phi: float = 1.0
) -> tuple[Architecture, int]:
    """The network B0 scaled by ``coefficients`` at ``phi`` builds, and its input side in px.

    >>> arch, px = scaled_network(Coefficients(1.2, 1.1, 1.15), base_resolution_px=56,
    ...                           num_classes=10)
    >>> px, [stage.repeats for stage in arch.stages]
    (64, [2, 3, 3, 4, 4, 5, 2])
    """
    depth, width, resolution_px = compound_scale(
        coefficients, phi, base_resolution_px=base_resolution_px
    )
    return architecture(width=width, depth=depth, num_classes=num_classes), resolution_px


def network_key(arch: Architecture, resolution_px: int) -> str:
    """A name for the network a trial trains: everything that tells two scaled B0s apart.

    Two triples with the same key build the same network (same input size, stem, per-stage
    channels and repeats, head and classes), so with the same seed they train to the same
    numbers; the search trains each (key, seed) once.

    >>> arch, px = scaled_network(Coefficients(1.0, 1.0, 1.0), base_resolution_px=224,
    ...                           num_classes=1000)
    >>> network_key(arch, px)
    '224px stem32 repeats1.2.2.3.3.4.1 channels16.24.40.80.112.192.320 head1280 classes1000'
    """
    repeats = ".".join(str(stage.repeats) for stage in arch.stages)
    channels = ".".join(str(stage.out_channels) for stage in arch.stages)
    return (
        f"{resolution_px}px stem{arch.stem_channels} repeats{repeats} channels{channels} "
        f"head{arch.head_channels} classes{arch.num_classes}"
    )


def triple_key(coefficients: Coefficients) -> str:
    """The key of a triple whose network is not known (an objective without a key function, or
    a trial recorded before network keys): every triple its own network."""
    a, b, g = coefficients.rounded().as_tuple()
    return f"triple {a:g},{b:g},{g:g}"


def representative(members: Iterable[Coefficients], product: float) -> Coefficients:
    """The one triple that stands for a class of triples that build the same φ = 1 network.

    The search cannot tell them apart, but their families differ; the rule: the member whose
    α·β²·γ² is closest to the constraint's ``product``, then the smallest (α, β, γ).

    >>> representative([Coefficients(1.2, 1.1, 1.15), Coefficients(1.25, 1.1, 1.15)], 2.0)
    Coefficients(alpha=1.25, beta=1.1, gamma=1.15)
    """
    members = list(members)
    if not members:
        raise ValueError("a class needs at least one member")
    return min(members, key=lambda c: (round(abs(c.flops_product - product), 9), c.as_tuple()))


# --- the grid ----------------------------------------------------------------------------------


def _steps(bounds: Bounds, step: float) -> list[float]:
    return [round(bounds.low + k * step, _DECIMALS) for k in range(bounds.grid_steps(step) + 1)]


def _grid(space: SpaceConfig) -> list[Coefficients]:
    return [
        Coefficients(a, b, g)
        for a in _steps(space.alpha, space.step)
        for b in _steps(space.beta, space.step)
        for g in _steps(space.gamma, space.step)
    ]


class CostModel:
    """What a triple costs under a space's ``cost`` rule, relative to B0 at the base resolution.

    "nominal": α·β²·γ², the paper's constraint. "measured": the MACs ratio of the network the
    triple really builds at φ = 1, once repeats (ceil), channels (multiples of 8) and pixels are
    rounded (:func:`scaling_search.network.count_macs`).
    """

    def __init__(self, space: SpaceConfig, *, base_resolution_px: int, num_classes: int) -> None:
        self.space, self.base_resolution_px, self.num_classes = (
            space,
            base_resolution_px,
            num_classes,
        )
        b0 = architecture(width=1.0, depth=1.0, num_classes=num_classes)
        self._b0_macs = count_macs(b0, resolution_px=base_resolution_px)

    def measured(self, coefficients: Coefficients) -> float:
        arch, px = scaled_network(
            coefficients, base_resolution_px=self.base_resolution_px, num_classes=self.num_classes
        )
        return count_macs(arch, resolution_px=px) / self._b0_macs

    def cost(self, coefficients: Coefficients) -> float:
        """The ratio the space's tolerance applies to."""
        if self.space.cost == "measured":
            return self.measured(coefficients)
        return coefficients.flops_product

    def feasible(self, coefficients: Coefficients, slack: float = 1e-12) -> bool:
        return abs(self.cost(coefficients) - self.space.product) <= self.space.tolerance + slack


def grid_candidates(
    space: SpaceConfig, *, base_resolution_px: int | None = None, num_classes: int = 1000
) -> list[Coefficients]:
    """The paper's grid: points on the step grid within ``tolerance`` of the constraint.

    With ``space.cost`` "nominal" (the paper's way) the tolerance applies to α·β²·γ²; with
    "measured", to the MACs ratio of the network each point builds at ``base_resolution_px``
    (which is then required).

    Raises:
        SpaceError: when no grid point is feasible; names the nearest points and their costs.

    >>> from scaling_search.config import SpaceConfig
    >>> cands = grid_candidates(SpaceConfig(step=0.05, tolerance=0.1))
    >>> Coefficients(1.2, 1.1, 1.15) in cands
    True
    """
    if space.cost == "measured" and base_resolution_px is None:
        raise ValueError("space.cost 'measured' needs the base resolution to count MACs")
    model = CostModel(
        space, base_resolution_px=base_resolution_px or B0_RESOLUTION_PX, num_classes=num_classes
    )
    grid = _grid(space)
    costs = [model.cost(c) for c in grid]
    feasible = [
        c for c, cost in zip(grid, costs, strict=True)
        if abs(cost - space.product) <= space.tolerance + 1e-12
    ]  # fmt: skip
    if not feasible:
        what = "α·β²·γ²" if space.cost == "nominal" else "measured MACs ratio"
        nearest = sorted(zip(grid, costs, strict=True), key=lambda p: abs(p[1] - space.product))
        shown = ", ".join(
            f"({c.alpha:g}, {c.beta:g}, {c.gamma:g}) with {what}={cost:.4f}"
            for c, cost in nearest[:3]
        )
        raise SpaceError(
            f"space.tolerance {space.tolerance:g} admits no grid point with {what} near "
            f"{space.product:g} (step {space.step:g}); nearest: {shown}"
        )
    return feasible


def log_flops_shares(coefficients: Coefficients) -> tuple[float, float, float]:
    """Shares of log(α·β²·γ²) spent on depth, width and resolution; they sum to 1.

    >>> [round(s, 3) for s in log_flops_shares(Coefficients(2.0, 1.0, 1.0))]
    [1.0, 0.0, 0.0]
    """
    parts = (
        math.log(coefficients.alpha),
        2 * math.log(coefficients.beta),
        2 * math.log(coefficients.gamma),
    )
    total = sum(parts)
    if total <= 0:
        return (1 / 3, 1 / 3, 1 / 3)  # B0 itself: no FLOPs spent, no direction
    a, b, _ = (part / total for part in parts)
    return (a, b, 1.0 - a - b)


@dataclass(frozen=True)
class Candidate:
    """A point with what it costs (nominal and measured FLOPs ratios, params, pixels) and the
    key of the network it builds at φ = 1."""

    coefficients: Coefficients
    flops_ratio_nominal: float
    flops_ratio_measured: float  # MACs of the scaled B0 / MACs of B0, both after rounding
    params: int
    macs: int
    resolution_px: int
    network_key: str

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
            "network_key": self.network_key,
        }


def describe(coefficients: Coefficients, *, base_resolution_px: int, num_classes: int) -> Candidate:
    """Cost of the B0 scaled by ``coefficients`` at φ = 1, counted exactly (no training)."""
    scaled, resolution_px = scaled_network(
        coefficients, base_resolution_px=base_resolution_px, num_classes=num_classes
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
        network_key=network_key(scaled, resolution_px),
    )


NetworkKeyFn = Callable[[Coefficients], str]  # names the network a triple builds


def network_classes(
    candidates: Iterable[Coefficients], key: NetworkKeyFn
) -> dict[str, list[Coefficients]]:
    """Candidates grouped by the network they build, in the order first seen."""
    classes: dict[str, list[Coefficients]] = {}
    for coefficients in candidates:
        classes.setdefault(key(coefficients), []).append(coefficients)
    return classes
