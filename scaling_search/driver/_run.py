"""run_study: plan with the ledger, start or join Ray, and run the Tuner."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import ray
from optuna.trial import TrialState
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from scaling_search._compat import OPTUNA_RDB_LOGGER
from scaling_search.config import StudyConfig
from scaling_search.data.sources import ImageData
from scaling_search.driver._checkpoints import TrialCheckpoints
from scaling_search.driver._cluster import check_address, check_resources, largest_offer
from scaling_search.driver._progress import (
    LiveView,
    LiveViewFactory,
    NoView,
    Progress,
    ProgressCallback,
)
from scaling_search.driver._ray_compat import (
    AUTH_TOKEN_LOGGER,
    ended_jobs,
    init_ray,
    trial_failures_for_lost_workers,
)
from scaling_search.driver._search import Classes, StudySearch
from scaling_search.driver._trainable import METRIC, Fit, SharedData, train_trial
from scaling_search.driver._watchdog import RayWatchdog, TerminalLines, ray_output_to
from scaling_search.driver.interrupt import Interrupted, StopRequest
from scaling_search.memory import WORKER_ENV, trial_memory_bytes
from scaling_search.objective import ObjectiveFit
from scaling_search.sampling import study_network_key
from scaling_search.space import NetworkKeyFn
from scaling_search.study import ledger, leftovers, racing, sharing
from scaling_search.study.define import DefineByRun
from scaling_search.study.ledger import Heartbeat
from scaling_search.study.outage import PATIENCE_S, DatabaseWatch
from scaling_search.study.record import RACING_STAGE, SEARCH_STAGE, TrialRecord
from scaling_search.study.storage import mask_url
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
    given_back: int = 0  # stopped by a signal, or claimed and never started: trained next run


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
    # The GCS checks each node's raylet every 3 s and, by default, declares the node dead after
    # 5 missed checks: on a busy laptop a local Ray then kills itself, and the whole run with
    # it. A local Ray is one node on this machine: give it 5 minutes of patience instead.
    "health_check_period_ms": 3000,
    "health_check_timeout_ms": 30000,
    "health_check_failure_threshold": 100,
}


def _init_ray(study: StudyConfig, address: str | None, stop: StopRequest) -> None:
    if ray.is_initialized():
        return
    # Ctrl-C is this project's to handle (scaling_search.driver.interrupt), not Tune's.
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: our progress lines only
    local = address is None
    check_address(address)
    if local:  # the token is this machine's own; its notice is for clusters that others join
        logging.getLogger(AUTH_TOKEN_LOGGER).setLevel(logging.ERROR)
    init_ray(
        _LOCAL_RAY_CONFIG if local else None,
        address=address,
        num_cpus=study.resources.num_cpus if local else None,
        include_dashboard=False,
        runtime_env={"env_vars": WORKER_ENV},  # the trial workers' allocator (memory.py)
        logging_level=logging.WARNING,
        log_to_driver=False,
        configure_logging=True,
    )
    stop.install()  # ray.init put its own SIGTERM handler in place of the command's


def _state_counts(ot_study: optuna.Study) -> Counter[TrialState | str]:
    """Trials by state, those that trained only; and under "shared" those that got a trained
    network's result (a sharer whose source failed or never ended is neither)."""
    counts: Counter[TrialState | str] = Counter()
    for trial in ot_study.get_trials(deepcopy=False):
        record = TrialRecord.of(trial)
        if record.given_back:
            counts["given_back"] += 1
        elif not record.shared:
            counts[trial.state] += 1
        elif trial.state in ledger.DONE:
            counts["shared"] += 1
    return counts


def _resources(study: StudyConfig, memory_bytes: int) -> dict[str, float]:
    """One trial's Ray resource request: CPUs, (fractions of) GPUs, memory (bytes, 0 for none)
    and custom resources."""
    wanted = {"cpu": study.resources.cpus_per_trial, "gpu": study.resources.gpus_per_trial}
    if memory_bytes:
        wanted["memory"] = float(memory_bytes)
    return {**wanted, **study.resources.custom}


def _estimate_within_nodes(wanted: dict[str, float], say: Progress) -> None:
    """An estimate above what any node offers would refuse a run that may well fit (Ray counts
    a node's memory as what was free when it started): reserve the most a node offers."""
    most = largest_offer("memory")
    if 0 < most < wanted.get("memory", 0.0):
        say(
            f"memory per trial: the estimate ({wanted['memory'] / 2**30:.2f} GiB) is more than "
            f"any node offers; reserving {most / 2**30:.2f} GiB, one trial at a time on such a "
            "node (resources.memory_per_trial sets it)"
        )
        wanted["memory"] = most


