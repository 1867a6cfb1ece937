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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from scaling_search.model import (
    B0_RESOLUTION_PX,
    Architecture,
    architecture,
    count_macs,
    count_params,
    scale_resolution,
)

if TYPE_CHECKING:
    import optuna

    from scaling_search.config import Bounds, SpaceConfig, StudyConfig

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
    halves up (:func:`scaling_search.model.scale_resolution`). Trials build their network from
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


def bounds_of(bounds: Bounds) -> tuple[float, float]:
    return bounds.low, bounds.high


class CostModel:
    """What a triple costs under a space's ``cost`` rule, relative to B0 at the base resolution.

    "nominal": α·β²·γ², the paper's constraint. "measured": the MACs ratio of the network the
    triple really builds at φ = 1, once repeats (ceil), channels (multiples of 8) and pixels are
    rounded (:func:`scaling_search.model.count_macs`).
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

    def to_coefficients(self, u: float, v: float) -> Coefficients | None:
        """(u, v) ∈ [0, 1]² to a triple whose network costs ``product`` × B0 within the
        tolerance ("measured" cost, for the continuous samplers): u places α (log scale) in the
        range where some β and γ in the bounds can cost that, v places β in the range left for
        that α, and then β and γ move to the nearest pair that does (:meth:`nearest`). None
        where no pair does for this α.

        The MACs of a built network grow with α, β and γ alike (repeats, channels and pixels
        are rounded up or to the nearest, never down as a coefficient grows), so each range is
        found by bisection.
        """
        if not (0.0 <= u <= 1.0 and 0.0 <= v <= 1.0):
            raise ValueError(f"coordinates must lie in [0, 1], got u={u!r}, v={v!r}")
        space = self.space
        low, high = self.alpha_range()
        alpha = round(low * (high / low) ** u, _DECIMALS)
        beta_low = self._first(lambda b: self._reaches(alpha, b), space.beta.low, space.beta.high)
        beta_high = self._last(lambda b: self._fits(alpha, b), space.beta.low, space.beta.high)
        if beta_low is None or beta_high is None or beta_low > beta_high:
            return None
        beta = round(beta_low * (beta_high / beta_low) ** v, _DECIMALS)
        return self.nearest(alpha, beta)

    def alpha_range(self) -> tuple[float, float]:
        """The α for which some β and γ in the bounds build a network costing ``product`` × B0
        within the tolerance ("measured" cost).

        Raises:
            SpaceError: if there is no such α.
        """
        space = self.space
        a, b = space.alpha, space.beta
        low = self._first(lambda x: self._reaches(x, b.high), a.low, a.high)
        high = self._last(lambda x: self._fits(x, b.low), a.low, a.high)
        if low is None or high is None or low > high:
            cheapest = self.measured(Coefficients(a.low, b.low, space.gamma.low))
            dearest = self.measured(Coefficients(a.high, b.high, space.gamma.high))
            raise SpaceError(
                f"no network in the bounds costs {space.product:g} ± {space.tolerance:g} × B0 "
                f"as built (space.cost: measured): they span {cheapest:.4f} to {dearest:.4f}"
            )
        return low, high

    def _reaches(self, alpha: float, beta: float) -> bool:
        """At the largest γ, the network costs at least product − tolerance."""
        top = Coefficients(alpha, beta, self.space.gamma.high)
        return self.measured(top) >= self.space.product - self.space.tolerance

    def _fits(self, alpha: float, beta: float) -> bool:
        """At the smallest γ, the network costs at most product + tolerance."""
        bottom = Coefficients(alpha, beta, self.space.gamma.low)
        return self.measured(bottom) <= self.space.product + self.space.tolerance

    @staticmethod
    def _first(holds: Callable[[float], bool], low: float, high: float) -> float | None:
        """The smallest x in [low, high] (to 1e-9) where ``holds``, false then true."""
        if holds(low):
            return low
        if not holds(high):
            return None
        while high - low > 1e-9:
            middle = (low + high) / 2
            low, high = (low, middle) if holds(middle) else (middle, high)
        return high

    @staticmethod
    def _last(holds: Callable[[float], bool], low: float, high: float) -> float | None:
        """The largest x in [low, high] (to 1e-9) where ``holds``, true then false."""
        if holds(high):
            return high
        if not holds(low):
            return None
        while high - low > 1e-9:
            middle = (low + high) / 2
            low, high = (middle, high) if holds(middle) else (low, middle)
        return low

    def nearest(self, alpha: float, beta: float) -> Coefficients | None:
        """With α kept: the (β, γ) in the bounds whose network costs ``product`` × B0 within the
        tolerance ("measured" cost), with β as close to ``beta`` as possible (then the cost as
        close to ``product``); None if no β and γ do for this α.

        Whole pixels make the cost jump in γ (at 64 px a stride-2 stack ends in 2×2 maps, at
        65 px in 3×3), so γ alone often cannot close the budget; channels move in steps of 8
        and let β do it. For each pixel count the β that fit form one interval (cost grows with
        β), found by bisection. γ is the value of that pixel count closest to the nominal
        surface α·β²·γ² = product.
        """
        space, base = self.space, self.base_resolution_px
        low_px = scale_resolution(base, space.gamma.low)
        best: tuple[tuple[float, float], Coefficients] | None = None
        for px in range(low_px, scale_resolution(base, space.gamma.high) + 1):
            gamma = self._gamma_for(px, space.gamma.low)
            if gamma is None:
                continue
            fits = self._betas(alpha, gamma)
            if fits is None:
                continue
            chosen = min(max(beta, fits[0]), fits[1])
            nominal = math.sqrt(space.product / (alpha * chosen**2))
            gamma = self._gamma_for(px, nominal) or gamma
            moved = Coefficients(alpha, chosen, gamma)
            if not self.feasible(moved):
                continue
            score = (abs(math.log(chosen / beta)), abs(self.measured(moved) - space.product))
            if best is None or score < best[0]:
                best = (score, moved)
        return None if best is None else best[1]

    def _betas(self, alpha: float, gamma: float) -> tuple[float, float] | None:
        """The β in the bounds (6 decimals) for which (α, β, γ) costs product ± tolerance."""
        space, bounds = self.space, self.space.beta

        def cost(beta: float) -> float:
            return self.measured(Coefficients(alpha, beta, gamma))

        low = self._first(lambda b: cost(b) >= space.product - space.tolerance, *bounds_of(bounds))
        high = self._last(lambda b: cost(b) <= space.product + space.tolerance, *bounds_of(bounds))
        if low is None or high is None:
            return None
        low = min(bounds.high, math.ceil(low * 10**_DECIMALS) / 10**_DECIMALS)
        high = max(bounds.low, math.floor(high * 10**_DECIMALS) / 10**_DECIMALS)
        return (low, high) if low <= high else None

    def _gamma_for(self, px: int, nominal: float) -> float | None:
        """The γ in the bounds that rounds to ``px`` and is closest to ``nominal``."""
        base, bounds = self.base_resolution_px, self.space.gamma
        # [px - 1/2, px + 1/2) / base rounds to px; the upper end itself rounds up.
        low, high = max(bounds.low, (px - 0.5) / base), min(bounds.high, (px + 0.5) / base - 1e-6)
        for gamma in (min(max(nominal, low), high), px / base, low, high):
            gamma = round(gamma, _DECIMALS)
            inside = bounds.low <= gamma <= bounds.high and gamma >= 1.0
            if inside and scale_resolution(base, gamma) == px:
                return gamma
        return None


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


NetworkKeyFn = Callable[[Coefficients], str]


class BuiltinNetworkKey:
    """The network key of the built-in trainer's scaled B0 (a class, so Ray can pickle it)."""

    def __init__(self, *, base_resolution_px: int, num_classes: int) -> None:
        self.base_resolution_px, self.num_classes = base_resolution_px, num_classes

    def __call__(self, coefficients: Coefficients) -> str:
        arch, px = scaled_network(
            coefficients, base_resolution_px=self.base_resolution_px, num_classes=self.num_classes
        )
        return network_key(arch, px)


