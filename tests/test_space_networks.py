"""One network, one rounding rule, one cost: network keys, classes, pixels and measured cost.

Expected values are computed here independently of the code under test: pixels and channels with
exact decimal arithmetic (Python's ``decimal`` and ``fractions``), repeat counts with integer
ceilings, and the paper's grid enumerated from its definition.
"""

from __future__ import annotations

import itertools
import math
import warnings
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from pathlib import Path

import optuna
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scaling_search.config import Bounds, SpaceConfig, load_study
from scaling_search.network import B0_STAGES, architecture, count_macs, scale_resolution
from scaling_search.results.family import make_family
from scaling_search.sampling import MeasuredCoordinates, study_network_key
from scaling_search.space import (
    Coefficients,
    CostModel,
    SpaceError,
    describe,
    grid_candidates,
    network_classes,
    representative,
)
from scaling_search.study.define import DefineByRun

optuna.logging.set_verbosity(optuna.logging.WARNING)
STUDIES = Path(__file__).resolve().parents[1] / "studies"

# --- the paper's grid, counted independently -----------------------------------------------------

_STEP = Decimal("0.05")


def _paper_grid() -> list[tuple[Decimal, Decimal, Decimal]]:
    """|α·β²·γ² − 2| ≤ 0.1 on a 0.05 step, α ∈ [1, 2], β, γ ∈ [1, 1.5] (Tan & Le 2019, §3.3)."""
    alphas = [Decimal(1) + k * _STEP for k in range(21)]
    others = [Decimal(1) + k * _STEP for k in range(11)]
    return [
        (a, b, g)
        for a, b, g in itertools.product(alphas, others, others)
        if abs(a * b * b * g * g - 2) <= Decimal("0.1")
    ]


