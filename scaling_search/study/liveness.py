"""Who holds a trial, and what died: driver identities, trial heartbeats, recovery.

A claimed trial records which driver holds it (host, pid, process start) and a heartbeat that the
driver refreshes every :data:`HEARTBEAT_INTERVAL_S`. A driver starting up fails (FAIL, with
``fail_reason``) the RUNNING trials whose driver is a dead process on this host, or whose
heartbeat is older than :data:`HEARTBEAT_GRACE_S` (a driver on another host); planning
(:mod:`scaling_search.study.ledger`) then queues their points again.

A heartbeat the database does not answer is tried again with backoff, and reported to the run's
:class:`~scaling_search.study.outage.DatabaseWatch` (see :mod:`scaling_search.study.outage`).
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from scaling_search import _compat
from scaling_search.study.outage import DatabaseWatch, backoff_s
from scaling_search.study.record import FAIL_REASON_ATTR, GIVEN_BACK_ATTR, TrialRecord, holder_of
from scaling_search.study.storage import (
    HEARTBEAT_GRACE_S,
    HEARTBEAT_INTERVAL_S,
    describe_error,
    unreachable,
)

__all__ = [
    "HEARTBEAT_GRACE_S",
    "HEARTBEAT_INTERVAL_S",
    "Heartbeat",
    "driver_alive",
    "driver_id",
    "fail_trial",
    "held_by_ray_jobs",
    "recover_ended_jobs",
    "recover_stale",
]

Progress = Callable[[str], None]


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
    """A daemon thread that refreshes the heartbeat of every trial this driver holds.

    With a ``watch``: a beat the database does not answer is reported to it and tried again
    after :func:`~scaling_search.study.outage.backoff_s` (not a whole interval later), and while the
    database is away the thread probes it even with no trial held, so that its return is seen.
    """

    def __init__(
        self,
        storage: optuna.storages.RDBStorage,
        interval_s: float,
        watch: DatabaseWatch | None = None,
    ) -> None:
        self._storage, self._interval, self._watch = storage, interval_s, watch
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
        failures = 0
        while not self._stop.wait(self._next_wait(failures)):
            try:
                answered = self._beat_once()
            except Exception as exc:
                failures += 1
                self._failed(exc)
                continue
            failures = 0
            if answered and self._watch is not None:
                self._watch.answered()

    def _next_wait(self, failures: int) -> float:
        away = failures or (self._watch is not None and self._watch.away)
        return min(self._interval, backoff_s(failures)) if away else self._interval

    def _beat_once(self) -> bool:
        """Beat every held trial (with none held while the database is away: probe it);
        whether the database was asked anything."""
        with self._lock:
            held = sorted(self._held)
        for trial_id in held:
            self._storage.record_heartbeat(trial_id)
        if not held and self._watch is not None and self._watch.away:
            import sqlalchemy

            with self._storage.engine.connect() as connection:
                connection.execute(sqlalchemy.text("SELECT 1"))
            return True
        return bool(held)

    def _failed(self, exc: Exception) -> None:
        if self._watch is None:
            return  # no run to tell: the next beat tries again
        if unreachable(exc):
            self._watch.failed(exc)
        else:
            self._watch.say_once(
                "heartbeat", f"a trial's heartbeat was not recorded: {describe_error(exc)}"
            )


def driver_alive(ot_study: optuna.Study | None, holder: str) -> bool | None:
    """Whether the driver ``holder`` (a :func:`driver_id`) still runs, or None where nothing says.

    On this host its process says. On another host the heartbeats of the trials it holds in
    ``ot_study`` say: alive while one is fresh, gone once all are stale; a driver holding no
    trial (or no study to ask) gives no answer.
    """
    if _on_this_host(holder):
        return not _driver_is_dead(holder)
    if ot_study is None:
        return None
    stale = _stale_heartbeats(ot_study)
    held = [
        _compat.trial_id(trial) not in stale
        for trial in ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if holder_of(trial) == holder
    ]
    return any(held) if held else None


# --- failing, recovering -------------------------------------------------------------------------


def fail_trial(
    storage: optuna.storages.BaseStorage, trial_id: int, reason: str, *, given_back: bool = False
) -> bool:
    """Mark a trial FAIL with ``reason`` as its ``fail_reason``; False if it had already ended.

    ``given_back``: not a failure of the trial but of the run (stopped by a signal, or claimed
    ahead and never started); marked so, and counted apart from failures.
    """
    try:
        if given_back:
            storage.set_trial_user_attr(trial_id, GIVEN_BACK_ATTR, True)
        storage.set_trial_user_attr(trial_id, FAIL_REASON_ATTR, reason[:500])
        return storage.set_trial_state_values(trial_id, TrialState.FAIL)
    except UpdateFinishedTrialError:
        return False


def _stale_heartbeats(ot_study: optuna.Study) -> set[int]:
    return _compat.stale_trial_ids(ot_study)


def recover_stale(ot_study: optuna.Study, progress: Progress) -> int:
    """Fail RUNNING trials whose driver is gone, so that planning queues their points again.

    A holder on this host is judged by its process (gone: fail now; alive: keep, however late
    its heartbeat); a holder on another host by its heartbeat. A trial that names no holder was
    left in the moment between being taken and being named: it fails once it is older than the
    heartbeat grace. (:func:`scaling_search.study.ledger.claim` records the first heartbeat before
    naming the holder, so a named trial always has a heartbeat.)
    """
    stale_heartbeat = _stale_heartbeats(ot_study)
    grace = timedelta(seconds=HEARTBEAT_GRACE_S)
    failed = 0
    for trial in ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        holder = holder_of(trial)
        started = trial.datetime_start or datetime.now()
        if holder is not None and _on_this_host(holder):
            if not _driver_is_dead(holder):
                continue
            reason = f"driver {holder} stopped mid-trial"
        elif _compat.trial_id(trial) in stale_heartbeat:
            reason = f"driver {holder} sent no heartbeat for {HEARTBEAT_GRACE_S} s"
        elif holder is None and datetime.now() - started > grace:
            reason = "left running by a driver that stopped before it sent a heartbeat"
        else:
            continue
        failed += fail_trial(_compat.storage_of(ot_study), _compat.trial_id(trial), reason)
    if failed:
        progress(f"marked {failed} trial(s) left running by a stopped driver as FAIL")
    return failed


def _held_by_ray_jobs(ot_study: optuna.Study) -> list[tuple[FrozenTrial, str, str]]:
    """RUNNING trials of drivers on other hosts that named their Ray job, with holder and job."""
    held = []
    for trial in ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        record = TrialRecord.of(trial)
        holder, job = record.holder, record.ray_job
        if holder is not None and job is not None and not _on_this_host(holder):
            held.append((trial, holder, job))
    return held


def held_by_ray_jobs(ot_study: optuna.Study) -> bool:
    """Whether drivers on other hosts hold RUNNING trials and named their Ray jobs: a driver
    on the same cluster can ask Ray whether they still run (:func:`recover_ended_jobs`)."""
    return bool(_held_by_ray_jobs(ot_study))


def recover_ended_jobs(
    ot_study: optuna.Study, progress: Progress, ended: Callable[[set[str]], set[str]]
) -> int:
    """Fail RUNNING trials whose driver's Ray job has ended, without waiting for the heartbeat
    grace: on a cluster (a ``docker compose run`` per driver) every driver has a host of its own,
    so no process can be looked up, but the cluster knows its jobs.

    ``ended`` is given the jobs named by such trials and returns those the cluster says have
    ended (a job of another cluster is never among them). Returns the number of trials failed.
    """
    held = _held_by_ray_jobs(ot_study)
    if not held:
        return 0
    gone = ended({job for _, _, job in held})
    failed = 0
    for trial, holder, job in held:
        if job in gone:
            reason = f"driver {holder} stopped mid-trial (its Ray job {job} has ended)"
            failed += fail_trial(_compat.storage_of(ot_study), _compat.trial_id(trial), reason)
    if failed:
        progress(f"marked {failed} trial(s) of a driver whose Ray job has ended as FAIL")
    return failed
