"""The Ray-free trial: real gradient steps on synthetic data, reports, resume."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import torch

from scaling_search.config import TrainConfig
from scaling_search.data.sources import DataError, hold_out_validation, make_synthetic
from scaling_search.network import architecture, count_params
from scaling_search.results.family import make_family
from scaling_search.space import Coefficients
from scaling_search.train import EpochMetrics, fit


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Deterministic and steady on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small_data():
    data = make_synthetic(num_classes=4, train_size=320, test_size=128, image_px=32, seed=3)
    return hold_out_validation(data, 64, seed=3)


CONFIG = TrainConfig(base_resolution_px=24, epochs=2, batch_size=32, lr_per_256=0.4)


def test_fit_reports_every_epoch_and_counts_the_scaled_model(small_data) -> None:
    seen: list[EpochMetrics] = []
    coefficients = Coefficients(1.2, 1.1, 1.15)
    result = fit(CONFIG, small_data, coefficients, seed=0, report=lambda m, _: seen.append(m))

    assert [m.epoch for m in seen] == [1, 2]
    assert result.epochs_completed == 2
    assert result.accuracy == seen[-1].accuracy
    arch = architecture(width=1.1, depth=1.2, num_classes=small_data.num_classes)
    assert result.params == count_params(arch)
    for metrics in seen:
        assert 0.0 <= metrics.accuracy <= 1.0
        assert metrics.images_per_second > 0
    # Validation every epoch; the test split once, at the last epoch of the budget.
    assert math.isnan(seen[0].test_accuracy)
    assert 0.0 <= seen[-1].test_accuracy <= 1.0
    assert result.test_accuracy == seen[-1].test_accuracy
    # Accuracies are fractions of the split they were measured on.
    assert (seen[-1].accuracy * 64).is_integer() and (seen[-1].test_accuracy * 128).is_integer()


def test_a_trial_trains_at_the_pixels_its_family_states() -> None:
    """24 px × 1.4375 = 34.5 px: Python's round() would give 34 (half to even); the family's
    φ = 1 member says 35, and the trial must train the network the family describes."""
    data = hold_out_validation(
        make_synthetic(num_classes=2, train_size=40, test_size=8, image_px=16, seed=0), 8, seed=0
    )
    config = TrainConfig(base_resolution_px=24, epochs=1, batch_size=32)
    coefficients = Coefficients(1.0, 1.0, 1.4375)
    member = make_family(coefficients, phis=[1], base_resolution_px=24, num_classes=2).members[0]
    result = fit(config, data, coefficients, seed=0)
    assert member.resolution_px == 35 and round(24 * 1.4375) == 34
    assert result.resolution_px == member.resolution_px
    assert result.macs == member.macs


def test_fit_needs_a_validation_split() -> None:
    data = make_synthetic(num_classes=2, train_size=16, test_size=8, image_px=16, seed=0)
    with pytest.raises(DataError, match="validation"):
        fit(TrainConfig(base_resolution_px=16, epochs=1), data, Coefficients(1, 1, 1), seed=0)


def test_fit_changes_the_weights_by_gradient_steps(small_data) -> None:
    states: list[dict[str, Any]] = []
    config = TrainConfig(base_resolution_px=16, epochs=1, batch_size=64)
    fit(
        config,
        small_data,
        Coefficients(1.0, 1.0, 1.0),
        seed=0,
        report=lambda _, state: states.append({k: v.clone() for k, v in state["model"].items()}),
    )
    torch.manual_seed(0)
    from scaling_search.network import build_model

    fresh = build_model(architecture(width=1.0, depth=1.0, num_classes=4)).state_dict()
    trained = states[0]
    moved = [
        k for k in fresh if fresh[k].is_floating_point() and not torch.equal(fresh[k], trained[k])
    ]
    assert len(moved) > 0.9 * len([k for k in fresh if fresh[k].is_floating_point()])


def test_resume_from_a_reported_state_matches_an_uninterrupted_run(small_data) -> None:
    coefficients = Coefficients(1.15, 1.1, 1.2)
    straight = fit(CONFIG, small_data, coefficients, seed=7)

    states: list[dict[str, Any]] = []

    def keep_first(_: EpochMetrics, state: Mapping[str, Any]) -> None:
        if not states:
            import copy

            states.append(copy.deepcopy(dict(state)))

    fit(CONFIG, small_data, coefficients, seed=7, report=keep_first)
    resumed = fit(CONFIG, small_data, coefficients, seed=7, resume=states[0])

    assert [m.epoch for m in resumed.history] == [2]
    assert resumed.accuracy == straight.accuracy
    assert resumed.history[-1].train_loss == pytest.approx(
        straight.history[-1].train_loss, rel=1e-6
    )


def test_same_seed_same_result_other_seed_differs(small_data) -> None:
    config = TrainConfig(base_resolution_px=16, epochs=1, batch_size=64)
    a = fit(config, small_data, Coefficients(1.0, 1.0, 1.0), seed=1)
    b = fit(config, small_data, Coefficients(1.0, 1.0, 1.0), seed=1)
    c = fit(config, small_data, Coefficients(1.0, 1.0, 1.0), seed=2)
    assert a.history[0].train_loss == b.history[0].train_loss
    assert a.history[0].train_loss != c.history[0].train_loss
