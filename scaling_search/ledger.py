"""The Optuna study as the search's ledger: what to train, who holds it, and what died.

Several drivers (and drivers that were killed and started again) share one study. This module
keeps them from losing or repeating work, using only the Optuna storage:

- **Planning** queues every grid point (candidate, seed) that no trial holds yet: a finished
  trial, a trial some live driver is running, or one already queued.
- **Claiming** takes a queued trial atomically (Optuna's WAITING → RUNNING transition locks the
  row). Two drivers planning at the same moment can queue one point twice; the copy with the
  higher trial number is then skipped when claimed: it becomes FAIL with ``duplicate_of`` set
  and is never trained. ``status`` reports such skips.
- **Liveness.** A claimed trial records which driver holds it (host, pid, process start) and a
  heartbeat that the driver refreshes every :data:`HEARTBEAT_INTERVAL_S`. A driver starting up
  fails (FAIL, with ``fail_reason``) the RUNNING trials whose driver is a dead process on this
  host, or whose heartbeat is older than :data:`HEARTBEAT_GRACE_S` (a driver on another host);
  planning then queues their points again.

Only the driver process writes here; Ray workers report through Ray.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import threading
import warnings
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import FrozenTrial, TrialState

from scaling_search.config import StudyConfig
from scaling_search.space import Coefficients, grid_candidates
from scaling_search.storage import HEARTBEAT_GRACE_S, HEARTBEAT_INTERVAL_S

__all__ = [
    "HEARTBEAT_GRACE_S",
    "HEARTBEAT_INTERVAL_S",
    "Heartbeat",
    "LedgerError",
    "claim",
    "driver_id",
    "duplicates",
    "fail_trial",
    "open_study",
    "plan_trials",
    "point_of",
    "point_of_params",
    "point_params",
    "recover_stale",
    "sampler",
    "seeds",
]

DRIVER_ATTR = "driver"
STAGE_ATTR = "stage"  # "racing" on the trials of the racing stage (scaling_search.racing)
RACING_STAGE = "racing"
FAIL_REASON_ATTR = "fail_reason"
DUPLICATE_ATTR = "duplicate_of"
_CONFIG_ATTR = "study_config"
_DONE = (TrialState.COMPLETE, TrialState.PRUNED)
_HELD = (TrialState.WAITING, TrialState.RUNNING, *_DONE)
Progress = Callable[[str], None]
Point = tuple[float, float, float, int]  # (α, β, γ, seed), rounded to 6 decimals


class LedgerError(ValueError):
    """A study that cannot be run as asked (e.g. its stored settings differ from the file)."""


def _identity(study: StudyConfig) -> dict[str, Any]:
    """The settings that define what a trial's number means; a resumed study must keep them."""
    # train.compile changes how fast a trial runs, not what it computes.
    identity = json.loads(
        study.model_dump_json(include={"data", "space", "train"}, exclude={"train": {"compile"}})
    )
    if study.objective is not None:  # absent for the built-in trainer, as before the hook
        identity["objective"] = {"function": study.objective}
    return identity


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
        raise LedgerError(
            f"study {study.name!r} was recorded with other settings ({', '.join(changed)} "
            "differ); give the study a new name to run with these"
        )
    return ot_study


# --- who holds a trial ---------------------------------------------------------------------------


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot), or None if there is none.

    Together with the pid it names a process uniquely: a pid reused later has another start.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:  # no /proc (macOS): fall back to "the pid exists"
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "?"
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the name in () may hold spaces


def driver_id() -> str:
    """This process as ``host:pid:start``, recorded on every trial it claims."""
    return f"{socket.gethostname()}:{os.getpid()}:{_process_start(os.getpid())}"


def _on_this_host(holder: str) -> bool:
    return holder.partition(":")[0] == socket.gethostname()


def _driver_is_dead(holder: str) -> bool:
    """Whether ``holder`` (a :func:`driver_id` on this host) names a process that is gone."""
    pid, _, start = holder.partition(":")[2].partition(":")
    if not pid.isdigit():
        return False
    now = _process_start(int(pid))
    return now is None or (now != "?" and start != "?" and now != start)