def _channels(base: int, width: Decimal) -> int:
    """TF's round_filters in exact arithmetic: nearest multiple of 8, ≥ 8, never 10% below."""
    scaled = Fraction(base) * Fraction(width)
    rounded = max(8, int(scaled + 4) // 8 * 8)
    return rounded + 8 if rounded < Fraction(9, 10) * scaled else rounded


def _network(triple: tuple[Decimal, Decimal, Decimal], base_px: int) -> tuple[object, ...]:
    """What a triple builds at φ = 1, computed without the code under test."""
    a, b, g = triple
    px = int((base_px * g).quantize(Decimal(1), rounding=ROUND_HALF_UP))
    repeats = tuple(math.ceil(Fraction(row.repeats) * Fraction(a)) for row in B0_STAGES)
    channels = tuple(_channels(row.out_channels, b) for row in B0_STAGES)
    return (px, _channels(32, b), repeats, channels, _channels(1280, b))


def _decimals(coefficients: Coefficients) -> tuple[Decimal, Decimal, Decimal]:
    """A candidate's triple as the decimals it is written as."""
    alpha, beta, gamma = (Decimal(str(x)) for x in coefficients.as_tuple())
    return alpha, beta, gamma


def test_the_papers_grid_is_109_candidates_that_build_65_distinct_networks() -> None:
    """The issue's independent count, at studies/cluster.yaml's 64 px base."""
    grid = _paper_grid()
    assert len(grid) == 109
    assert len({_network(t, 64) for t in grid}) == 65
    study = load_study(STUDIES / "cluster.yaml")
    candidates = grid_candidates(study.space)
    assert len(candidates) == 109
    classes = network_classes(candidates, study_network_key(study, num_classes=10))
    assert len(classes) == 65
    # Each class is exactly a set of triples that the independent count says build one network.
    for members in classes.values():
        nets = {_network(_decimals(m), 64) for m in members}
        assert len(nets) == 1


@pytest.mark.parametrize("base_px", range(8, 513))
def test_a_trial_and_its_family_agree_on_every_paper_grid_point(base_px: int) -> None:
    """One rounding rule: the pixels (and channels, repeats) a trial trains at are those of its
    family's φ = 1 member, for every point of the paper's grid and every base from 8 to 512 px."""
    for triple in _paper_grid():
        coefficients = Coefficients(*(float(x) for x in triple))
        trial = describe(coefficients, base_resolution_px=base_px, num_classes=10)
        expected_px = int((base_px * triple[2]).quantize(Decimal(1), rounding=ROUND_HALF_UP))
        assert trial.resolution_px == expected_px, (triple, base_px)
        if base_px % 64 == 0:  # the family is slower to build: check channels and repeats too
            member = make_family(
                coefficients, phis=[1], base_resolution_px=base_px, num_classes=10
            ).members[0]
            assert member.resolution_px == trial.resolution_px
            assert member.macs == trial.macs and member.params == trial.params


def test_the_family_rounds_pixels_with_the_same_function() -> None:
    for base_px in range(8, 513):
        for gamma in (1.05, 1.1, 1.15, 1.2, 1.25, 1.3, 1.35, 1.4, 1.45, 1.5):
            coefficients = Coefficients(1.0, 1.0, gamma)
            member_px = make_family(
                coefficients, phis=[1], base_resolution_px=base_px, num_classes=2
            )
            assert member_px.members[0].resolution_px == scale_resolution(base_px, gamma)


def test_half_pixels_round_up_in_trials_as_in_families() -> None:
    # 30 * 1.15 = 34.5: the trial used to train at round() = 34 px while B1 said 35 px.
    assert (
        scale_resolution(30, 1.15)
        == 35
        == make_family(Coefficients(1.2, 1.1, 1.15), phis=[1], base_resolution_px=30)
        .members[0]
        .resolution_px
    )
    assert (
        describe(Coefficients(1.2, 1.1, 1.15), base_resolution_px=30, num_classes=10).resolution_px
        == 35
    )
    with pytest.raises(ValueError, match="multiplier"):
        scale_resolution(30, 0.0)


# --- classes and their representative ------------------------------------------------------------


def test_the_quickstarts_ten_triples_are_five_networks_and_each_class_keeps_its_members() -> None:
    study = load_study(STUDIES / "quickstart.yaml")
    candidates = grid_candidates(study.space)
    classes = network_classes(candidates, study_network_key(study, num_classes=10))
    assert (len(candidates), len(classes)) == (10, 5)
    assert sorted(m for members in classes.values() for m in members) == sorted(candidates)
    for key, members in classes.items():
        described = [describe(m, base_resolution_px=56, num_classes=10) for m in members]
        assert {d.network_key for d in described} == {key}
        assert len({(d.macs, d.params, d.resolution_px) for d in described}) == 1


def test_the_representative_is_closest_to_the_constraint_then_the_smallest() -> None:
    paper, other = Coefficients(1.2, 1.1, 1.15), Coefficients(1.25, 1.1, 1.15)
    assert representative([paper, other], 2.0) == other  # 2.0003 is closer to 2 than 1.9203
    assert representative([other, paper], 1.9) == paper
    tie = [Coefficients(1.0, 1.0, 1.2), Coefficients(1.0, 1.2, 1.0)]  # both exactly 1.44
    assert representative(tie, 2.0) == representative(list(reversed(tie)), 2.0) == tie[0]
    with pytest.raises(ValueError):
        representative([], 2.0)


@pytest.mark.parametrize("study_file", ["cluster.yaml", "cifar10.yaml"])
def test_space_prints_the_paper_grids_candidates_and_networks(
    study_file: str, tmp_path: Path
) -> None:
    """The command a user runs (cifar10.yaml from a folder without its data: counting networks
    needs only the number of classes, which CIFAR-10 states)."""
    from conftest import run_cli

    result = run_cli("space", str(STUDIES / study_file), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "109 candidates, 65 distinct networks (cost: α·β²·γ² within 0.1 of 2)" in result.stdout
    assert list(tmp_path.iterdir()) == []  # nothing written


# --- measured cost --------------------------------------------------------------------------------


@pytest.mark.parametrize("study_file", ["quickstart.yaml", "cluster.yaml"])
def test_with_measured_cost_every_candidate_costs_c_within_the_tolerance(study_file: str) -> None:
    study = load_study(STUDIES / study_file, ["space.cost=measured"])
    base_px = study.train.base_resolution_px
    space = study.space
    if study_file == "quickstart.yaml":
        # At 56 px no quickstart point costs 2 ± 0.1 once rounded (the cheapest is 1.85):
        # refused, naming the nearest measured ratios; a tolerance of 0.2 admits some.
        with pytest.raises(SpaceError, match=r"measured MACs ratio=1\.8510"):
            grid_candidates(space, base_resolution_px=base_px, num_classes=10)
        space = space.model_copy(update={"tolerance": 0.2})
    candidates = grid_candidates(space, base_resolution_px=base_px, num_classes=10)
    b0 = count_macs(architecture(width=1.0, depth=1.0, num_classes=10), resolution_px=base_px)
    assert candidates
    for c in candidates:
        measured = describe(c, base_resolution_px=base_px, num_classes=10).macs / b0
        assert abs(measured - space.product) <= space.tolerance + 1e-12
    nominal = grid_candidates(space.model_copy(update={"cost": "nominal"}))
    assert set(candidates) != set(nominal)  # the rule changes what is searched


@st.composite
def _boxes(draw: st.DrawFn) -> tuple[SpaceConfig, int]:
    low = [draw(st.integers(100, 130)) / 100 for _ in range(3)]
    span = [draw(st.integers(0, 6)) * 5 / 100 for _ in range(3)]
    bounds = [Bounds(low=lo, high=lo + s) for lo, s in zip(low, span, strict=True)]
    space = SpaceConfig(
        product=draw(st.sampled_from([1.5, 2.0, 2.5])),
        alpha=bounds[0],
        beta=bounds[1],
        gamma=bounds[2],
        cost="measured",
        tolerance=draw(st.sampled_from([0.05, 0.1, 0.3])),
    )
    return space, draw(st.sampled_from([16, 32, 56, 64, 224]))


@given(box=_boxes())
@settings(max_examples=40, deadline=None)
def test_the_measured_grid_is_exactly_the_points_whose_network_costs_c(
    box: tuple[SpaceConfig, int],
) -> None:
    space, base_px = box
    model = CostModel(space, base_resolution_px=base_px, num_classes=10)
    everything = grid_candidates(
        space.model_copy(update={"cost": "nominal", "tolerance": 1e9})
    )  # every step-grid point in the box
    inside = [c for c in everything if abs(model.measured(c) - space.product) <= space.tolerance]
    try:
        chosen = grid_candidates(space, base_resolution_px=base_px, num_classes=10)
    except SpaceError:
        assert not inside
        return
    assert chosen == inside


def test_continuous_samples_with_measured_cost_build_networks_that_cost_c() -> None:
    """Every sample costs c within the tolerance as built. At 64 px no β or γ makes a network
    with α in (1.25, 1.33] (repeats 2,3,3,4,4,6,2) cost 2 ± 0.1 (it jumps from 1.68 to over
    2.1): samples there move to the nearest α that has one."""
    space = SpaceConfig(cost="measured", tolerance=0.1)
    define = DefineByRun(space, sampler="random", seeds=[0], base_resolution_px=64, num_classes=10)
    model = MeasuredCoordinates(space, base_resolution_px=64, num_classes=10)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    alphas: set[float] = set()
    for _ in range(40):
        trial = study.ask()
        point = define(trial)  # never refused
        triple = Coefficients(point["alpha"], point["beta"], point["gamma"])
        assert abs(model.measured(triple) - 2.0) <= 0.1 + 1e-12
        for bounds, value in zip(
            (space.alpha, space.beta, space.gamma), triple.as_tuple(), strict=True
        ):
            assert bounds.low <= value <= bounds.high
        shares = [trial.user_attrs[f"{n}_share"] for n in ("depth", "width", "resolution")]
        assert sum(shares) == pytest.approx(1.0, abs=3e-6)
        assert triple.alpha == pytest.approx(triple.flops_product ** shares[0], rel=1e-5)
        assert not 1.2501 < triple.alpha <= 1.3333  # no network there costs c
        alphas.add(triple.alpha)
        study.tell(trial, 0.5)
    assert len(alphas) >= 30


def test_a_sampled_point_already_costing_c_keeps_its_beta_and_network() -> None:
    space = SpaceConfig(cost="measured", tolerance=0.1)
    model = MeasuredCoordinates(space, base_resolution_px=224, num_classes=10)
    # (1, 1.05, 1.3) costs 2.03 × B0 at 224 px as built: its α and β stay.
    point = Coefficients(1.0, 1.05, 1.3)
    assert abs(model.measured(point) - 2.0) <= 0.1
    moved = model.nearest(point.alpha, point.beta)
    assert moved is not None and moved.beta == point.beta
    assert abs(model.measured(moved) - 2.0) <= 0.1


def test_where_pixels_jump_over_the_budget_beta_closes_it() -> None:
    """At 64 px a stride-2 stack ends in 2×2 maps, at 65 px in 3×3: for α = 1.34, β = 1.0 the
    cost jumps from 1.72 to 2.9 × B0 between γ = 1 and γ = 65/64, so no γ alone costs 2 ± 0.1;
    a wider β at 64 px does."""
    space = SpaceConfig(cost="measured", tolerance=0.1)
    model = MeasuredCoordinates(space, base_resolution_px=64, num_classes=10)
    alpha = 1.338458
    assert model.measured(Coefficients(alpha, 1.0, 1.0)) < 1.9
    assert model.measured(Coefficients(alpha, 1.0, 65 / 64)) > 2.1
    moved = model.nearest(alpha, 1.0)
    assert moved is not None and moved.alpha == alpha and moved.beta > 1.0
    assert abs(model.measured(moved) - 2.0) <= 0.1


def test_grid_candidates_with_measured_cost_need_the_base_resolution() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="base resolution"):
            grid_candidates(SpaceConfig(cost="measured"))
