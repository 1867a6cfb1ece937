"""The search on Ray Tune: OptunaSearch on the study's storage, a scheduler, trials on workers.

This is the only module that imports ray. Only this driver writes to the Optuna study; workers
report through ``ray.tune.report``. Running a study again continues it: candidates already trained
(complete or stopped early by the scheduler) are never trained again, trials that a killed driver
left RUNNING are marked FAIL and their candidates queued again.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import ray
import torch
from optuna.trial import TrialState
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from scaling_search.config import StudyConfig
from scaling_search.data import ImageData
from scaling_search.space import Coefficients, DefineByRun, grid_candidates
from scaling_search.train import EpochMetrics, fit

__all__ = ["DriverError", "RunSummary", "open_study", "plan_trials", "run_study"]

METRIC = "accuracy"
_CONFIG_ATTR = "study_config"
_DONE = (TrialState.COMPLETE, TrialState.PRUNED)
Progress = Callable[[str], None]


class DriverError(ValueError):
    """A study that cannot be run as asked (e.g. its stored settings differ from the file)."""


@dataclass(frozen=True)
class RunSummary:
    """What one invocation of :func:`run_study` did."""

    launched: int
    completed: int
    pruned: int
    failed: int
    wall_seconds: float


def _identity(study: StudyConfig) -> dict[str, Any]:
    """The settings that define what a trial's number means; a resumed study must keep them."""
    return json.loads(study.model_dump_json(include={"data", "space", "train"}))


def open_study(study: StudyConfig, storage: optuna.storages.BaseStorage) -> optuna.Study:
    """Create or load the Optuna study, refusing one recorded with different trial settings."""
    ot_study = optuna.create_study(
        storage=storage, study_name=study.name, direction="maximize", load_if_exists=True
    )
    stored = ot_study.user_attrs.get(_CONFIG_ATTR)
    identity = _identity(study)
    if stored is None:
        ot_study.set_user_attr(_CONFIG_ATTR, identity)
        ot_study.set_user_attr("sampler", study.search.sampler)
    elif stored != identity:
        changed = sorted(
            f"{section}.{key}"
            for section in identity
            for key in identity[section]
            if stored.get(section, {}).get(key) != identity[section][key]
        )
        raise DriverError(
            f"study {study.name!r} was recorded with other settings ({', '.join(changed)} "
            "differ); give the study a new name to run with these"
        )
    return ot_study


def _fail_stale(
    ot_study: optuna.Study, storage: optuna.storages.BaseStorage, progress: Progress
) -> int:
    """Mark trials left RUNNING by a driver that died as FAIL, so they are run again."""
    stale = ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in stale:
        storage.set_trial_user_attr(trial._trial_id, "fail_reason", "driver stopped mid-trial")
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    if stale:
        progress(f"marked {len(stale)} trial(s) left running by an earlier driver as FAIL")
    return len(stale)


