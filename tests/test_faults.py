"""Trials that fail: each ends as FAIL with its reason, retries resume from checkpoints, and the
study goes on. Real Ray, real storage, real training; the faults are real errors raised inside
real trials (a loss driven to NaN by a huge learning rate, an allocation no machine can hold, an
exception), chosen per candidate by a wrapper around the real ``fit``.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
import ray.cloudpickle
from optuna.trial import TrialState

from scaling_search import driver
from scaling_search.config import load_study
from scaling_search.data.sources import load_data
from scaling_search.space import Coefficients
from scaling_search.study.storage import open_storage, resolve_url
from scaling_search.train import fit

pytestmark = pytest.mark.slow
# Ray workers cannot import this test module: ship the fault wrapper by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

# Four of the six triples the tiny grid trains (one per network; conftest.TINY_STUDY).
DIVERGES = (1.15, 1.15, 1.15)  # its class: (1.1, 1.15, 1.15), (1.2, 1.15, 1.15)
OUT_OF_MEMORY = (1.25, 1.15, 1.1)  # and (1.2, 1.15, 1.1)
RAISES_ONCE = (1.25, 1.1, 1.15)  # and (1.2, 1.1, 1.15)
ALWAYS_RAISES = (1.3, 1.1, 1.1)  # alone


def _faulty_fit(train: Any, data: Any, coefficients: Coefficients, *, marker: str, **kwargs: Any):
    point = (coefficients.alpha, coefficients.beta, coefficients.gamma)
    if point == DIVERGES:  # plain SGD at 10^8 per 256 images: the loss is NaN in epoch 1
        train = train.model_copy(update={"lr_per_256": 1e8, "optimizer": "sgd"})
    elif point == OUT_OF_MEMORY:  # 40,000 px inputs: a ~800 GB batch no allocator will give
        train = train.model_copy(update={"base_resolution_px": 40_000})
    elif point == RAISES_ONCE and not Path(marker).exists():

        def report_then_fail(metrics: Any, state: Any) -> None:
            kwargs["report"](metrics, state)
            if metrics.epoch == 1:
                Path(marker).touch()
                raise ConnectionError("lost the data server after epoch 1")

        return fit(train, data, coefficients, **{**kwargs, "report": report_then_fail})
    elif point == ALWAYS_RAISES:
        raise ValueError("this candidate cannot be built here")
    return fit(train, data, coefficients, **kwargs)


def test_failed_trials_are_recorded_with_reasons_and_the_study_goes_on(
    ray_local: None, tiny_study: Path, tmp_path: Path
):
    study = load_study(tiny_study, ["search.trial_retries=1"])
    storage = open_storage(resolve_url(study))
    lines: list[str] = []
    summary = driver.run_study(
        study,
        data=load_data(study.data),
        storage=storage,
        progress=lines.append,
        fit_fn=functools.partial(_faulty_fit, marker=str(tmp_path / "raised-once")),
    )

    trials = optuna.load_study(study_name=study.name, storage=storage).get_trials()
    trained = [t for t in trials if "shared_from" not in t.user_attrs]
    by_point = {(t.params["alpha"], t.params["beta"], t.params["gamma"]): t for t in trained}
    assert len(trained) == len(by_point) == 6  # nothing retried as a new Optuna trial
    # A failed network shares nothing; the retried one shares its result with its class.
    shared = {(t.params["alpha"], t.params["beta"], t.params["gamma"]) for t in trials} - set(
        by_point
    )
    assert shared == {(1.2, 1.1, 1.15)}

    reasons = {p: t.user_attrs.get("fail_reason", "") for p, t in by_point.items()}
    assert by_point[DIVERGES].state == TrialState.FAIL
    assert reasons[DIVERGES].startswith("diverged: training loss became nan in epoch 1")
    assert by_point[OUT_OF_MEMORY].state == TrialState.FAIL
    assert reasons[OUT_OF_MEMORY].startswith("out of memory:")
    assert "can't allocate memory" in reasons[OUT_OF_MEMORY]
    assert by_point[ALWAYS_RAISES].state == TrialState.FAIL
    assert "ValueError: this candidate cannot be built here" in reasons[ALWAYS_RAISES]

    # Raised once after epoch 1: Tune restarted it from that epoch's checkpoint, and it finished.
    retried = by_point[RAISES_ONCE]
    assert retried.state == TrialState.COMPLETE
    assert retried.user_attrs["resumed_from_epoch"] == 1
    assert retried.user_attrs["epochs_completed"] == study.train.epochs
    assert sorted(retried.intermediate_values) == [1, 2]

    # The other candidates trained normally; the counts and the progress lines agree.
    others = [t for p, t in by_point.items() if p not in (DIVERGES, OUT_OF_MEMORY, ALWAYS_RAISES)]
    assert all(t.state == TrialState.COMPLETE for t in others)
    assert (summary.completed, summary.failed, summary.shared) == (3, 3, 1)
    assert sum("FAILED" in line for line in lines) == 3
    assert any("retrying from its last checkpoint" in line for line in lines)
    # Retried or failed, no trial's checkpoint outlives the run (nor does Ray Tune's folder).
    assert not (study.out_dir / "ray").exists()