class ObjectiveNetworkKey:
    """The network key of an objective's triple: the study's ``network_key`` function, or the
    triple itself without one (a class, so Ray can pickle it; the function is imported on first
    use). See :mod:`scaling_search.objective`."""

    _PARTS = (str, int, float)

    def __init__(self, spec: str | None, *, base_resolution_px: int) -> None:
        self.spec, self.base_resolution_px = spec, base_resolution_px

    def __call__(self, coefficients: Coefficients) -> str:
        if self.spec is None:
            return triple_key(coefficients)
        from scaling_search._hooks import ObjectiveError, first_line, load_function, show

        function = load_function(self.spec, what="network_key")
        point = {
            "alpha": coefficients.alpha,
            "beta": coefficients.beta,
            "gamma": coefficients.gamma,
            "resolution_px": compound_scale(
                coefficients, 1, base_resolution_px=self.base_resolution_px
            )[2],
        }
        try:
            value = function(point)
        except Exception as exc:
            raise ObjectiveError(
                f"network_key {self.spec!r} raised {first_line(exc)} for {coefficients.label()}"
            ) from None
        parts = list(value) if isinstance(value, (list, tuple)) else [value]
        if not parts or not all(
            isinstance(part, self._PARTS) and not isinstance(part, bool) for part in parts
        ):
            raise ObjectiveError(
                f"network_key {self.spec!r} returned {show(value)}; expected a string, a "
                "number, or a list of them"
            )
        return "key " + " ".join(str(part) for part in parts)