def plan_trials(study: StudyConfig, ot_study: optuna.Study) -> int:
    """Queue what is left to train and return how many trials to launch.

    Grid: every (candidate, seed) without a finished trial is queued once (trials already
    WAITING stay queued). Other samplers: n_trials minus the trials already finished.
    """
    done = ot_study.get_trials(deepcopy=False, states=_DONE)
    if study.search.sampler != "grid":
        return max(0, (study.search.n_trials or 0) - len(done))
    waiting = ot_study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    # A queued trial holds its point in Optuna's "fixed_params" until a sampler takes it.
    taken = {_point_key(t.params) for t in done}
    taken |= {_point_key(t.system_attrs.get("fixed_params", {})) for t in waiting}
    for coefficients in grid_candidates(study.space):
        for seed in _seeds(study):
            params = {
                "alpha": coefficients.alpha,
                "beta": coefficients.beta,
                "gamma": coefficients.gamma,
                "seed": seed,
            }
            if _point_key(params) not in taken:
                ot_study.enqueue_trial(params, skip_if_exists=False)
    return len(ot_study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def _point_key(params: dict[str, Any]) -> tuple[float, float, float, int] | None:
    if not {"alpha", "beta", "gamma", "seed"} <= params.keys():
        return None
    return (
        round(params["alpha"], 6),
        round(params["beta"], 6),
        round(params["gamma"], 6),
        int(params["seed"]),
    )


def _seeds(study: StudyConfig) -> list[int]:
    return [study.search.seed + k for k in range(study.search.repeats)]


class _StudySearch(OptunaSearch):
    """OptunaSearch that also records epochs, timing, and stops-by-scheduler on each trial."""

    def __init__(self, *args: Any, budget_epochs: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._budget_epochs = budget_epochs
        self._epochs: dict[str, int] = {}

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        super().on_trial_result(trial_id, result)
        self._record(trial_id, result)

    def _record(self, trial_id: str, result: dict[str, Any]) -> None:
        ot_trial = self._ot_trials[trial_id]
        self._epochs[trial_id] = int(result["epoch"])
        ot_trial.set_user_attr("epochs_completed", int(result["epoch"]))
        ot_trial.set_user_attr("train_started_at", float(result["started_at"]))
        ot_trial.set_user_attr("train_reported_at", float(result["reported_at"]))
        ot_trial.set_user_attr("images_per_second", round(float(result["images_per_second"]), 1))

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        if result and "epoch" in result and trial_id in self._ot_trials and not error:
            # When a scheduler stops a trial, its last result arrives here only (Tune does not
            # pass it to on_trial_result), so record it now.
            if int(result["epoch"]) > self._epochs.get(trial_id, 0):
                self._ot_trials[trial_id].report(float(result[METRIC]), int(result["epoch"]))
            self._record(trial_id, result)
        epochs = self._epochs.get(trial_id, 0)
        ot_study = self._ot_study
        if not error and result and epochs < self._budget_epochs and ot_study is not None:
            # Stopped early by the scheduler: a lower-fidelity score that must never win.
            ot_study.tell(self._ot_trials[trial_id], state=TrialState.PRUNED)
            self._completed_trials.add(trial_id)
            return
        super().on_trial_complete(trial_id, result, error)


def _sampler(study: StudyConfig) -> optuna.samplers.BaseSampler:
    seed = study.search.seed
    if study.search.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if study.search.sampler == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, scramble=True)
    # random; and grid, whose points all come from the queue.
    return optuna.samplers.RandomSampler(seed=seed)


def _scheduler(study: StudyConfig) -> TrialScheduler:
    if study.search.scheduler == "asha":
        return ASHAScheduler(
            metric=METRIC,
            mode="max",
            time_attr="epoch",
            max_t=study.train.epochs,
            grace_period=1,
            reduction_factor=2,
        )
    return FIFOScheduler()


def _train_trial(config: dict[str, Any], *, study: StudyConfig, data: ImageData) -> None:
    """The Ray Tune function trainable: typed point in, per-epoch reports and checkpoints out."""
    coefficients = Coefficients(config["alpha"], config["beta"], config["gamma"])
    torch.set_num_threads(max(1, int(study.resources.cpus_per_trial)))
    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            resume = torch.load(Path(folder) / "state.pt", weights_only=False)

    def report(metrics: EpochMetrics, state: Any) -> None:
        with tempfile.TemporaryDirectory() as folder:
            torch.save(state, Path(folder) / "state.pt")
            tune.report(
                {**metrics.to_dict(), "reported_at": time.time()},
                checkpoint=tune.Checkpoint.from_directory(folder),
            )

    fit(study.train, data, coefficients, seed=int(config["seed"]), report=report, resume=resume)


class _ProgressCallback(tune.Callback):
    """One line per finished trial: counts and the best full-budget result so far."""

    def __init__(self, total: int, budget_epochs: int, progress: Progress) -> None:
        self._total, self._budget, self._say = total, budget_epochs, progress
        self._done = self._failed = 0
        self._best: tuple[float, str] | None = None
        self._last: dict[str, dict[str, Any]] = {}

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        self._last[trial.trial_id] = result

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._done += 1
        result = self._last.get(trial.trial_id, {})
        point = _label(trial.config)
        if result.get("epoch") == self._budget and (
            self._best is None or result[METRIC] > self._best[0]
        ):
            self._best = (result[METRIC], point)
        self._line(
            trials,
            f"{point} accuracy {result.get(METRIC, float('nan')):.4f} "
            f"after {result.get('epoch', 0)} epoch(s)",
        )

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._failed += 1
        error = trial.get_error()
        reason = str(error).strip().splitlines()[-1] if error else "unknown error"
        self._line(trials, f"{_label(trial.config)} FAILED: {reason}")

    def _line(self, trials: list, event: str) -> None:
        finished = self._done + self._failed
        running = min(sum(1 for t in trials if t.status == "RUNNING"), self._total - finished)
        best = f"best so far {self._best[1]} accuracy {self._best[0]:.4f}" if self._best else ""
        self._say(
            f"[{self._done + self._failed}/{self._total} done, {running} running, "
            f"{self._failed} failed] {event}" + (f" | {best}" if best else "")
        )


def _label(config: dict[str, Any]) -> str:
    return (
        f"α={config.get('alpha', 0):.3f} β={config.get('beta', 0):.3f} "
        f"γ={config.get('gamma', 0):.3f} seed={config.get('seed', 0)}"
    )


def _init_ray(study: StudyConfig, address: str | None) -> None:
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: our progress lines only
    # Tune warns whenever per-epoch checkpoints make it snapshot often; that is expected here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    ray.init(
        address=address,
        num_cpus=study.resources.num_cpus if address is None else None,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
        configure_logging=True,
    )


