"""Tests for scaling_search.space: the grid, the simplex coordinates, costs and DefineByRun.

The constraint is the paper's: α·β²·γ² ≈ c with α, β, γ ≥ 1 (Tan & Le 2019, eq. 3). Expected
grids and feasible ranges are recomputed here by brute force, not read from the code under test.
"""

from __future__ import annotations

import itertools
import math
import pickle
import re
import warnings

import optuna
import pytest
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

from scaling_search.config import Bounds, SpaceConfig
from scaling_search.network import architecture, count_macs, count_params
from scaling_search.sampling import SimplexCoordinates
from scaling_search.space import (
    Coefficients,
    SpaceError,
    describe,
    grid_candidates,
)
from scaling_search.study.define import DefineByRun

optuna.logging.set_verbosity(optuna.logging.WARNING)

# Grid spaces are drawn on a 1/1000 lattice, so every grid value is an exact decimal n/1000 and
# the brute force below can enumerate it with integers (no float drift in the enumeration).
_MILLI = 1000


def _product(a: float, b: float, g: float) -> float:
    return a * b * b * g * g


def _surface_point(draw: st.DrawFn, product: float) -> tuple[float, float, float]:
    """A point (α, β, γ) of α·β²·γ² = product inside [1, 2.5]³, from random log-FLOPs shares."""
    depth_share = draw(st.floats(0.0, 1.0))
    width_share = draw(st.floats(0.0, 1.0)) * (1.0 - depth_share)
    point = (
        product**depth_share,
        product ** (width_share / 2),
        product ** ((1.0 - depth_share - width_share) / 2),
    )
    assume(max(point) <= 2.5)
    return point


@st.composite
def grid_spaces(draw: st.DrawFn) -> SpaceConfig:
    """SpaceConfig with c in (1.2, 4], bounds in [1, 2.5], step in [0.02, 0.2], tol in [0, 0.3].

    The bounds are drawn around a point of the surface, so that both outcomes (some feasible grid
    points, or none within the tolerance) are common.
    """
    product = draw(st.integers(1201, 4000)) / _MILLI
    step = draw(st.integers(20, 200))  # in thousandths
    point = _surface_point(draw, product)
    bounds = []
    for x in point:
        # At most 25 steps per axis keeps a grid under ~18k points (fast enough per example).
        inside = math.floor(x * _MILLI)
        low = draw(st.integers(max(1000, inside - 12 * step), inside))
        high = draw(st.integers(min(2500, inside + 1), min(2500, low + 25 * step)))
        bounds.append(Bounds(low=low / _MILLI, high=high / _MILLI))
    return SpaceConfig(
        product=product,
        alpha=bounds[0],
        beta=bounds[1],
        gamma=bounds[2],
        step=step / _MILLI,
        tolerance=draw(st.integers(0, 300)) / _MILLI,
    )


