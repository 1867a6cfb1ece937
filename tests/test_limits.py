"""Tests for scaling_search.limits and the bounds it puts on every number a user gives.

A study file's numbers are checked by the schema (each message names ``section.key``, the bound
and the value); the command line's by ``check_range`` (naming the flag); a family member by
its network (``max_phi``, ``network_problem``). The corpus in tests/bad_studies runs the same
bounds through the real CLI.
"""

from __future__ import annotations

import copy
import math
from typing import Any, get_args, get_origin

import annotated_types
import pytest
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from scaling_search import limits
from scaling_search.config import StudyConfig, StudyError, parse_study
from scaling_search.network import architecture
from scaling_search.results.family import make_family, phi_for_budget
from scaling_search.space import Coefficients, compound_scale

PAPER = Coefficients(1.2, 1.1, 1.15)


def _numeric_fields(model: type[BaseModel], prefix: str = "") -> dict[str, FieldInfo]:
    """Every int or float field of the study schema, by dotted key, sections walked."""
    found: dict[str, FieldInfo] = {}
    for name, field in model.model_fields.items():
        if get_origin(field.annotation) is dict:  # resources.custom: checked by its validator
            continue
        types = {field.annotation, *get_args(field.annotation)}
        sections = [t for t in types if isinstance(t, type) and issubclass(t, BaseModel)]
        for section in sections:
            found.update(_numeric_fields(section, f"{prefix}{name}."))
        inner = {a for t in types for a in (get_args(t)[:1] or [t])}  # Annotated[int, …] → int
        if {int, float} & (types | inner):
            found[prefix + name] = field
    return found


def _metadata(field: FieldInfo) -> list[Any]:
    """The field's constraints, also where they sit inside ``Annotated[…] | None``."""
    nested = [
        item
        for arg in get_args(field.annotation)
        for extra in get_args(arg)[1:]
        for item in (extra.metadata if isinstance(extra, FieldInfo) else [extra])
    ]
    return [*field.metadata, *nested]


NUMERIC = _numeric_fields(StudyConfig)


def test_the_schema_has_the_numbers_this_test_expects() -> None:
    assert {"data.train_size", "data.seed", "space.alpha.high", "search.racing.top_k"} <= set(
        NUMERIC
    )
    assert "train.augment" not in NUMERIC and "resources.custom" not in NUMERIC
    assert len(NUMERIC) >= 30


@pytest.mark.parametrize("key", sorted(NUMERIC))
def test_every_number_of_a_study_has_an_upper_bound(key: str) -> None:
    bounds = [
        m
        for m in _metadata(NUMERIC[key])
        if isinstance(m, (annotated_types.Le, annotated_types.Lt))
    ]
    assert bounds, f"{key} takes any number; give it the largest the tool can compute"


# Data from files (only ever cut to a subset, so not bounded by the bytes of synthetic images)
# and a complete bound for beta, so that one key at a time can be set to its bound.
BASE = {"name": "tiny", "data": {"kind": "cifar10", "path": "cifar"}, "space": {"beta": [1, 1.1]}}


def _set(key: str, value: object) -> dict[str, Any]:
    raw: dict[str, Any] = copy.deepcopy(BASE)
    raw["space"]["beta"] = {"low": 1.0, "high": 1.1}
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return raw


# (key, the largest value allowed, a value beyond it, what the message says)
BOUNDS = [
    ("data.train_size", limits.MAX_IMAGES, 10**12, "less than or equal to 10000000"),
    ("data.test_size", limits.MAX_IMAGES, 10**12, "less than or equal to 10000000"),
    ("data.seed", limits.MAX_SEED, 2**32, "less than or equal to 4294967295"),
    ("search.seed", limits.MAX_SEED, 2**63, "less than or equal to 4294967295"),
    ("search.repeats", limits.MAX_REPEATS, 10**6, "less than or equal to 100"),
    ("search.max_concurrent_trials", 1024, 10**9, "less than or equal to 1024"),
    ("train.epochs", limits.MAX_EPOCHS, 10**9, "less than or equal to 10000"),
    ("train.batch_size", limits.MAX_BATCH_SIZE, 10**9, "less than or equal to 65536"),
    ("train.warmup_epochs", 10_000.0, 1e300, "less than or equal to 10000"),
    ("train.bn_recalibration_images", limits.MAX_IMAGES, 10**12, "less than or equal to 1000"),
    ("space.tolerance", 64.0, 1e300, "less than or equal to 64"),
    ("space.beta.high", 1.15, 1e308, "less than or equal to 64"),
    ("resources.cpus_per_trial", 1024.0, 1e9, "less than or equal to 1024"),
    ("resources.gpus_per_trial", 64.0, 65.0, "less than or equal to 64"),
    ("resources.num_cpus", 1024, 10**12, "less than or equal to 1024"),
]


