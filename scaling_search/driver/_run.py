"""run_study: plan with the ledger, start or join Ray, and run the Tuner."""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import optuna
import ray
from optuna.trial import TrialState
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from scaling_search import ledger, leftovers, racing, sharing
from scaling_search.config import StudyConfig
from scaling_search.data import ImageData
from scaling_search.driver._checkpoints import TrialCheckpoints
from scaling_search.driver._progress import Progress, ProgressCallback
from scaling_search.driver._search import Classes, StudySearch
from scaling_search.driver._trainable import METRIC, Fit, SharedData, train_trial
from scaling_search.ledger import Heartbeat
from scaling_search.objective import ObjectiveFit
from scaling_search.report import LiveDashboard
from scaling_search.sampling import DefineByRun, study_network_key
from scaling_search.space import NetworkKeyFn
from scaling_search.train import fit

__all__ = ["RunSummary", "run_study"]


@dataclass(frozen=True)
class RunSummary:
    """What one invocation of :func:`run_study` did."""

    launched: int
    completed: int
    pruned: int
    failed: int
    wall_seconds: float
    shared: int = 0  # triples given the result of a network already trained (no training)


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


# Start-up settings of a local Ray (bench/startup.py measures them):
_LOCAL_RAY_CONFIG = {
    # Tune starts each trial's actor with a runtime environment (env_vars), so Ray's prestarted
    # plain workers are never used; they would only take CPU from the start-up.
    "prestart_worker_first_driver": False,
    # The raylet connects to its object store's socket as the store thread opens it, and on a
    # busy machine often first finds none: it then waits out a whole retry interval (1000 ms by
    # default). Retry every 50 ms instead, with the same 10 s of patience in all.
    "raylet_client_connect_timeout_milliseconds": 50,
    "raylet_client_num_connect_attempts": 200,
}


def _init_ray(study: StudyConfig, address: str | None) -> None:
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: our progress lines only
    local = address is None
    ray.init(
        address=address,
        num_cpus=study.resources.num_cpus if local else None,
        _system_config=_LOCAL_RAY_CONFIG if local else None,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
        configure_logging=True,
    )


def _state_counts(ot_study: optuna.Study) -> Counter[TrialState | str]:
    """Trials by state, those that trained only; and under "shared" those that got a trained
    network's result (a sharer whose source failed or never ended is neither)."""
    counts: Counter[TrialState | str] = Counter()
    for trial in ot_study.get_trials(deepcopy=False):
        if not ledger.is_shared(trial):
            counts[trial.state] += 1
        elif trial.state in ledger.DONE:
            counts["shared"] += 1
    return counts


def _resources(study: StudyConfig) -> dict[str, float]:
    """One trial's Ray resource request: CPUs, (fractions of) GPUs, and custom resources."""
    wanted = {"cpu": study.resources.cpus_per_trial, "gpu": study.resources.gpus_per_trial}
    return {**wanted, **study.resources.custom}


def run_study(
    study: StudyConfig,
    *,
    data: ImageData,
    storage: optuna.storages.RDBStorage,
    progress: Progress = print,
    address: str | None = None,
    fit_fn: Fit | None = None,
    keep_checkpoints: bool = False,
) -> RunSummary:
    """Run (or continue) ``study`` on Ray and record every trial in ``storage``.

    ``address`` joins a running Ray cluster ("auto" or HOST:PORT); without it a local Ray starts.
    ``fit_fn`` trains one trial (same signature as :func:`scaling_search.train.fit`); by default
    the study's ``objective`` if it names one, else the built-in trainer.

    Each trial's checkpoints are removed once its end is recorded, each stage's Ray Tune
    experiment folder once the stage ends, and at the end what stopped runs left
    (:mod:`scaling_search.leftovers`); ``keep_checkpoints`` keeps all of it.
    """
    started = time.perf_counter()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ot_study = ledger.open_study(study, storage, num_classes=data.num_classes)
    ledger.recover_stale(ot_study, progress)
    before = _state_counts(ot_study)
    key = study_network_key(study, data.num_classes)
    classes = None
    if study.search.sampler == "grid":
        members = ledger.grid_classes(study, num_classes=data.num_classes, network_key=key)
        classes = Classes(members, study.train.base_resolution_px, data.num_classes)
        # Results a stopped driver trained but did not share yet.
        sharing.share_missing(
            ot_study,
            members,
            base_resolution_px=study.train.base_resolution_px,
            num_classes=data.num_classes,
        )
    to_launch = ledger.plan_trials(study, ot_study, num_classes=data.num_classes, network_key=key)
    to_race = racing.plan_racing(study, ot_study) if to_launch == 0 else 0
    if to_launch == 0 and to_race == 0:
        progress(f"study {study.name!r}: every trial is already done or held; nothing to train")
        _sweep(study, ot_study, progress, keep_checkpoints)
        return _summary(0, before, ot_study, started)
    _init_ray(study, address)
    if fit_fn is None:
        fit_fn = ObjectiveFit(study.objective) if study.objective else fit
    live = LiveDashboard(ot_study, progress)
    with Heartbeat(storage, ledger.HEARTBEAT_INTERVAL_S) as heartbeat:
        stage = _Stage(
            study, data, storage, heartbeat, fit_fn, progress, live, key, classes, keep_checkpoints
        )
        if to_launch:
            progress(
                f"study {study.name!r}: up to {to_launch} trial(s) to launch, "
                f"up to {study.search.max_concurrent_trials} at a time"
            )
            stage.run(to_launch, racing_stage=False)
            to_race = racing.plan_racing(study, ot_study)
        if to_race and study.search.racing is not None:
            progress(
                f"racing: the top {study.search.racing.top_k} triple(s) of the search, "
                f"{study.search.racing.repeats} new seed(s) each at the full budget: "
                f"{to_race} trial(s)"
            )
            stage.run(to_race, racing_stage=True)
        live.update(force=True)  # the figures and note of the finished run
    _sweep(study, ot_study, progress, keep_checkpoints)
    return _summary(to_launch + to_race, before, ot_study, started)