class Heartbeat:
    """A daemon thread that refreshes the heartbeat of every trial this driver holds."""

    def __init__(self, storage: optuna.storages.RDBStorage, interval_s: float) -> None:
        self._storage, self._interval = storage, interval_s
        self._held: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="trial-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles the searcher that holds this (tuner.pkl, experiment snapshots); a copy
        # is inert: no thread, nothing held, and no storage (whose URL holds the password).
        return {"interval": self._interval}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(None, state["interval"])  # type: ignore[misc]

    def hold(self, trial_id: int) -> None:
        with self._lock:
            self._held.add(trial_id)
        self._storage.record_heartbeat(trial_id)

    def release(self, trial_id: int) -> None:
        with self._lock:
            self._held.discard(trial_id)

    def _beat(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:
                held = sorted(self._held)
            for trial_id in held:
                # A database hiccup is not fatal: the next beat tries again.
                with contextlib.suppress(Exception):
                    self._storage.record_heartbeat(trial_id)


# --- failing, recovering -------------------------------------------------------------------------


def fail_trial(storage: optuna.storages.BaseStorage, trial_id: int, reason: str) -> bool:
    """Mark a trial FAIL with ``reason`` as its ``fail_reason``; False if it had already ended."""
    try:
        storage.set_trial_user_attr(trial_id, FAIL_REASON_ATTR, reason[:500])
        return storage.set_trial_state_values(trial_id, TrialState.FAIL)
    except UpdateFinishedTrialError:
        return False


def _stale_heartbeats(ot_study: optuna.Study) -> set[int]:
    # Optuna wraps the RDB storage of a study in a cache; the heartbeat table is the backend's.
    storage = getattr(ot_study._storage, "_backend", ot_study._storage)
    if not isinstance(storage, optuna.storages.RDBStorage) or storage.heartbeat_interval is None:
        return set()
    # Optuna keeps the heartbeat comparison (database clock) behind this one method; its public
    # fail_stale_trials would fail the trials too, but without a way to say why.
    return set(storage._get_stale_trial_ids(ot_study._study_id))


def recover_stale(ot_study: optuna.Study, progress: Progress) -> int:
    """Fail RUNNING trials whose driver is gone, so that planning queues their points again.

    A holder on this host is judged by its process (gone: fail now; alive: keep, however late
    its heartbeat); a holder on another host by its heartbeat. A trial that names no holder was
    left in the moment between being taken and being named: it fails once it is older than the
    heartbeat grace. (:func:`claim` records the first heartbeat before naming the holder, so a
    named trial always has a heartbeat.)
    """
    stale_heartbeat = _stale_heartbeats(ot_study)
    grace = timedelta(seconds=HEARTBEAT_GRACE_S)
    failed = 0
    for trial in ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        holder = trial.system_attrs.get(DRIVER_ATTR)
        started = trial.datetime_start or datetime.now()
        if isinstance(holder, str) and _on_this_host(holder):
            if not _driver_is_dead(holder):
                continue
            reason = f"driver {holder} stopped mid-trial"
        elif trial._trial_id in stale_heartbeat:
            reason = f"driver {holder} sent no heartbeat for {HEARTBEAT_GRACE_S} s"
        elif holder is None and datetime.now() - started > grace:
            reason = "left running by a driver that stopped before it sent a heartbeat"
        else:
            continue
        failed += fail_trial(ot_study._storage, trial._trial_id, reason)
    if failed:
        progress(f"marked {failed} trial(s) left running by a stopped driver as FAIL")
    return failed


# --- planning and claiming -----------------------------------------------------------------------


def seeds(study: StudyConfig) -> list[int]:
    """The training seeds every grid candidate is run with."""
    return [study.search.seed + k for k in range(study.search.repeats)]


def point_of(trial: FrozenTrial) -> Point | None:
    """The (α, β, γ, seed) a trial trains: its params, or while queued its fixed params; the
    seed of a racing trial is its user attribute."""
    params = {**trial.params, **trial.system_attrs.get("fixed_params", {})}
    if "seed" not in params and trial.user_attrs.get(STAGE_ATTR) == RACING_STAGE:
        params = {**params, "seed": trial.user_attrs.get("seed")}
    return _key(params)


def point_params(coefficients: Coefficients, seed: int) -> dict[str, Any]:
    """The parameters of a queued trial that trains ``coefficients`` with ``seed``."""
    return {
        "alpha": coefficients.alpha,
        "beta": coefficients.beta,
        "gamma": coefficients.gamma,
        "seed": seed,
    }


def point_of_params(params: dict[str, Any]) -> Point | None:
    """The (α, β, γ, seed) of a trial's parameters, rounded as :func:`point_of` rounds them."""
    return _key(params)


def _key(params: dict[str, Any]) -> Point | None:
    if not {"alpha", "beta", "gamma", "seed"} <= params.keys():
        return None
    return (
        round(params["alpha"], 6),
        round(params["beta"], 6),
        round(params["gamma"], 6),
        int(params["seed"]),
    )


def sampler(study: StudyConfig) -> optuna.samplers.BaseSampler:
    """The study's Optuna sampler. The grid's points all come from the queue (never sampled)."""
    seed = study.search.seed
    if study.search.sampler == "tpe":
        # Trials in flight (and the one the driver samples ahead) count as bad guesses until
        # they end, so TPE does not sample next to them again: Optuna's way for parallel runs.
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    if study.search.sampler == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, scramble=True)
    return optuna.samplers.RandomSampler(seed=seed)