@pytest.mark.parametrize(("key", "largest", "beyond", "says"), BOUNDS, ids=[b[0] for b in BOUNDS])
def test_a_number_beyond_its_bound_names_key_bound_and_value(
    key: str, largest: object, beyond: object, says: str
) -> None:
    with pytest.raises(StudyError) as info:
        parse_study(_set(key, beyond))
    message = str(info.value)
    assert message.startswith(f"{key}: ") and says in message, message
    assert f"(got {beyond!r})" in message or f"(got {beyond:g})" in message, message
    assert parse_study(_set(key, largest))  # the bound itself is allowed


def test_search_trials_and_racing_are_bounded() -> None:
    search = {"sampler": "tpe", "n_trials": limits.MAX_TRIALS}
    assert parse_study({"name": "t", "search": search}).search.n_trials == limits.MAX_TRIALS
    with pytest.raises(StudyError, match=r"^search\.n_trials: .*100000"):
        parse_study({"name": "t", "search": {**search, "n_trials": limits.MAX_TRIALS + 1}})
    with pytest.raises(StudyError, match=r"^search\.racing\.top_k: .*1000 \(got 1001\)"):
        parse_study({"name": "t", "search": {"racing": {"top_k": 1001}}})


@pytest.mark.parametrize("key", ["data.train_size", "data.seed", "search.seed", "train.epochs"])
def test_a_boolean_is_not_a_number(key: str) -> None:
    with pytest.raises(StudyError, match=rf"^{key}: expected a number, got true"):
        parse_study(_set(key, True))


def test_synthetic_images_are_bounded_by_their_bytes() -> None:
    # 100,000 images of 128 px are 4.6 GiB; the same count at 64 px, 1.1 GiB.
    data = {"kind": "synthetic", "train_size": 99_500, "test_size": 500}
    with pytest.raises(StudyError) as info:
        parse_study({"name": "t", "data": {**data, "image_px": 128}})
    assert str(info.value).startswith("data.train_size + data.test_size: 100000 synthetic")
    assert "4.58 GiB" in str(info.value) and "at most 4 GiB" in str(info.value)
    assert parse_study({"name": "t", "data": {**data, "image_px": 64}})
    files = {"kind": "cifar10", "path": "cifar", "train_size": 10**7, "test_size": 10**7}
    assert parse_study({"name": "t", "data": files})  # a file is only ever cut to a subset


def test_the_grid_is_bounded_only_where_it_is_enumerated() -> None:
    fine = {"alpha": [1.0, 2.0], "beta": [1.0, 2.0], "gamma": [1.0, 2.0], "step": 0.01}
    with pytest.raises(StudyError) as info:
        parse_study({"name": "t", "space": fine})
    assert str(info.value) == (
        "space: the step grid of alpha, beta and gamma at step 0.01 has 1,030,301 points; at "
        "most 50,000 are enumerated (raise space.step or narrow the bounds)"
    )
    tpe = {"sampler": "tpe", "n_trials": 10}  # samples the surface: no grid is listed
    assert parse_study({"name": "t", "space": fine, "search": tpe})


def test_the_trial_network_input_is_bounded() -> None:
    space = {"product": 64, "alpha": [1.0, 1.0], "beta": [1.0, 1.0], "gamma": [4.0, 4.5]}
    with pytest.raises(StudyError, match=r"^train: .* 1024 scaled by space\.gamma\.high 4\.5 is"):
        parse_study({"name": "t", "space": space, "train": {"base_resolution_px": 1024}})
    assert parse_study({"name": "t", "space": space, "train": {"base_resolution_px": 900}})