def _axis(bounds: Bounds, step: float) -> list[float]:
    low, high, step_m = (round(x * _MILLI) for x in (bounds.low, bounds.high, step))
    return [(low + k * step_m) / _MILLI for k in range((high - low) // step_m + 1)]


def _brute_grid(space: SpaceConfig) -> list[tuple[float, float, float]]:
    alphas, betas, gammas = (_axis(b, space.step) for b in (space.alpha, space.beta, space.gamma))
    return list(itertools.product(alphas, betas, gammas))


@given(space=grid_spaces())
@settings(deadline=None, max_examples=100)
def test_grid_is_exactly_the_feasible_points_or_an_error(space: SpaceConfig) -> None:
    grid = _brute_grid(space)
    distance = {p: abs(_product(*p) - space.product) for p in grid}
    try:
        candidates = grid_candidates(space)
    except SpaceError:
        event("no feasible grid point")
        assert min(distance.values()) > space.tolerance - 1e-9, "a feasible point was missed"
        return
    event("some feasible grid points")
    got = {c.as_tuple() for c in candidates}
    assert len(got) == len(candidates), "duplicate candidates"
    for c in candidates:
        assert abs(c.flops_product - space.product) <= space.tolerance + 1e-9
        assert c.as_tuple() in distance, f"{c} is not on the step grid inside the bounds"
        for value, bounds in zip(c.as_tuple(), (space.alpha, space.beta, space.gamma), strict=True):
            assert bounds.low <= value <= bounds.high
    missing = [p for p, d in distance.items() if d <= space.tolerance - 1e-9 and p not in got]
    assert not missing, f"feasible grid points left out: {missing[:3]}"


def test_paper_grid_contains_the_papers_triple() -> None:
    # Tan & Le 2019, §3.3: step 1 with α·β²·γ² ≈ 2 found α = 1.2, β = 1.1, γ = 1.15.
    candidates = grid_candidates(SpaceConfig(step=0.05, tolerance=0.1))
    assert Coefficients(1.2, 1.1, 1.15) in candidates
    assert Coefficients(1.0, 1.0, 1.0) not in candidates  # product 1: far from 2


def test_zero_tolerance_keeps_exact_points_only() -> None:
    # On a 0.05 grid with c = 2, (2, 1, 1) has α·β²·γ² = 2 exactly; (1.2, 1.1, 1.15) does not.
    candidates = grid_candidates(SpaceConfig(step=0.05, tolerance=0.0))
    assert Coefficients(2.0, 1.0, 1.0) in candidates
    assert Coefficients(1.2, 1.1, 1.15) not in candidates


_NEAREST = re.compile(r"\(([\d.]+), ([\d.]+), ([\d.]+)\) with α·β²·γ²=([\d.]+)")


def test_empty_grid_error_names_the_truly_nearest_points() -> None:
    space = SpaceConfig(
        product=2.0,
        alpha=Bounds(low=1.0, high=1.3),
        beta=Bounds(low=1.0, high=1.3),
        gamma=Bounds(low=1.0, high=1.3),
        step=0.1,
        tolerance=0.01,
    )
    with pytest.raises(SpaceError) as info:
        grid_candidates(space)
    message = str(info.value)
    assert "\n" not in message
    assert "space.tolerance" in message and "0.01" in message
    found = [tuple(float(x) for x in m) for m in _NEAREST.findall(message)]
    assert len(found) == 3, message
    grid = _brute_grid(space)
    best = sorted(abs(_product(*p) - 2.0) for p in grid)[:3]
    for a, b, g, shown in found:
        assert (a, b, g) in grid
        assert shown == pytest.approx(_product(a, b, g), abs=5e-5)
    assert sorted(abs(_product(a, b, g) - 2.0) for a, b, g, _ in found) == pytest.approx(best)


# --- continuous coordinates ----------------------------------------------------------------------


@st.composite
def box_spaces(draw: st.DrawFn) -> SpaceConfig:
    bounds = []
    for _ in range(3):
        low = draw(st.floats(1.0, 2.5))
        bounds.append(Bounds(low=low, high=draw(st.floats(low, 2.5))))
    product = draw(st.floats(1.2, 4.0, exclude_min=True))
    return SpaceConfig(product=product, alpha=bounds[0], beta=bounds[1], gamma=bounds[2])


@st.composite
def feasible_box_spaces(draw: st.DrawFn) -> SpaceConfig:
    """A box in [1, 2.5]³ built around a point of the surface α·β²·γ² = c, c in (1.2, 4]."""
    product = draw(st.floats(1.2, 4.0, exclude_min=True))
    point = _surface_point(draw, product)
    bounds = [Bounds(low=draw(st.floats(1.0, x)), high=draw(st.floats(x, 2.5))) for x in point]
    return SpaceConfig(product=product, alpha=bounds[0], beta=bounds[1], gamma=bounds[2])


def _corner_products(space: SpaceConfig) -> tuple[float, float]:
    a, b, g = space.alpha, space.beta, space.gamma
    return _product(a.low, b.low, g.low), _product(a.high, b.high, g.high)


unit = st.floats(0.0, 1.0)


@given(space=feasible_box_spaces(), u=unit, v=unit)
@settings(deadline=None, max_examples=200)
def test_simplex_coordinates_land_on_the_surface_inside_the_box(
    space: SpaceConfig, u: float, v: float
) -> None:
    coords = SimplexCoordinates(space)
    for uu, vv in [(u, v), (0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0)]:
        c = coords.to_coefficients(uu, vv)
        assert c.flops_product == pytest.approx(space.product, rel=1e-9)
        for value, bounds in zip(c.as_tuple(), (space.alpha, space.beta, space.gamma), strict=True):
            assert bounds.low * (1 - 1e-9) <= value <= bounds.high * (1 + 1e-9)
        shares = coords.shares(uu, vv)
        assert math.fsum(shares) == pytest.approx(1.0, abs=1e-12)
        assert min(shares) >= -1e-12
        # The shares are the log-FLOPs split: α = c^a, β = c^(b/2), γ = c^(g/2).
        log_c = math.log(space.product)
        assert shares[0] == pytest.approx(math.log(c.alpha) / log_c, abs=1e-9)
        assert shares[1] == pytest.approx(2 * math.log(c.beta) / log_c, abs=1e-9)


@given(space=feasible_box_spaces(), v=unit)
@settings(deadline=None, max_examples=100)
def test_depth_coordinate_spans_the_feasible_alpha_range(space: SpaceConfig, v: float) -> None:
    a, b, g = space.alpha, space.beta, space.gamma
    # On the surface within the box, α ranges over [max(α_low, c/(β_hi²γ_hi²)), min(α_hi, ...)].
    alpha_min = max(a.low, space.product / (b.high**2 * g.high**2))
    alpha_max = min(a.high, space.product / (b.low**2 * g.low**2))
    coords = SimplexCoordinates(space)
    assert coords.to_coefficients(0.0, v).alpha == pytest.approx(alpha_min, rel=1e-9)
    assert coords.to_coefficients(1.0, v).alpha == pytest.approx(alpha_max, rel=1e-9)


@given(space=box_spaces())
@settings(deadline=None, max_examples=100)
def test_simplex_coordinates_refuse_boxes_off_the_surface(space: SpaceConfig) -> None:
    lowest, highest = _corner_products(space)
    # The box meets the surface α·β²·γ² = c iff c lies between its corner products (the
    # product is continuous and increasing in each coefficient); skip the razor's edge.
    assume(space.product > highest * (1 + 1e-9) or space.product < lowest * (1 - 1e-9))
    with pytest.raises(SpaceError) as info:
        SimplexCoordinates(space)
    assert "\n" not in str(info.value)


def test_box_above_the_surface_names_its_bounds() -> None:
    space = SpaceConfig(
        alpha=Bounds(low=1.5, high=2.0),
        beta=Bounds(low=1.3, high=1.5),
        gamma=Bounds(low=1.3, high=1.5),
    )
    with pytest.raises(SpaceError) as info:
        SimplexCoordinates(space)
    message = str(info.value)
    assert "alpha 1.5..2" in message and "beta 1.3..1.5" in message and "= 2" in message


def test_coordinates_outside_the_unit_square_are_refused() -> None:
    coords = SimplexCoordinates(SpaceConfig())
    for u, v in [(-0.1, 0.5), (0.5, 1.1), (math.nan, 0.5)]:
        with pytest.raises(ValueError):
            coords.to_coefficients(u, v)


# --- costs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("triple", "base_px", "classes"),
    [((1.2, 1.1, 1.15), 224, 1000), ((1.15, 1.05, 1.2), 48, 10), ((2.0, 1.0, 1.0), 32, 7)],
)
def test_describe_counts_the_scaled_model(
    triple: tuple[float, float, float], base_px: int, classes: int
) -> None:
    alpha, beta, gamma = triple
    candidate = describe(Coefficients(*triple), base_resolution_px=base_px, num_classes=classes)
    resolution_px = round(base_px * gamma)
    scaled = architecture(width=beta, depth=alpha, num_classes=classes)
    b0 = architecture(width=1.0, depth=1.0, num_classes=classes)
    expected_macs = count_macs(scaled, resolution_px=resolution_px)
    assert candidate.flops_ratio_nominal == pytest.approx(alpha * beta**2 * gamma**2, rel=1e-12)
    assert candidate.resolution_px == resolution_px
    assert candidate.macs == expected_macs
    assert candidate.params == count_params(scaled)
    assert candidate.flops_ratio_measured == pytest.approx(
        expected_macs / count_macs(b0, resolution_px=base_px), rel=1e-12
    )
    row = candidate.to_dict()
    assert (row["alpha"], row["beta"], row["gamma"]) == triple
    assert row["params"] == candidate.params and row["resolution_px"] == resolution_px


def test_unscaled_point_costs_exactly_b0() -> None:
    candidate = describe(Coefficients(1.0, 1.0, 1.0), base_resolution_px=64, num_classes=10)
    assert candidate.flops_ratio_measured == 1.0
    assert candidate.flops_ratio_nominal == 1.0


# --- DefineByRun on a real Optuna study ----------------------------------------------------------

_QUICK = SpaceConfig(
    alpha=Bounds(low=1.15, high=1.25),
    beta=Bounds(low=1.05, high=1.15),
    gamma=Bounds(low=1.1, high=1.2),
)


def _define(space: SpaceConfig = _QUICK, *, sampler: str = "grid", seeds=(0, 1)) -> DefineByRun:
    return DefineByRun(
        space, sampler=sampler, seeds=list(seeds), base_resolution_px=48, num_classes=10
    )


def test_grid_trial_returns_the_queued_point_and_records_its_costs() -> None:
    define = _define()
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"alpha": 1.2, "beta": 1.1, "gamma": 1.15, "seed": 1})
    trial = study.ask()
    point = define(trial)
    assert point == {"alpha": 1.2, "beta": 1.1, "gamma": 1.15, "seed": 1}
    attrs = study.trials[-1].user_attrs
    scaled = architecture(width=1.1, depth=1.2, num_classes=10)
    b0 = architecture(width=1.0, depth=1.0, num_classes=10)
    resolution_px = round(48 * 1.15)
    measured = count_macs(scaled, resolution_px=resolution_px) / count_macs(b0, resolution_px=48)
    assert (attrs["alpha"], attrs["beta"], attrs["gamma"], attrs["seed"]) == (1.2, 1.1, 1.15, 1)
    assert attrs["flops_ratio_nominal"] == pytest.approx(1.2 * 1.1**2 * 1.15**2, abs=1e-6)
    assert attrs["flops_ratio_measured"] == pytest.approx(measured, abs=1e-6)
    assert attrs["params"] == count_params(scaled)
    assert attrs["resolution_px"] == resolution_px
    assert study.trials[-1].params["alpha"] == 1.2