def plan_trials(study: StudyConfig, ot_study: optuna.Study) -> int:
    """Queue what is left to train and return how many trials this driver may launch.

    Grid: every (candidate, seed) not held by a trial (finished, running or queued) is queued
    once; the answer is the queue's length. Other samplers: n_trials minus the trials finished.

    The grid is queued in a random order, seeded by ``search.seed``: asynchronous successive
    halving (ASHA) compares each trial with those that reached a rung before it, so a grid in
    sorted order, where accuracy often rises along the order, would have every trial promoted.
    """
    if study.search.sampler != "grid":
        done = ot_study.get_trials(deepcopy=False, states=_DONE)
        searched = [t for t in done if t.user_attrs.get(STAGE_ATTR) != RACING_STAGE]
        return max(0, (study.search.n_trials or 0) - len(searched))
    taken = {point_of(t) for t in ot_study.get_trials(deepcopy=False, states=_HELD)}
    points = [(c, seed) for c in grid_candidates(study.space) for seed in seeds(study)]
    random.Random(study.search.seed).shuffle(points)
    for coefficients, seed in points:
        params = point_params(coefficients, seed)
        if _key(params) not in taken:
            ot_study.enqueue_trial(params, skip_if_exists=False)
    waiting = ot_study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    return sum(1 for t in waiting if t.user_attrs.get(STAGE_ATTR) != RACING_STAGE)


def _earlier_holder(ot_study: optuna.Study, trial: FrozenTrial) -> FrozenTrial | None:
    point = point_of(trial)
    for other in ot_study.get_trials(deepcopy=False, states=_HELD):
        if other.number < trial.number and point_of(other) == point:
            return other
    return None


def claim(ot_study: optuna.Study, *, queued_only: bool, holder: str) -> optuna.Trial | None:
    """Take the next trial for this driver, or None when there is nothing left to take.

    ``queued_only`` (the grid): take queued trials only, skipping duplicates; otherwise ask
    Optuna, which takes a queued trial if any and else samples a new one.
    """
    storage = ot_study._storage
    with warnings.catch_warnings():  # Optuna expects heartbeats with Study.optimize only
        warnings.simplefilter("ignore", UserWarning)
        if not queued_only:
            trial = ot_study.ask()
            _take(storage, trial._trial_id, holder)
            return trial
        for queued in ot_study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            try:
                if not storage.set_trial_state_values(queued._trial_id, TrialState.RUNNING):
                    continue  # another driver took it first
            except UpdateFinishedTrialError:
                continue
            _take(storage, queued._trial_id, holder)
            earlier = _earlier_holder(ot_study, queued)
            if earlier is not None:
                storage.set_trial_user_attr(queued._trial_id, DUPLICATE_ATTR, earlier.number)
                fail_trial(storage, queued._trial_id, f"duplicate of trial {earlier.number}")
                continue
            return optuna.Trial(ot_study, queued._trial_id)
    return None


def _take(storage: optuna.storages.BaseStorage, trial_id: int, holder: str) -> None:
    """Name ``holder`` on a trial it has just set RUNNING; the first heartbeat goes first, so a
    named trial is never without one (see :func:`recover_stale`)."""
    if isinstance(storage, BaseHeartbeat):
        storage.record_heartbeat(trial_id)
    storage.set_trial_system_attr(trial_id, DRIVER_ATTR, holder)


def duplicates(trials: Iterable[FrozenTrial]) -> dict[str, int]:
    """Skipped queue duplicates, and points trained to completion more than once."""
    skipped = 0
    finished: dict[Point | None, int] = {}
    for trial in trials:
        if DUPLICATE_ATTR in trial.user_attrs:
            skipped += 1
        elif trial.state in _DONE and point_of(trial) is not None:
            finished[point_of(trial)] = finished.get(point_of(trial), 0) + 1
    return {
        "skipped_duplicates": skipped,
        "trained_twice": sum(count - 1 for count in finished.values() if count > 1),
    }
