"""Step 2 of compound scaling: from a fixed (α, β, γ) to a family B1…B7 (Tan & Le 2019, §3.3).

Modes: "formula" takes φ = 1, 2, … literally (eq. 3); "flops-matched" picks, for each published
B_k, the φ whose model costs as many multiply-adds relative to B0 as B_k does (the paper's own
B1…B7 were hand-tuned and sit on no integer φ). scaling_search.results.export writes a family as the
versioned JSON/YAML document that other projects import.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from scaling_search import limits
from scaling_search.network import (
    B0_BN_MOMENTUM,
    B0_RESOLUTION_PX,
    StageShape,
    architecture,
    count_macs,
    count_params,
)
from scaling_search.space import Coefficients, compound_scale

__all__ = [
    "BUDGET_KINDS",
    "FAMILY_MODES",
    "OFFICIAL_FAMILY",
    "Family",
    "FamilyMember",
    "OfficialModel",
    "Recipe",
    "compound_scale",
    "make_family",
    "phi_for_budget",
]

FAMILY_MODES = ("formula", "flops-matched")
BUDGET_KINDS = ("macs", "params")

_DECIMALS = 6  # floats in a family (and its files) carry 6 decimals, so files are stable
_PHI_UNITS = 10**_DECIMALS  # flops-matched φ is searched on the same 1e-6 grid
_DEFAULT_PHIS = (1, 2, 3, 4, 5, 6, 7)
# Neighbourhood scanned around the bisection bracket (±0.02 in steps of 0.001 in φ): it guards
# against a local dip of the MACs curve, which the counters' rounding rules could in principle
# produce, at ~41 cheap evaluations per member.
_SCAN_RADIUS_UNITS = 20_000
_SCAN_STEP_UNITS = 1_000
_MAX_PHI = 1024.0  # flops-matched search gives up beyond this φ
_MAX_BUDGET_PHI = 20  # a budget beyond B7 by this much is a typo (2^20 x B0's FLOPs)
_LARGEST = f"depth or width x{limits.MAX_MULTIPLIER:g}, {limits.MAX_RESOLUTION_PX} px"


@dataclass(frozen=True)
class OfficialModel:
    """One published EfficientNet: its multipliers, input side in pixels and final dropout."""

    name: str
    width: float
    depth: float
    resolution_px: int
    dropout: float


# Tan & Le (2019); values as in the TF reference `efficientnet_builder.efficientnet_params`:
# (width_coefficient, depth_coefficient, resolution, dropout_rate) for b0…b7.
OFFICIAL_FAMILY: tuple[OfficialModel, ...] = (
    OfficialModel("b0", 1.0, 1.0, 224, 0.2),
    OfficialModel("b1", 1.0, 1.1, 240, 0.2),
    OfficialModel("b2", 1.1, 1.2, 260, 0.3),
    OfficialModel("b3", 1.2, 1.4, 300, 0.3),
    OfficialModel("b4", 1.4, 1.8, 380, 0.4),
    OfficialModel("b5", 1.6, 2.2, 456, 0.4),
    OfficialModel("b6", 1.8, 2.6, 528, 0.5),
    OfficialModel("b7", 2.0, 3.1, 600, 0.5),
)


@dataclass(frozen=True)
class FamilyMember:
    """One scaled model of a family, with everything needed to rebuild and budget it.

    `scaling_search.build_model(member)` builds its network and checks that the stated shapes
    and counts are those that width, depth and num_classes give.
    """

    name: str  # "b<k>" at integer φ = k (formula) or B_k's name (flops-matched); else "phi_<φ>"
    phi: float  # the compound coefficient actually used
    width: float  # β^φ
    depth: float  # α^φ
    resolution_px: int  # base · γ^φ to the nearest pixel, halves up (model.scale_resolution)
    num_classes: int  # outputs of the classifier (the family's)
    dropout: float  # before the classifier
    params: int  # model.count_params
    macs: int  # model.count_macs of one image at resolution_px
    stem_channels: int
    head_channels: int
    stages: tuple[StageShape, ...]  # the seven scaled MBConv stages
    stochastic_depth: float = 0.2  # block i of n drops its residual branch at rate sd·i/n
    bn_momentum: float = B0_BN_MOMENTUM  # of BatchNorm's running statistics (PyTorch's sense)


@dataclass(frozen=True)
class Recipe:
    """The regularisation every member states, and `build_model(member)` rebuilds with.

    A family exported from a study states what the search trained its triple with (the study's
    train.dropout, train.stochastic_depth and train.bn_momentum); without a study, the
    reference EfficientNet's: dropout by official model (0.2 for B0 up to 0.5 for B7),
    stochastic depth 0.2 and BN momentum 0.01 (TF's decay 0.99).
    """

    dropout: float | None = None  # None: the official B_k's at φ = k, linear between
    stochastic_depth: float = 0.2
    bn_momentum: float = B0_BN_MOMENTUM


@dataclass(frozen=True)
class Family:
    """A family of models scaled from B0 by one coefficient triple, in the order requested."""

    alpha: float
    beta: float
    gamma: float
    mode: str
    base_resolution_px: int
    num_classes: int
    members: tuple[FamilyMember, ...]

    @property
    def coefficients(self) -> Coefficients:
        """The triple (α, β, γ) the family was scaled by."""
        return Coefficients(self.alpha, self.beta, self.gamma)


def _check_count(name: str, value: object, most: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if most is not None and value > most:
        raise ValueError(f"{name} must be at most {most}, got {value!r}")
    return value


def _check_phi(phi: object) -> float:
    if isinstance(phi, bool) or not isinstance(phi, (int, float)) or not 0 <= phi <= limits.MAX_PHI:
        raise ValueError(
            f"phi must be a number in [0, {limits.MAX_PHI:g}] (B7's is 7), got {phi!r}"
        )
    return float(phi)


def _limit_units(coefficients: Coefficients, base_px: int, most: float) -> int:
    """The largest φ (in 1e-6 units, at most ``most``) whose network is within the bounds of
    scaling_search.limits; one unit inside, so that rounding cannot step over them."""
    alpha, beta, gamma = coefficients.as_tuple()
    within = limits.max_phi(alpha, beta, gamma, base_resolution_px=base_px)
    if within > most:  # infinite where no coefficient grows
        return round(most * _PHI_UNITS)
    return max(0, math.floor(within * _PHI_UNITS) - 1)


def _dropout_at(phi: float) -> float:
    """Official B_k's dropout at φ = k; linear between neighbours; B7's beyond 7."""
    last = len(OFFICIAL_FAMILY) - 1
    if phi >= last:
        return OFFICIAL_FAMILY[last].dropout
    k = math.floor(phi)
    low, high = OFFICIAL_FAMILY[k].dropout, OFFICIAL_FAMILY[k + 1].dropout
    return round(low + (high - low) * (phi - k), _DECIMALS)


def _member(
    name: str,
    phi: float,
    dropout: float,
    coefficients: Coefficients,
    base_px: int,
    classes: int,
    recipe: Recipe = Recipe(),
) -> FamilyMember:
    depth, width, resolution_px = compound_scale(coefficients, phi, base_resolution_px=base_px)
    problem = limits.network_problem(depth, width, resolution_px)
    if problem is not None:
        most = _limit_units(coefficients, base_px, limits.MAX_PHI) / _PHI_UNITS
        raise ValueError(
            f"phi={phi:g} is too large for {coefficients.label()} at {base_px} px: {problem}, "
            f"the largest network this tool builds; phi <= {most:g} stays within"
        )
    arch = architecture(width=width, depth=depth, num_classes=classes)
    return FamilyMember(
        name=name,
        phi=phi,
        width=width,
        depth=depth,
        resolution_px=resolution_px,
        num_classes=classes,
        dropout=dropout if recipe.dropout is None else recipe.dropout,
        stochastic_depth=recipe.stochastic_depth,
        bn_momentum=recipe.bn_momentum,
        params=count_params(arch),
        macs=count_macs(arch, resolution_px=resolution_px),
        stem_channels=arch.stem_channels,
        head_channels=arch.head_channels,
        stages=arch.stages,
    )


def _formula_name(phi: float) -> str:
    return f"b{int(phi)}" if phi.is_integer() else f"phi_{phi:g}"


def _macs(width: float, depth: float, resolution_px: int, classes: int) -> int:
    arch = architecture(width=width, depth=depth, num_classes=classes)
    return count_macs(arch, resolution_px=resolution_px)


def _macs_curve(coefficients: Coefficients, base_px: int, classes: int) -> Callable[[int], float]:
    """φ (in 1e-6 units) -> MACs of the φ-scaled model over those of B0 at the base resolution."""
    base_macs = _macs(1.0, 1.0, base_px, classes)

    @functools.cache
    def ratio(units: int) -> float:
        scaled = compound_scale(coefficients, units / _PHI_UNITS, base_resolution_px=base_px)
        depth, width, resolution_px = scaled
        return _macs(width, depth, resolution_px, classes) / base_macs

    return ratio


def phi_for_budget(
    coefficients: Coefficients,
    *,
    target: float,
    kind: str = "macs",
    base_resolution_px: int = B0_RESOLUTION_PX,
    num_classes: int = 1000,
) -> float:
    """The φ (on the 1e-6 grid) whose member's MACs or params come closest to ``target``.

    Rounding channels, repeats and pixels makes both counts step functions of φ, so the member
    hits the target only as closely as the nearest step allows; a target below B0's count
    gives φ = 0.

    >>> phi = phi_for_budget(Coefficients(1.2, 1.1, 1.15), target=1.8e9)
    >>> make_family(Coefficients(1.2, 1.1, 1.15), phis=[phi]).members[0].macs / 1e9
    1.80...

    Raises:
        ValueError: On an unknown kind, a target that is not a positive finite number, or one
            these coefficients do not reach by φ = 20 or within ``scaling_search.limits``.
    """
    if kind not in BUDGET_KINDS:
        raise ValueError(f"kind must be one of {BUDGET_KINDS}, got {kind!r}")
    if isinstance(target, bool) or not isinstance(target, (int, float)):
        raise ValueError(f"target must be a number, got {target!r}")
    if not math.isfinite(target) or target <= 0:
        raise ValueError(f"target must be a positive finite number, got {target!r}")
    _check_count("base_resolution_px", base_resolution_px, limits.MAX_RESOLUTION_PX)
    _check_count("num_classes", num_classes)

    @functools.cache
    def count(units: int) -> float:
        depth, width, px = compound_scale(
            coefficients, units / _PHI_UNITS, base_resolution_px=base_resolution_px
        )
        arch = architecture(width=width, depth=depth, num_classes=num_classes)
        return count_macs(arch, resolution_px=px) if kind == "macs" else count_params(arch)

    limit = _limit_units(coefficients, base_resolution_px, _MAX_BUDGET_PHI)
    ceiling = count(limit)
    if target > ceiling:
        raise ValueError(
            f"target {target:.4g} {kind} is beyond phi={limit / _PHI_UNITS:g} ({ceiling:.4g} "
            f"{kind} with these coefficients; phi stops at {_MAX_BUDGET_PHI}, or where the "
            f"network reaches this tool's largest: {_LARGEST})"
        )
    return _match_phi(count, float(target), limit)


def _official_ratio(official: OfficialModel, classes: int) -> float:
    """MACs of the published B_k at its resolution over those of B0 at 224 px."""
    b0 = OFFICIAL_FAMILY[0]
    macs = _macs(official.width, official.depth, official.resolution_px, classes)
    return macs / _macs(b0.width, b0.depth, b0.resolution_px, classes)


def _bracket(curve: Callable[[int], float], target: float, limit: int) -> tuple[int, int]:
    """Grid points low < high <= limit with ratio(low) < target <= ratio(high), high - low == 1."""
    low, high = 0, min(_PHI_UNITS, limit)
    while curve(high) < target:
        if high >= limit:
            raise ValueError(
                f"coefficients grow the model too slowly to reach {target:.4g} by "
                f"phi={limit / _PHI_UNITS:g} (where phi stops at {_MAX_PHI:g} or the network "
                f"reaches this tool's largest: {_LARGEST})"
            )
        low, high = high, min(2 * high, limit)
    while high - low > 1:
        middle = (low + high) // 2
        if curve(middle) >= target:
            high = middle
        else:
            low = middle
    return low, high


def _match_phi(curve: Callable[[int], float], target: float, limit: int) -> float:
    """The φ (on the 1e-6 grid) whose MACs ratio is closest to `target`.

    Bisection brackets the step of the curve that crosses `target` (exactly optimal where the
    curve is non-decreasing); a scan of ±0.02 around it catches any local dip. Ties go to the
    φ nearest the crossing.
    """
    if curve(0) >= target:
        low, high = 0, 0
    else:
        low, high = _bracket(curve, target, limit)
    start, stop = max(0, high - _SCAN_RADIUS_UNITS), min(limit, high + _SCAN_RADIUS_UNITS)
    candidates = {low, high, *range(start, stop + 1, _SCAN_STEP_UNITS)}
    best = min(candidates, key=lambda units: (abs(curve(units) - target), abs(units - high)))
    return best / _PHI_UNITS


def _check_phis(phis: Sequence[float] | None, mode: str) -> tuple[float, ...]:
    if phis is None:
        return tuple(float(k) for k in _DEFAULT_PHIS)
    checked = tuple(round(_check_phi(phi), _DECIMALS) for phi in phis)
    if not checked:
        raise ValueError("phis must not be empty")
    if len(set(checked)) != len(checked):
        raise ValueError(f"phis must be distinct (to 1e-6), got {list(phis)!r}")
    if mode == "flops-matched":
        allowed = range(len(OFFICIAL_FAMILY))
        for phi in checked:
            if not phi.is_integer() or int(phi) not in allowed:
                raise ValueError(
                    f"flops-matched phis name official models: integers 0..{allowed[-1]}, "
                    f"got {phi!r}"
                )
    return checked


def make_family(
    coefficients: Coefficients,
    *,
    mode: str = "formula",
    phis: Sequence[float] | None = None,
    base_resolution_px: int = B0_RESOLUTION_PX,
    num_classes: int = 1000,
    recipe: Recipe | None = None,
) -> Family:
    """Scale B0 by `coefficients` into a family of models (Tan & Le 2019, §3.3 step 2).

    Args:
        coefficients: The triple (α, β, γ) found by step 1.
        mode: "formula": one member per φ in `phis`, scaled by eq. 3, dropout of the official
            B_k at φ = k and interpolated linearly between (B7's beyond φ = 7).
            "flops-matched": one member per official B_k, k in `phis`, at the φ (searched on a
            1e-6 grid) whose MACs ratio to B0 at `base_resolution_px` is closest to that of
            the published B_k to B0 at 224 px; name and dropout are B_k's.
        phis: φ values (formula) or official indices 0..7 (flops-matched); default 1..7.
            Values are kept to 6 decimals.
        base_resolution_px: Input side of the base network in pixels.
        num_classes: Outputs of every member's classifier.
        recipe: The dropout, stochastic depth and BN momentum every member states (a study's
            training settings); default: the reference EfficientNet's (see `Recipe`).

    Returns:
        The family, members in the order of `phis`.

    Raises:
        ValueError: On an unknown mode, empty or repeated phis, a φ outside [0, 64], a
            non-integer or out-of-range φ in flops-matched mode, a member beyond the largest
            network of ``scaling_search.limits``, base_resolution_px outside [1, 4096] or
            num_classes < 1.
    """
    if mode not in FAMILY_MODES:
        raise ValueError(f"mode must be one of {FAMILY_MODES}, got {mode!r}")
    _check_count("base_resolution_px", base_resolution_px, limits.MAX_RESOLUTION_PX)
    _check_count("num_classes", num_classes)
    checked = _check_phis(phis, mode)
    common = (coefficients, base_resolution_px, num_classes)
    recipe = recipe or Recipe()
    if mode == "formula":
        members = tuple(
            _member(_formula_name(phi), phi, _dropout_at(phi), *common, recipe) for phi in checked
        )
    else:
        curve = _macs_curve(*common)
        members = tuple(
            _matched_member(OFFICIAL_FAMILY[int(k)], curve, common, recipe) for k in checked
        )
    return Family(
        alpha=coefficients.alpha,
        beta=coefficients.beta,
        gamma=coefficients.gamma,
        mode=mode,
        base_resolution_px=base_resolution_px,
        num_classes=num_classes,
        members=members,
    )


def _matched_member(
    official: OfficialModel,
    curve: Callable[[int], float],
    common: tuple[Coefficients, int, int],
    recipe: Recipe,
) -> FamilyMember:
    limit = _limit_units(common[0], common[1], _MAX_PHI)
    phi = _match_phi(curve, _official_ratio(official, common[2]), limit)
    return _member(official.name, phi, official.dropout, *common, recipe)