def _memory_per_trial(study: StudyConfig, data: ImageData, builtin: bool, say: Progress) -> int:
    """Bytes of host memory to reserve per trial: the study's, else the built-in trainer's
    estimate (scaling_search.memory), else (an objective's trials) none."""
    if study.resources.memory_per_trial is not None:
        return study.resources.memory_per_trial
    if not builtin:
        return 0
    estimate = trial_memory_bytes(study, data)
    say(
        f"memory per trial: {estimate / 2**30:.2f} GiB reserved, estimated for the built-in "
        "trainer at this study's sizes (resources.memory_per_trial sets it)"
    )
    return estimate


def run_study(
    study: StudyConfig,
    *,
    data: ImageData,
    storage: optuna.storages.RDBStorage,
    progress: Progress | None = None,
    address: str | None = None,
    fit_fn: Fit | None = None,
    stop: StopRequest | None = None,
    keep_checkpoints: bool = False,
    database_patience_s: float = PATIENCE_S,
    live_view: LiveViewFactory | None = None,
) -> RunSummary:
    """Run (or continue) ``study`` on Ray and record every trial in ``storage``.

    ``address`` joins a running Ray cluster ("auto" or HOST:PORT); without it a local Ray starts.
    ``fit_fn`` trains one trial (same signature as :func:`scaling_search.train.fit`); by default the
    study's ``objective`` if it names one, else the built-in trainer. ``stop``: set by the command's
    signal handlers (:mod:`scaling_search.driver.interrupt`); once it is, the running trials are
    stopped and recorded, no further stage starts, and :class:`Interrupted` is raised with
    this run's summary. The study's database away for ``database_patience_s`` ends the run:
    :class:`~scaling_search.study.outage.DatabaseAway` (:mod:`scaling_search.study.outage`).

    Each trial's checkpoints are removed once its end is recorded, each stage's Ray Tune
    experiment folder once the stage ends, and at the end what stopped runs left
    (:mod:`scaling_search.study.leftovers`); ``keep_checkpoints`` keeps all of it. ``live_view``
    makes what is kept current as trials report (the CLI's: the dashboard's figures); none by
    default.
    """
    started = time.perf_counter()
    stop = stop or StopRequest()
    if progress is None:  # the terminal's stdout: Ray's own output goes to the study's logs
        progress = TerminalLines(sys.stdout)
    _quiet_optuna()
    driver = _Driver.open(study, data, storage, progress, stop, started=started)
    # Drivers on other hosts of this Ray cluster hold trials: plan once the cluster has said
    # which of them still run.
    ask_ray = address is not None and ledger.held_by_ray_jobs(driver.ot_study)
    to_launch, to_race = (0, 0) if ask_ray else driver.plan()
    if not ask_ray and to_launch == 0 and to_race == 0:
        progress(driver.nothing)
        _sweep(study, driver.ot_study, progress, keep_checkpoints)
        return driver.summary()
    try:
        driver.train(
            to_launch,
            to_race,
            _RayOptions(address, ask_ray, fit_fn, live_view, keep_checkpoints, database_patience_s),
        )
    except Interrupted as exc:
        exc.summary = driver.summary()
        raise
    _sweep(study, driver.ot_study, progress, keep_checkpoints)
    return driver.summary()


def _quiet_optuna() -> None:
    """Optuna's own messages down to warnings; its storage's retries, to errors."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Its storage warns when a query fails and it retries another way; a database going away is
    # this run's to report, in one line (scaling_search.study.outage), not Optuna's in several.
    logging.getLogger(OPTUNA_RDB_LOGGER).setLevel(logging.ERROR)


def _grid_classes(
    study: StudyConfig, ot_study: optuna.Study, num_classes: int, key: NetworkKeyFn
) -> Classes | None:
    """The grid's classes of triples that train the same network (None for other samplers),
    once the results a stopped driver trained but did not share yet are shared."""
    if study.search.sampler != "grid":
        return None
    members = ledger.grid_classes(study, num_classes=num_classes, network_key=key)
    classes = Classes(members, study.train.base_resolution_px, num_classes)
    sharing.share_missing(
        ot_study,
        members,
        base_resolution_px=study.train.base_resolution_px,
        num_classes=num_classes,
    )
    return classes


@dataclass(frozen=True)
class _RayOptions:
    """run_study's arguments for the part that runs on Ray."""

    address: str | None
    ask_ray: bool  # plan once Ray has said which jobs of other drivers still run
    fit_fn: Fit | None
    live_view: LiveViewFactory | None
    keep_checkpoints: bool
    database_patience_s: float