def _sweep(
    study: StudyConfig, ot_study: optuna.Study, progress: Progress, keep_checkpoints: bool
) -> None:
    """Remove the experiment folders (checkpoints included) that stopped runs left."""
    if keep_checkpoints:
        return
    swept = leftovers.sweep(study, ot_study)
    if swept.removed:
        progress(
            f"removed {len(swept.removed)} Ray Tune folder(s) that stopped runs left, "
            f"{leftovers.format_bytes(swept.removed_bytes)} (checkpoints included)"
        )


def _summary(
    launched: int, before: Counter[TrialState | str], ot_study: optuna.Study, started: float
) -> RunSummary:
    after = _state_counts(ot_study)
    return RunSummary(
        launched=launched,
        completed=after[TrialState.COMPLETE] - before[TrialState.COMPLETE],
        pruned=after[TrialState.PRUNED] - before[TrialState.PRUNED],
        failed=after[TrialState.FAIL] - before[TrialState.FAIL],
        wall_seconds=time.perf_counter() - started,
        shared=after["shared"] - before["shared"],
    )


@dataclass(frozen=True)
class _Stage:
    """Runs one stage of a study (the search, or racing) as one Tuner on the shared storage."""

    study: StudyConfig
    data: ImageData
    storage: optuna.storages.RDBStorage
    heartbeat: Heartbeat
    fit_fn: Fit
    progress: Progress
    live: LiveDashboard
    network_key: NetworkKeyFn
    classes: Classes | None  # the grid's classes, to share each result with
    keep_checkpoints: bool  # keep each trial's last checkpoint and Tune's folder after the run

    def run(self, count: int, *, racing_stage: bool) -> None:
        study = self.study
        define = DefineByRun(
            study.space,
            # Racing trials are queued points, as the grid's are, with their seed as an attribute.
            sampler="grid" if racing_stage else study.search.sampler,
            seeds=racing.racing_seeds(study) if racing_stage else ledger.seeds(study),
            base_resolution_px=study.train.base_resolution_px,
            num_classes=self.data.num_classes,
            seed_attr=racing_stage,
            network_key=self.network_key,
        )
        searcher = StudySearch(
            space=define,
            metric=METRIC,
            mode="max",
            sampler=ledger.sampler(study),
            study_name=study.name,
            storage=self.storage,
            budget_epochs=study.train.epochs,
            queued_only=racing_stage or study.search.sampler == "grid",
            heartbeat=self.heartbeat,
            limit=count,
            # TPE one trial at a time samples after each result. With more trials at a time it
            # samples with trials in flight anyway, and sampling ahead adds one to those: taking
            # that sampling off the critical path keeps the workers busy (bench/orchestration.py:
            # 0.94 -> 0.98) for a one-result lag.
            adaptive=not racing_stage
            and study.search.sampler == "tpe"
            and study.search.max_concurrent_trials == 1,
            classes=None if racing_stage else self.classes,
            say=self.progress,
        )
        scheduler = FIFOScheduler() if racing_stage else _scheduler(study)
        experiment = leftovers.new_experiment(study, ledger.driver_id())
        tuner = _tuner(
            study,
            self.data,
            self.fit_fn,
            searcher,
            count,
            self.progress,
            self.live,
            scheduler,
            experiment=experiment,
            keep_checkpoints=self.keep_checkpoints,
        )
        try:
            tuner.fit()
        finally:  # also on Ctrl-C: what finished is recorded, what was claimed ahead given back
            searcher.close()
        # Nothing in it is needed any more: the study holds every result. (A stage that raised
        # leaves it, for `scaling-search clean` or the study's next finished run.)
        if not self.keep_checkpoints:
            leftovers.remove_experiment(experiment)


def _tuner(
    study: StudyConfig,
    data: ImageData,
    fit_fn: Fit,
    searcher: StudySearch,
    to_launch: int,
    progress: Progress,
    live: LiveDashboard,
    scheduler: TrialScheduler,
    *,
    experiment: Path,
    keep_checkpoints: bool,
) -> tune.Tuner:
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, study=study, shared=SharedData(data), fit_fn=fit_fn),
        _resources(study),
    )
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=to_launch,
            max_concurrent_trials=study.search.max_concurrent_trials,
            reuse_actors=True,  # a worker process (torch imported, data fetched) runs many trials
        ),
        run_config=tune.RunConfig(
            # A new experiment each stage: the Optuna study, not Tune's state, says what is done.
            # A local (or mounted) folder, which TrialCheckpoints and leftovers remove from.
            name=experiment.name,
            storage_path=str(experiment.parent),
            verbose=0,
            callbacks=[
                # First: it hands an errored trial's reason to the searcher, to be recorded
                # before TrialCheckpoints removes the trial's checkpoints.
                ProgressCallback(study.train.epochs, progress, searcher, live),
                TrialCheckpoints(searcher, keep=keep_checkpoints),
            ],
            failure_config=tune.FailureConfig(max_failures=study.search.trial_retries),
        ),
    )
