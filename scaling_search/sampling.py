"""How a trial's point is chosen: the continuous coordinates and the network keys.

* **Continuous coordinates** for TPE, random and QMC samplers: two numbers u, v in [0, 1] that map
  onto the part of the surface α·β²·γ² = c inside the bounds, so every sample is feasible. With
  shares of log FLOPs a = log_c α, b = 2·log_c β, g = 2·log_c γ (a + b + g = 1), u places a in its
  feasible range and v places b in the range left for it given a; g = 1 − a − b
  (:class:`SimplexCoordinates`). With ``space.cost: measured`` the coordinates map onto the
  triples whose *built* network costs c × B0 within the tolerance instead
  (:class:`MeasuredCoordinates`).
* The define-by-run function that the searcher runs on each Optuna trial, and that records the
  point on it, is :class:`scaling_search.study.define.DefineByRun` (it writes the trial record).
* The network key of a study's triples (:func:`study_network_key`): the built-in trainer's scaled
  B0 (:func:`scaling_search.space.network_key`), or an objective's own ``network_key`` function.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from scaling_search.network import scale_resolution
from scaling_search.space import (
    _DECIMALS,
    Coefficients,
    CostModel,
    NetworkKeyFn,
    SpaceError,
    network_key,
    scaled_network,
    triple_key,
)

if TYPE_CHECKING:
    from scaling_search.config import Bounds, SpaceConfig, StudyConfig

__all__ = [
    "BuiltinNetworkKey",
    "MeasuredCoordinates",
    "ObjectiveNetworkKey",
    "SimplexCoordinates",
    "study_network_key",
]


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


def bounds_of(bounds: Bounds) -> tuple[float, float]:
    return bounds.low, bounds.high


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
        from scaling_search._hooks import (
            ObjectiveError,
            first_line,
            hook_point,
            load_function,
            show,
        )

        function = load_function(self.spec, what="network_key")
        point = hook_point(coefficients, base_resolution_px=self.base_resolution_px)
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


class MeasuredCoordinates(CostModel):
    """(u, v) ∈ [0, 1]² onto the triples whose network, as built at φ = 1, costs ``product`` × B0
    within the tolerance ("measured" cost), for the continuous samplers."""

    def to_coefficients(self, u: float, v: float) -> Coefficients | None:
        """(u, v) ∈ [0, 1]² to a triple whose network costs ``product`` × B0 within the
        tolerance ("measured" cost, for the continuous samplers): u places α (log scale) in the
        range where some β and γ in the bounds can cost that, v places β in the range left for
        that α, and then β and γ move to the nearest pair that does (:meth:`nearest`). Where no
        pair does for that α (whole pixels and channels can jump over the tolerance), the
        nearest α on a 1/100 log grid of the range that has one is taken; None only if none
        has.

        The MACs of a built network grow with α, β and γ alike (repeats, channels and pixels
        are rounded up or to the nearest, never down as a coefficient grows), so each range is
        found by bisection.
        """
        if not (0.0 <= u <= 1.0 and 0.0 <= v <= 1.0):
            raise ValueError(f"coordinates must lie in [0, 1], got u={u!r}, v={v!r}")
        low, high = self.alpha_range()
        nearby = sorted((k / 100 for k in range(101)), key=lambda w: (abs(w - u), w))
        for w in (u, *nearby):
            found = self._at(round(low * (high / low) ** w, _DECIMALS), v)
            if found is not None:
                return found
        return None

    def _at(self, alpha: float, v: float) -> Coefficients | None:
        """v places β in the range where some γ can make (α, β) cost ``product``; then
        :meth:`nearest`."""
        bounds = self.space.beta
        beta_low = self._first(lambda b: self._reaches(alpha, b), bounds.low, bounds.high)
        beta_high = self._last(lambda b: self._fits(alpha, b), bounds.low, bounds.high)
        if beta_low is None or beta_high is None or beta_low > beta_high:
            return None
        return self.nearest(alpha, round(beta_low * (beta_high / beta_low) ** v, _DECIMALS))

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
