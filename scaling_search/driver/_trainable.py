"""What runs in a Ray worker: the trainable that hands ``ray.tune.report`` to ``fit``, and the
dataset (or, prepared, the handle to its memory-mapped files) shared with it through the object
store."""

from __future__ import annotations

import gc
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from scaling_search._startup import collector_paused

with collector_paused():  # a worker imports torch and the trainer here, before its first trial
    import ray
    import torch
    from ray import tune

    from scaling_search.config import StudyConfig
    from scaling_search.data.sources import ImageData
    from scaling_search.memory import release_memory, tune_allocator
    from scaling_search.objective import ObjectiveError
    from scaling_search.space import Coefficients
    from scaling_search.train import EpochMetrics, failure_reason, pick_device

METRIC = "accuracy"
Fit = Callable[..., Any]


class SharedData:
    """The dataset in Ray's object store, fetched once per worker process and kept on its device.
    A prepared dataset travels as its files' paths and the splits' indices, and the worker maps
    the files (see scaling_search.data.prepared); synthetic data travels whole.

    Tune hands each trial its parameters anew (``ray.get`` per trial, a full copy of the images),
    so the trainable is given this small handle instead: the first trial in a worker fetches the
    data and moves it to the device; the trials that the reused worker runs next take it from
    memory. One dataset is kept per process.
    """

    _cache: ClassVar[dict[tuple[str, str], ImageData]] = {}  # per worker process

    def __init__(self, data: ImageData) -> None:
        data.mean  # noqa: B018  the channel statistics, computed here once, travel with the data
        self._ref = ray.put(data)

    def get(self, device: torch.device) -> tuple[ImageData, bool]:
        """The data on ``device``, and whether this process had it already."""
        key = (self._ref.hex(), str(device))
        if key in self._cache:
            return self._cache[key], True
        self._cache.clear()
        data: ImageData = ray.get(self._ref)
        on_device = data.to(device)
        self._cache[key] = on_device
        return on_device, False


def train_trial(
    config: dict[str, Any], *, study: StudyConfig, shared: SharedData, fit_fn: Fit
) -> None:
    """The Ray Tune function trainable: typed point in, per-epoch reports and checkpoints out.

    Errors that would repeat on a retry (the loss diverged, out of memory) end the trial with a
    ``fail_reason`` result; any other error propagates, and Tune restarts the trial from its
    last checkpoint up to ``search.trial_retries`` times.
    """
    tune_allocator()  # once per worker: freed activations go back to the system
    try:
        _train_trial(config, study=study, shared=shared, fit_fn=fit_fn)
    finally:
        release_memory()  # the worker is reused: the next trial starts from what this one freed
        # What outlives a trial is the worker's own (imports, the data, caches): the collector
        # leaves it alone from now on, so the next trial's collection scans that trial's objects
        # only (a full one takes 70-130 ms with torch, Ray and Optuna loaded, a gap between
        # trials that bench/orchestration.py measured: busy 0.98 -> 0.92).
        gc.freeze()


def _train_trial(
    config: dict[str, Any], *, study: StudyConfig, shared: SharedData, fit_fn: Fit
) -> None:
    coefficients = Coefficients(config["alpha"], config["beta"], config["gamma"])
    torch.set_num_threads(max(1, int(study.resources.cpus_per_trial)))
    device = pick_device()
    data, data_reused = shared.get(device)
    resume = _last_checkpoint()
    placement = _placement(resume, data_reused)
    epochs_done = placement["resumed_from_epoch"]

    def report(metrics: EpochMetrics, state: Any) -> None:
        nonlocal epochs_done
        with tempfile.TemporaryDirectory() as folder:
            torch.save(state, Path(folder) / "state.pt")
            tune.report(
                {**metrics.to_dict(), **placement, "reported_at": time.time()},
                checkpoint=tune.Checkpoint.from_directory(folder),
            )
        epochs_done = metrics.epoch

    try:
        fit_fn(
            study.train,
            data,
            coefficients,
            seed=int(config["seed"]),
            report=report,
            resume=resume,
            device=device,
        )
    except Exception as exc:
        # An objective that broke its contract would break it again on a retry.
        reason = str(exc) if isinstance(exc, ObjectiveError) else failure_reason(exc)
        if reason is None:
            raise
        _report_failure(reason, epochs_done, placement)


def _last_checkpoint() -> Any:
    """The state this trial's last checkpoint holds (its retry resumes from it); None if none."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return torch.load(Path(folder) / "state.pt", weights_only=False)


def _placement(resume: Any, data_reused: bool) -> dict[str, Any]:
    """Where and how the trial runs, reported with every result."""
    return {
        "node_id": ray.get_runtime_context().get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
        "worker_pid": os.getpid(),  # the process to look at (or to stop) while it trains
        "resumed_from_epoch": int(resume["epoch"]) if resume else 0,
        "data_reused": data_reused,
    }


def _report_failure(reason: str, epochs_done: int, placement: dict[str, Any]) -> None:
    """End the trial as failed, for ``reason``, without a retry."""
    # Imported here: the record brings Optuna, which a worker needs only on this path.
    from scaling_search.study.record import FAIL_REASON_ATTR

    # A result with this key ends its trial as FAIL (the searcher reads it).
    tune.report({FAIL_REASON_ATTR: reason, "epoch": epochs_done, METRIC: float("nan"), **placement})