def study_network_key(study: StudyConfig, num_classes: int) -> NetworkKeyFn:
    """What names the network a triple of ``study`` builds: the built-in scaled B0's key, or
    for an objective its ``network_key`` function (without one, the triple itself)."""
    if study.objective is None:
        return BuiltinNetworkKey(
            base_resolution_px=study.train.base_resolution_px, num_classes=num_classes
        )
    return ObjectiveNetworkKey(study.network_key, base_resolution_px=study.train.base_resolution_px)


def network_classes(
    candidates: Iterable[Coefficients], key: NetworkKeyFn
) -> dict[str, list[Coefficients]]:
    """Candidates grouped by the network they build, in the order first seen."""
    classes: dict[str, list[Coefficients]] = {}
    for coefficients in candidates:
        classes.setdefault(key(coefficients), []).append(coefficients)
    return classes


class DefineByRun:
    """The define-by-run function handed to the searcher (a class, so Ray can pickle it).

    Grid trials arrive with α, β, γ and seed fixed by the queue (``Study.enqueue_trial``); the
    call re-checks the constraint so that a point outside the queue is refused, never trained.
    Continuous samplers suggest (u, v) and every pair is feasible; with ``space.cost``
    "measured", γ is then moved (α and β kept) to where the built network costs ``product``
    times B0, and a pair for which no γ in the bounds does is refused (:class:`SpaceError`).
    Derived values, the network key among them, are stored on the trial as user attributes so
    the dashboard and SQL clients see them.
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
        network_key: NetworkKeyFn | None = None,
    ) -> None:
        if not seeds:
            raise ValueError("seeds must name at least one seed")
        self.space, self.seeds = space, list(seeds)
        # Queued points whose seed is the user attribute "seed", not a parameter (racing: new
        # seeds as a parameter would change its distribution, which Optuna refuses).
        self.seed_attr = seed_attr
        self.base_resolution_px, self.num_classes = base_resolution_px, num_classes
        self.cost = CostModel(space, base_resolution_px=base_resolution_px, num_classes=num_classes)
        self.coordinates = None
        if sampler != "grid":
            self.coordinates = SimplexCoordinates(space)
            if space.cost == "measured":
                self.cost.alpha_range()  # a box with no network costing c is refused here
        self.network_key = network_key or BuiltinNetworkKey(
            base_resolution_px=base_resolution_px, num_classes=num_classes
        )

    def __call__(self, trial: optuna.trial.BaseTrial) -> dict[str, Any]:
        coefficients, seed = self._suggest(trial)
        candidate = describe(
            coefficients, base_resolution_px=self.base_resolution_px, num_classes=self.num_classes
        )
        attrs = {**candidate.to_dict(), "network_key": self.network_key(coefficients)}
        for key, value in attrs.items():
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
            if not in_bounds or not self.cost.feasible(coefficients, slack=1e-9):
                raise SpaceError(f"grid trial got a point outside the space: {coefficients}")
            if self.seed_attr:
                return coefficients, int(trial.user_attrs["seed"])
            return coefficients, int(trial.suggest_categorical("seed", self.seeds))
        u = trial.suggest_float("depth_coordinate", 0.0, 1.0)
        v = trial.suggest_float("width_coordinate", 0.0, 1.0)
        if space.cost == "measured":
            found = self.cost.to_coefficients(u, v)
            if found is None:
                raise SpaceError(
                    f"coordinates ({u:.4f}, {v:.4f}) give no network that costs {space.product:g} "
                    f"± {space.tolerance:g} × B0 once pixels are whole (space.cost: measured)"
                )
            coefficients = found
            shares = log_flops_shares(coefficients)
        else:
            coefficients = self.coordinates.to_coefficients(u, v)
            shares = self.coordinates.shares(u, v)
        for name, share in zip(("depth", "width", "resolution"), shares, strict=True):
            trial.set_user_attr(f"{name}_share", round(share, 6))
        return coefficients, self.seeds[0]