@dataclass
class _Driver:
    """One invocation of :func:`run_study` on its opened study: what it plans, and the stages it
    runs on Ray."""

    study: StudyConfig
    data: ImageData
    storage: optuna.storages.RDBStorage
    progress: Progress
    stop: StopRequest
    ot_study: optuna.Study
    before: Counter[TrialState | str]  # trials by state when the run began
    started: float  # time.perf_counter()
    network_key: NetworkKeyFn
    classes: Classes | None
    stage: _Stage | None = None  # once Ray runs

    @classmethod
    def open(
        cls,
        study: StudyConfig,
        data: ImageData,
        storage: optuna.storages.RDBStorage,
        progress: Progress,
        stop: StopRequest,
        *,
        started: float,
    ) -> _Driver:
        """The study opened (created on first use) and its stale trials recovered."""
        ot_study = ledger.open_study(
            study, storage, num_classes=data.num_classes, data_hash=data.content_hash
        )
        ledger.recover_stale(ot_study, progress)
        before = _state_counts(ot_study)
        key = study_network_key(study, data.num_classes)
        classes = _grid_classes(study, ot_study, data.num_classes, key)
        return cls(study, data, storage, progress, stop, ot_study, before, started, key, classes)

    @property
    def nothing(self) -> str:
        """The line that says there is nothing to train."""
        return f"study {self.study.name!r}: every trial is already done or held; nothing to train"

    def plan(self) -> tuple[int, int]:
        """Trials queued: to launch in the search, and (once it has ended) to race."""
        study, ot_study = self.study, self.ot_study
        to_launch = ledger.plan_trials(
            study, ot_study, num_classes=self.data.num_classes, network_key=self.network_key
        )
        to_race = _racing_after_search(study, ot_study, self.progress) if to_launch == 0 else 0
        return to_launch, to_race

    def summary(self) -> RunSummary:
        """What this run did so far."""
        return _summary(
            self.stage.launched if self.stage else 0, self.before, self.ot_study, self.started
        )

    def train(self, to_launch: int, to_race: int, options: _RayOptions) -> None:
        """Start (or join) Ray and run the search's stage, then racing's, as planned."""
        study, progress = self.study, self.progress
        logs = study.out_dir / "logs"
        with ray_output_to(logs / f"driver-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"):
            builtin = options.fit_fn is None and study.objective is None
            # The estimate (forward passes, ~1 s) runs while Ray starts.
            with ThreadPoolExecutor(1, thread_name_prefix="memory-estimate") as pool:
                memory = pool.submit(_memory_per_trial, study, self.data, builtin, progress)
                _init_ray(study, options.address, self.stop)
                wanted = _resources(study, memory.result())
            if options.ask_ray:  # the points of the trials of ended jobs are queued again
                ledger.recover_ended_jobs(self.ot_study, progress, ended_jobs)
                to_launch, to_race = self.plan()
                if to_launch == 0 and to_race == 0:
                    progress(self.nothing)
            if builtin and study.resources.memory_per_trial is None:
                _estimate_within_nodes(wanted, progress)
            check_resources(wanted)
            fit_fn = options.fit_fn
            if fit_fn is None:
                fit_fn = ObjectiveFit(study.objective) if study.objective else fit
            self._run_stages(to_launch, to_race, options, fit_fn, wanted)

    def _run_stages(
        self,
        to_launch: int,
        to_race: int,
        options: _RayOptions,
        fit_fn: Fit,
        wanted: dict[str, float],
    ) -> None:
        """The stages under Ray's watchdog and the study's heartbeat; the live view's figures
        brought up to date at the end."""
        study, progress = self.study, self.progress
        live = (options.live_view or NoView)(self.ot_study, progress)
        watch = DatabaseWatch(
            mask_url(self.storage.url), patience_s=options.database_patience_s, say=progress
        )
        with (
            RayWatchdog(study.out_dir / "logs", local=options.address is None),
            Heartbeat(self.storage, ledger.HEARTBEAT_INTERVAL_S, watch) as heartbeat,
        ):
            self.stage = _Stage(
                study,
                self.data,
                self.storage,
                heartbeat,
                fit_fn,
                progress,
                live,
                self.network_key,
                self.classes,
                self.stop,
                options.keep_checkpoints,
                watch,
                wanted,
            )
            self._search_then_race(self.stage, to_launch, to_race)
            live.update(force=True)  # the figures and note of the finished run

    def _search_then_race(self, stage: _Stage, to_launch: int, to_race: int) -> None:
        """The search's stage, then (once it has ended) racing's."""
        study, progress = self.study, self.progress
        if to_launch:
            progress(
                f"study {study.name!r}: up to {to_launch} trial(s) to launch, "
                f"up to {study.search.max_concurrent_trials} at a time"
            )
            stage.run(to_launch, racing_stage=False)
            to_race = _racing_after_search(study, self.ot_study, progress)
        if to_race and study.search.racing is not None:
            progress(
                f"racing: the top {study.search.racing.top_k} triple(s) of the search, "
                f"{study.search.racing.repeats} new seed(s) each at the full budget: "
                f"{to_race} trial(s)"
            )
            stage.run(to_race, racing_stage=True)


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