def test_grid_trial_with_an_infeasible_point_is_refused_before_anything_is_recorded() -> None:
    define = _define(SpaceConfig())
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"alpha": 1.0, "beta": 1.0, "gamma": 1.0, "seed": 0})
    trial = study.ask()
    with pytest.raises(SpaceError):
        define(trial)
    assert "flops_ratio_measured" not in study.trials[-1].user_attrs


def test_grid_trial_outside_the_bounds_is_refused() -> None:
    define = _define()
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"alpha": 2.0, "beta": 1.0, "gamma": 1.0, "seed": 0})
    trial = study.ask()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna warns that the fixed value is out of range
        with pytest.raises(SpaceError):
            define(trial)


def _sampler(name: str) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=0, n_startup_trials=4)
    if name == "qmc":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.QMCSampler(seed=0, scramble=True)
    return optuna.samplers.RandomSampler(seed=0)


@pytest.mark.parametrize(
    "sampler",
    [
        "tpe",
        "random",
        "qmc",
    ],
)
def test_continuous_samplers_only_produce_feasible_points(sampler: str) -> None:
    define = _define(SpaceConfig(), sampler=sampler, seeds=[5])
    study = optuna.create_study(direction="maximize", sampler=_sampler(sampler))
    alphas = set()
    for _ in range(12):
        trial = study.ask()
        point = define(trial)
        assert point["seed"] == 5
        assert _product(point["alpha"], point["beta"], point["gamma"]) == pytest.approx(2.0)
        study.tell(trial, point["alpha"])  # any objective: TPE needs values to model
        alphas.add(point["alpha"])
    assert len(alphas) > 1, "the sampler never moved"
    for frozen in study.trials:
        attrs = frozen.user_attrs
        shares = attrs["depth_share"] + attrs["width_share"] + attrs["resolution_share"]
        assert shares == pytest.approx(1.0, abs=3e-6)  # each rounded to 6 decimals
        assert attrs["flops_ratio_nominal"] == pytest.approx(2.0, abs=1e-6)
        assert attrs["alpha"] == pytest.approx(2.0 ** attrs["depth_share"], rel=1e-5)
        assert {"params", "resolution_px", "flops_ratio_measured", "seed"} <= attrs.keys()


def test_define_by_run_survives_pickling() -> None:
    define = _define()
    again = pickle.loads(pickle.dumps(define))
    assert again.space == define.space and again.seeds == define.seeds
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"alpha": 1.2, "beta": 1.1, "gamma": 1.15, "seed": 0})
    assert again(study.ask()) == {"alpha": 1.2, "beta": 1.1, "gamma": 1.15, "seed": 0}
    continuous = pickle.loads(pickle.dumps(_define(SpaceConfig(), sampler="tpe")))
    assert continuous.coordinates is not None
    assert continuous.coordinates.to_coefficients(0.5, 0.5).flops_product == pytest.approx(2.0)


def test_define_by_run_needs_a_seed() -> None:
    with pytest.raises(ValueError):
        _define(seeds=[])


def test_continuous_define_by_run_refuses_a_box_off_the_surface() -> None:
    space = SpaceConfig(
        alpha=Bounds(low=1.0, high=1.1), beta=Bounds(low=1.0, high=1.1), gamma=Bounds(low=1, high=1)
    )
    with pytest.raises(SpaceError):
        _define(space, sampler="random")