def _state_counts(ot_study: optuna.Study) -> Counter[TrialState]:
    return Counter(t.state for t in ot_study.get_trials(deepcopy=False))


def run_study(
    study: StudyConfig,
    *,
    data: ImageData,
    storage: optuna.storages.BaseStorage,
    progress: Progress = print,
    address: str | None = None,
) -> RunSummary:
    """Run (or continue) ``study`` on Ray and record every trial in ``storage``."""
    started = time.perf_counter()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ot_study = open_study(study, storage)
    _fail_stale(ot_study, storage, progress)
    to_launch = plan_trials(study, ot_study)
    if to_launch == 0:
        progress(f"study {study.name!r}: every trial is already done; nothing to train")
        return RunSummary(0, 0, 0, 0, time.perf_counter() - started)
    before = _state_counts(ot_study)
    progress(
        f"study {study.name!r}: launching {to_launch} trial(s), "
        f"up to {study.search.max_concurrent_trials} at a time"
    )
    _init_ray(study, address)
    define = DefineByRun(
        study.space,
        sampler=study.search.sampler,
        seeds=_seeds(study),
        base_resolution_px=study.train.base_resolution_px,
        num_classes=data.num_classes,
    )
    searcher = _StudySearch(
        space=define,
        metric=METRIC,
        mode="max",
        sampler=_sampler(study),
        study_name=study.name,
        storage=storage,
        budget_epochs=study.train.epochs,
    )
    trainable = tune.with_resources(
        tune.with_parameters(_train_trial, study=study, data=data),
        {"cpu": study.resources.cpus_per_trial, "gpu": study.resources.gpus_per_trial},
    )
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=_scheduler(study),
            num_samples=to_launch,
            max_concurrent_trials=study.search.max_concurrent_trials,
            reuse_actors=True,  # a worker process (torch imported, data fetched) runs many trials
        ),
        run_config=tune.RunConfig(
            name=f"{study.name}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str((study.out_dir / "ray").resolve()),
            verbose=0,
            callbacks=[_ProgressCallback(to_launch, study.train.epochs, progress)],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        ),
    )
    tuner.fit()
    after = _state_counts(ot_study)
    return RunSummary(
        launched=to_launch,
        completed=after[TrialState.COMPLETE] - before[TrialState.COMPLETE],
        pruned=after[TrialState.PRUNED] - before[TrialState.PRUNED],
        failed=after[TrialState.FAIL] - before[TrialState.FAIL],
        wall_seconds=time.perf_counter() - started,
    )