def _racing_after_search(study: StudyConfig, ot_study: optuna.Study, progress: Progress) -> int:
    """Queue the racing stage once the search has ended: no search trial is queued or held by
    another driver (racing on a ranking that is still changing would race the wrong networks)."""
    if study.search.racing is None:
        return 0
    pending = [
        t
        for t in ot_study.get_trials(
            deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING)
        )
        if ledger.stage_of(t) == SEARCH_STAGE
    ]
    if pending:
        progress(
            f"racing waits for the search: {len(pending)} search trial(s) are still queued or "
            "running under another driver; run the same command again once they end"
        )
        return 0
    return racing.plan_racing(study, ot_study)


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
        given_back=after["given_back"] - before["given_back"],
    )


@dataclass
class _Stage:
    """Runs one stage of a study (the search, or racing) as one Tuner on the shared storage."""

    study: StudyConfig
    data: ImageData
    storage: optuna.storages.RDBStorage
    heartbeat: Heartbeat
    fit_fn: Fit
    progress: Progress
    live: LiveView
    network_key: NetworkKeyFn
    classes: Classes | None  # the grid's classes, to share each result with
    stop: StopRequest
    keep_checkpoints: bool  # keep each trial's last checkpoint and Tune's folder after the run
    watch: DatabaseWatch
    resources: dict[str, float]  # one trial's Ray resource request
    launched: int = 0  # trials handed to Ray, over the stages run so far

    def run(self, count: int, *, racing_stage: bool) -> None:
        """Run up to ``count`` trials of this stage, then remove its Ray Tune folder."""
        searcher = self._searcher(count, racing_stage=racing_stage)
        scheduler = FIFOScheduler() if racing_stage else _scheduler(self.study)
        trial_failures_for_lost_workers()
        experiment = leftovers.new_experiment(self.study, ledger.driver_id())
        tuner = self._tuner(searcher, count, scheduler, experiment)
        self._fit(tuner, searcher)
        # Nothing in it is needed any more: the study holds every result, and an interrupted
        # trial starts again from scratch. (A stage that raised leaves it, for
        # `scaling-search clean` or the study's next finished run.)
        if not self.keep_checkpoints:
            leftovers.remove_experiment(experiment)
        self.watch.check(searcher.lost())  # the database stayed away: one line, no more stages
        self.stop.check()  # never another stage after a signal

    def _define(self, *, racing_stage: bool) -> DefineByRun:
        """How a trial of this stage gets its point: sampled, or the queued grid or racing one."""
        study = self.study
        return DefineByRun(
            study.space,
            # Racing trials are queued points, as the grid's are, with their seed as an attribute.
            sampler="grid" if racing_stage else study.search.sampler,
            seeds=racing.racing_seeds(study) if racing_stage else ledger.seeds(study),
            base_resolution_px=study.train.base_resolution_px,
            num_classes=self.data.num_classes,
            seed_attr=racing_stage,
            network_key=self.network_key,
        )

    def _searcher(self, count: int, *, racing_stage: bool) -> StudySearch:
        """The stage's Tune searcher on the study: it hands out up to ``count`` trials."""
        study = self.study
        searching = not racing_stage and study.search.sampler != "grid"
        # The study with this stage's sampler (Optuna's public API; trials are never pruned
        # through Optuna: Tune's scheduler stops them, and they are told as PRUNED).
        ot_study = optuna.load_study(
            study_name=study.name,
            storage=self.storage,
            sampler=ledger.sampler(study),
            pruner=optuna.pruners.NopPruner(),
        )
        return StudySearch(
            self._define(racing_stage=racing_stage),
            ot_study=ot_study,
            metric=METRIC,
            mode="max",
            budget_epochs=study.train.epochs,
            queued_only=racing_stage or study.search.sampler == "grid",
            stage=RACING_STAGE if racing_stage else SEARCH_STAGE,
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
            stopping=lambda: self.stop.requested,
            watch=self.watch,
            n_trials=study.search.n_trials if searching else None,
        )

    def _fit(self, tuner: tune.Tuner, searcher: StudySearch) -> None:
        """Run the Tuner, to its end or to a signal."""
        with self.stop.graceful(), _tune_quiet():
            try:
                tuner.fit()
            finally:  # also on a signal: what ended is recorded, what was claimed given back
                stopped = searcher.unfinished()
                self.launched += searcher.served
                searcher.close(unfinished=self._unfinished_reason())
                if self.stop.requested and stopped:
                    self.progress(
                        f"{stopped} running trial(s) stopped and recorded as interrupted; "
                        "the next run trains them again"
                    )

    def _tuner(
        self,
        searcher: StudySearch,
        to_launch: int,
        scheduler: TrialScheduler,
        experiment: Path,
    ) -> tune.Tuner:
        """The stage's Tuner: the trainable with its resources, searcher and scheduler."""
        trainable = tune.with_resources(
            tune.with_parameters(
                train_trial, study=self.study, shared=SharedData(self.data), fit_fn=self.fit_fn
            ),
            self.resources,
        )
        return tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                scheduler=scheduler,
                num_samples=to_launch,
                max_concurrent_trials=self.study.search.max_concurrent_trials,
                # A worker process (torch imported, data fetched) runs many trials.
                reuse_actors=True,
            ),
            run_config=self._run_config(searcher, experiment),
        )

    def _run_config(self, searcher: StudySearch, experiment: Path) -> tune.RunConfig:
        """Where the stage's experiment lives, what stops it, and who hears of its trials."""
        return tune.RunConfig(
            # A new experiment each stage: the Optuna study, not Tune's state, says what is done.
            # A local (or mounted) folder, which TrialCheckpoints and leftovers remove from.
            name=experiment.name,
            storage_path=str(experiment.parent),
            verbose=0,
            stop=_StopRun(self.stop, self.watch, searcher),
            callbacks=[
                # First: it hands an errored trial's reason to the searcher, to be recorded
                # before TrialCheckpoints removes the trial's checkpoints.
                ProgressCallback(self.study.train.epochs, self.progress, searcher, self.live),
                TrialCheckpoints(searcher, keep=self.keep_checkpoints),
            ],
            failure_config=tune.FailureConfig(max_failures=self.study.search.trial_retries),
        )

    def _unfinished_reason(self) -> str:
        if self.watch.gave_up:
            return "the study's database stopped answering; the next run trains it again"
        if self.stop.signum is None:
            return "the run ended before the trial did"
        return (
            f"interrupted by {signal.Signals(self.stop.signum).name}; the next run trains it again"
        )


@contextlib.contextmanager
def _tune_quiet() -> Iterator[None]:
    """Keep Tune's own error reports (a traceback per failed trial, "Trials did not complete")
    off the terminal: each trial's end is one progress line with its reason, and Tune keeps
    the full error next to the trial."""
    loggers = [logging.getLogger(name) for name in ("ray.tune", "ray.air", "ray.train")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


class _StopRun(tune.Stopper):
    """Stops every trial once a signal asked the run to stop or the study's database stayed
    away past the patience (Tune checks after each event), and a trial another driver failed."""

    def __init__(
        self, stop: StopRequest, watch: DatabaseWatch, searcher: StudySearch | None
    ) -> None:
        self._stop, self._watch, self._searcher = stop, watch, searcher

    # Tune pickles its stopper with the experiment's state, for Tuner.restore (unused here): a
    # copy stops nothing. The signal request holds the handlers it replaced, which may not pickle.
    def __reduce__(self) -> tuple[Any, ...]:
        return _StopRun, (StopRequest(), DatabaseWatch(), None)

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return self._searcher is not None and self._searcher.taken_over(trial_id)

    def stop_all(self) -> bool:
        return self._stop.requested or self._watch.gave_up
