"""The search on Ray Tune: OptunaSearch on the study's storage, a scheduler, trials on workers.

This is the only module that imports ray. Only the driver writes to the Optuna study; workers
report through ``ray.tune.report``. What to train, and recovery from drivers that died, is the
ledger's job (:mod:`scaling_search.ledger`): running a study again continues it, candidates
already trained are never trained again, and several drivers can share one study.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
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
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from scaling_search import ledger
from scaling_search.config import StudyConfig
from scaling_search.data import ImageData
from scaling_search.ledger import Heartbeat
from scaling_search.report import LiveDashboard
from scaling_search.space import Coefficients, DefineByRun
from scaling_search.train import EpochMetrics, failure_reason, fit

__all__ = ["RunSummary", "run_study"]

METRIC = "accuracy"
FAIL_KEY = ledger.FAIL_REASON_ATTR  # a result with it ends its trial as FAIL (e.g. diverged)
Progress = Callable[[str], None]
Fit = Callable[..., Any]


@dataclass(frozen=True)
class RunSummary:
    """What one invocation of :func:`run_study` did."""

    launched: int
    completed: int
    pruned: int
    failed: int
    wall_seconds: float


class _StudySearch(OptunaSearch):
    """OptunaSearch that claims trials through the ledger and keeps their heartbeats.

    It also records on each Optuna trial: epochs, timing, the Ray node it ran on, stops by the
    scheduler (PRUNED) and failures (FAIL with ``fail_reason``).
    """

    def __init__(
        self, *args: Any, budget_epochs: int, queued_only: bool, heartbeat: Heartbeat, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._budget_epochs = budget_epochs
        self._queued_only = queued_only
        self._heartbeat = heartbeat
        self._holder = ledger.driver_id()
        self._epochs: dict[str, int] = {}
        self._errored: set[str] = set()

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if trial_id not in self._ot_trials:
            assert self._ot_study is not None  # set up by OptunaSearch before any suggestion
            ot_trial = ledger.claim(
                self._ot_study, queued_only=self._queued_only, holder=self._holder
            )
            if ot_trial is None:
                # The queue is empty (other drivers took the rest); Tune's sentinel is a string.
                return Searcher.FINISHED
            self._heartbeat.hold(ot_trial._trial_id)
            self._ot_trials[trial_id] = ot_trial
        return super().suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if FAIL_KEY in result:
            return  # handled when the trial completes, right after
        with contextlib.suppress(UpdateFinishedTrialError):  # see _record
            super().on_trial_result(trial_id, result)
        self._record(trial_id, result)

    def _record(self, trial_id: str, result: dict[str, Any]) -> None:
        self._epochs[trial_id] = int(result["epoch"])
        # Another driver may have ended the trial (it judged this one dead): keep going.
        with contextlib.suppress(UpdateFinishedTrialError):
            self._record_attrs(self._ot_trials[trial_id], result)

    @staticmethod
    def _record_attrs(ot_trial: optuna.Trial, result: dict[str, Any]) -> None:
        ot_trial.set_user_attr("epochs_completed", int(result["epoch"]))
        ot_trial.set_user_attr("train_started_at", float(result["started_at"]))
        ot_trial.set_user_attr("train_reported_at", float(result["reported_at"]))
        ot_trial.set_user_attr("images_per_second", round(float(result["images_per_second"]), 1))
        ot_trial.set_user_attr("node_id", str(result["node_id"]))
        ot_trial.set_user_attr("node_ip", str(result["node_ip"]))
        if int(result["resumed_from_epoch"]):
            ot_trial.set_user_attr("resumed_from_epoch", int(result["resumed_from_epoch"]))

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        if trial_id not in self._ot_trials or trial_id in self._completed_trials:
            super().on_trial_complete(trial_id, result, error)
            return
        if error:
            # Tune tells searchers before callbacks; the reason arrives through fail() next.
            self._errored.add(trial_id)
            return
        self._heartbeat.release(self._ot_trials[trial_id]._trial_id)
        if result and FAIL_KEY in result:
            self._fail(trial_id, str(result[FAIL_KEY]))
            return
        if result and "epoch" in result:
            # When a scheduler stops a trial, its last result arrives here only (Tune does not
            # pass it to on_trial_result), so record it now.
            if int(result["epoch"]) > self._epochs.get(trial_id, 0):
                with contextlib.suppress(UpdateFinishedTrialError):  # see _record
                    self._ot_trials[trial_id].report(float(result[METRIC]), int(result["epoch"]))
            self._record(trial_id, result)
        ot_study = self._ot_study
        if result and self._epochs.get(trial_id, 0) < self._budget_epochs and ot_study is not None:
            # Stopped early by the scheduler: a lower-fidelity score that must never win.
            ot_study.tell(self._ot_trials[trial_id], state=TrialState.PRUNED, skip_if_finished=True)
            self._completed_trials.add(trial_id)
            return
        super().on_trial_complete(trial_id, result, error)

    def fail(self, trial_id: str, reason: str) -> None:
        """Record why an errored trial failed (its retries used up) and end it as FAIL."""
        if trial_id in self._errored:
            self._errored.discard(trial_id)
            self._heartbeat.release(self._ot_trials[trial_id]._trial_id)
            self._fail(trial_id, reason)

    def _fail(self, trial_id: str, reason: str) -> None:
        assert self._ot_study is not None
        ledger.fail_trial(self._ot_study._storage, self._ot_trials[trial_id]._trial_id, reason)
        self._completed_trials.add(trial_id)

    # Tune pickles the searcher into tuner.pkl and its experiment snapshots, for Tuner.restore.
    # The Optuna study, not Tune, is what this project resumes from; and the storage inside
    # would write the database password to disk. So both copies hold no storage.
    _NOT_PICKLED = ("_storage", "_ot_study", "_ot_trials", "_heartbeat", "_sampler")

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in self._NOT_PICKLED}

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as file:
            pickle.dump(self.__getstate__(), file)

    def close(self) -> None:
        """End trials that errored without a reason reaching :meth:`fail`."""
        for trial_id in list(self._errored):
            self.fail(trial_id, "the trial raised an error (no message reached the driver)")


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


def _train_trial(
    config: dict[str, Any], *, study: StudyConfig, data: ImageData, fit_fn: Fit
) -> None:
    """The Ray Tune function trainable: typed point in, per-epoch reports and checkpoints out.

    Errors that would repeat on a retry (the loss diverged, out of memory) end the trial with a
    ``fail_reason`` result; any other error propagates, and Tune restarts the trial from its
    last checkpoint up to ``search.trial_retries`` times.
    """
    coefficients = Coefficients(config["alpha"], config["beta"], config["gamma"])
    torch.set_num_threads(max(1, int(study.resources.cpus_per_trial)))
    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            resume = torch.load(Path(folder) / "state.pt", weights_only=False)
    placement = {
        "node_id": ray.get_runtime_context().get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
        "resumed_from_epoch": int(resume["epoch"]) if resume else 0,
    }
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
            study.train, data, coefficients, seed=int(config["seed"]), report=report, resume=resume
        )
    except Exception as exc:
        reason = failure_reason(exc)
        if reason is None:
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the actor is reused for the next trial
        tune.report({FAIL_KEY: reason, "epoch": epochs_done, METRIC: float("nan"), **placement})


class _ProgressCallback(tune.Callback):
    """One line per finished trial (counts, the best full-budget result so far); hands the
    reason of each errored trial to the searcher."""

    def __init__(
        self, budget_epochs: int, progress: Progress, searcher: _StudySearch, live: LiveDashboard
    ) -> None:
        self._budget, self._say = budget_epochs, progress
        self._searcher, self._live = searcher, live
        self._done = self._failed = 0
        self._best: tuple[float, str] | None = None
        self._last: dict[str, dict[str, Any]] = {}

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        self._last[trial.trial_id] = result
        self._live.update()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = self._last.get(trial.trial_id, {})
        point = _label(trial.config)
        if FAIL_KEY in result:
            self._failed += 1
            self._line(trials, trial, f"{point} FAILED: {result[FAIL_KEY]}")
            self._live.update()
            return
        self._done += 1
        if result.get("epoch") == self._budget and (
            self._best is None or result[METRIC] > self._best[0]
        ):
            self._best = (result[METRIC], point)
        self._line(
            trials,
            trial,
            f"{point} accuracy {result.get(METRIC, float('nan')):.4f} "
            f"after {result.get('epoch', 0)} epoch(s)",
        )
        self._live.update()

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._say(f"{_label(trial.config)} retrying from its last checkpoint: {_reason(trial)}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._failed += 1
        reason = _reason(trial)
        self._searcher.fail(trial.trial_id, reason)
        self._line(trials, trial, f"{_label(trial.config)} FAILED: {reason}")
        self._live.update()

    def _line(self, trials: list, finished_trial: Any, event: str) -> None:
        finished = self._done + self._failed
        # Tune still lists the trial that just ended as RUNNING when it calls back.
        running = sum(1 for t in trials if t.status == "RUNNING" and t is not finished_trial)
        best = f"best so far {self._best[1]} accuracy {self._best[0]:.4f}" if self._best else ""
        self._say(
            f"[{finished} done, {running} running, {self._failed} failed] {event}"
            + (f" | {best}" if best else "")
        )


def _reason(trial: Any) -> str:
    """The last line of a Tune trial's error: the exception, without Ray's traceback."""
    # Tune writes the error next to the trial first (local_path) and syncs it to storage later.
    local = Path(trial.error_file) if trial.error_file else None
    text = local.read_text(errors="replace") if local and local.is_file() else trial.get_error()
    lines = [line.strip() for line in str(text or "").splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"


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
    fit_fn: Fit = fit,
) -> RunSummary:
    """Run (or continue) ``study`` on Ray and record every trial in ``storage``.

    ``address`` joins a running Ray cluster ("auto" or HOST:PORT); without it a local Ray starts.
    ``fit_fn`` trains one trial (default :func:`scaling_search.train.fit`, same signature).
    """
    started = time.perf_counter()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ot_study = ledger.open_study(study, storage)
    ledger.recover_stale(ot_study, progress)
    to_launch = ledger.plan_trials(study, ot_study)
    if to_launch == 0:
        progress(f"study {study.name!r}: every trial is already done or held; nothing to train")
        return RunSummary(0, 0, 0, 0, time.perf_counter() - started)
    before = _state_counts(ot_study)
    progress(
        f"study {study.name!r}: up to {to_launch} trial(s) to launch, "
        f"up to {study.search.max_concurrent_trials} at a time"
    )
    _init_ray(study, address)
    define = DefineByRun(
        study.space,
        sampler=study.search.sampler,
        seeds=ledger.seeds(study),
        base_resolution_px=study.train.base_resolution_px,
        num_classes=data.num_classes,
    )
    with Heartbeat(storage, ledger.HEARTBEAT_INTERVAL_S) as heartbeat:
        searcher = _StudySearch(
            space=define,
            metric=METRIC,
            mode="max",
            sampler=ledger.sampler(study),
            study_name=study.name,
            storage=storage,
            budget_epochs=study.train.epochs,
            queued_only=study.search.sampler == "grid",
            heartbeat=heartbeat,
        )
        live = LiveDashboard(ot_study, progress)
        _tuner(study, data, fit_fn, searcher, to_launch, progress, live).fit()
        searcher.close()
        live.update(force=True)  # the figures and note of the finished run
    after = _state_counts(ot_study)
    return RunSummary(
        launched=to_launch,
        completed=after[TrialState.COMPLETE] - before[TrialState.COMPLETE],
        pruned=after[TrialState.PRUNED] - before[TrialState.PRUNED],
        failed=after[TrialState.FAIL] - before[TrialState.FAIL],
        wall_seconds=time.perf_counter() - started,
    )


def _tuner(
    study: StudyConfig,
    data: ImageData,
    fit_fn: Fit,
    searcher: _StudySearch,
    to_launch: int,
    progress: Progress,
    live: LiveDashboard,
) -> tune.Tuner:
    trainable = tune.with_resources(
        tune.with_parameters(_train_trial, study=study, data=data, fit_fn=fit_fn),
        _resources(study),
    )
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=_scheduler(study),
            num_samples=to_launch,
            max_concurrent_trials=study.search.max_concurrent_trials,
            reuse_actors=True,  # a worker process (torch imported, data fetched) runs many trials
        ),
        run_config=tune.RunConfig(
            # A new experiment each run: the Optuna study, not Tune's state, says what is done.
            name=f"{study.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
            storage_path=str((study.out_dir / "ray").resolve()),
            verbose=0,
            callbacks=[_ProgressCallback(study.train.epochs, progress, searcher, live)],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=study.search.trial_retries),
        ),
    )