@pytest.mark.parametrize(
    ("resources", "says"),
    [
        ({"cpus_per_trial": 0.00001}, "resources.cpus_per_trial: 1e-05 is finer than Ray's"),
        ({"gpus_per_trial": 0.33333}, "resources.gpus_per_trial: 0.33333 is finer than Ray's"),
        ({"custom": {"node": 0.00005}}, "resources.custom: resource 'node': 5e-05 is finer"),
        ({"custom": {"node": 1e30}}, "'node' amount 1e+30 must be a positive finite number, at"),
    ],
)
def test_ray_resources_are_what_ray_can_count(resources: dict[str, Any], says: str) -> None:
    with pytest.raises(StudyError) as info:
        parse_study({"name": "t", "resources": resources})
    assert says in str(info.value)


def test_ray_resources_in_its_units_are_kept_as_given() -> None:
    resources = {"cpus_per_trial": 0.3, "gpus_per_trial": 0.25, "custom": {"node": 0.0001}}
    study = parse_study({"name": "t", "resources": resources})
    assert (study.resources.cpus_per_trial, study.resources.gpus_per_trial) == (0.3, 0.25)


# --- the command line's numbers ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0.0, "--width must be above 0 and at most 64 (B7's is 2.0), got 0.0"),
        (64.5, "--width must be above 0 and at most 64 (B7's is 2.0), got 64.5"),
        (math.nan, "--width must be above 0 and at most 64 (B7's is 2.0), got nan"),
        (math.inf, "--width must be above 0 and at most 64 (B7's is 2.0), got inf"),
    ],
)
def test_check_range_names_the_flag_both_bounds_and_the_value(value: float, message: str) -> None:
    with pytest.raises(ValueError) as info:
        limits.check_range("--width", value, 0, 64.0, low_open=True, note="B7's is 2.0")
    assert str(info.value) == message


def test_check_range_takes_its_bounds_and_writes_large_counts_with_commas() -> None:
    limits.check_range("--port", 1, 1, 65_535)
    limits.check_range("--port", 65_535, 1, 65_535)
    with pytest.raises(ValueError, match=r"^--n must be at least 2 and at most 100,000, got 0$"):
        limits.check_range("--n", 0, 2, 100_000)


# --- networks ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"width": 64.5, "depth": 1.0}, "width must be at most 64"),
        ({"width": 1.0, "depth": 1e9}, "depth must be at most 64"),
        ({"width": 1.0, "depth": 1.0, "num_classes": 10**6}, "num_classes must be at most 100000"),
    ],
)
def test_architecture_refuses_a_network_too_large_to_count(kwargs: dict, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        architecture(**kwargs)
    assert architecture(width=64.0, depth=64.0).num_blocks == 1024  # the largest, counted


@pytest.mark.parametrize(
    "coefficients", [PAPER, Coefficients(2.0, 1.0, 1.0), Coefficients(1.0, 1.3, 1.7)]
)
def test_max_phi_is_where_the_network_leaves_the_bounds(coefficients: Coefficients) -> None:
    phi = limits.max_phi(*coefficients.as_tuple(), base_resolution_px=224)
    inside = compound_scale(coefficients, phi - 1e-6, base_resolution_px=224)
    outside = compound_scale(coefficients, phi + 1e-3, base_resolution_px=224)
    assert limits.network_problem(*inside) is None
    assert limits.network_problem(*outside) is not None


def test_a_member_beyond_the_bounds_names_phi_and_how_far_phi_may_go() -> None:
    with pytest.raises(ValueError) as info:
        make_family(PAPER, phis=[21])
    assert str(info.value) == (
        "phi=21 is too large for α=1.2 β=1.1 γ=1.15 at 224 px: its input side 4216 px is above "
        "4096 px, the largest network this tool builds; phi <= 20.7942 stays within"
    )
    assert make_family(PAPER, phis=[20.7942]).members[0].resolution_px <= 4096


def test_a_budget_search_stops_at_the_largest_network() -> None:
    # α = 2 doubles the depth per step of φ: depth 64 at φ = 6, long before φ = 20 (where
    # counting a network 10⁶ times as deep as B0 would take minutes).
    deep = Coefficients(2.0, 1.0, 1.0)
    with pytest.raises(ValueError, match=r"target 1e\+15 macs is beyond phi=6 \("):
        phi_for_budget(deep, target=1e15)
    assert 0 < phi_for_budget(deep, target=3e9) < 6
    with pytest.raises(ValueError, match=r"too slowly to reach .* by phi=0\.999999"):
        make_family(Coefficients(64.0, 1.0, 1.0), mode="flops-matched", phis=[7])
