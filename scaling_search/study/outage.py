"""The study's database going away under a running study: waited for, or the end of the run.

A driver writes to the study all the time: a heartbeat for each trial it holds, each epoch's
result, each trial's end, the next trial's claim. When the database stops answering (a
PostgreSQL server restarted, a network cut, a SQLite file locked past its timeout), the driver:

- says so once, and launches nothing more while it is away; running trials go on training;
- retries every write it could not make, in the order they were made, with exponential backoff
  (:func:`backoff_s`); the heartbeat thread probes the same way, so that the driver's trials
  beat again within seconds of the database's return and it goes on (said once);
- if the database stays away for the run's patience (:data:`PATIENCE_S` unless the run says
  otherwise), stops its trials and ends the run with one line (:class:`DatabaseAway`): how long,
  why, and which trials' results could not be recorded (the next run trains those again).

No result is dropped without a word: a write is retried until it lands or is named in that line.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from scaling_search.study.storage import HEARTBEAT_GRACE_S, describe_error, unreachable

__all__ = [
    "BACKOFF_CAP_S",
    "PATIENCE_S",
    "DatabaseAway",
    "DatabaseWatch",
    "backoff_s",
    "failure_line",
]

# The default patience: the heartbeat grace. Past it, a driver starting elsewhere may judge this
# one dead (its heartbeats are stale) and fail its trials, so going on would race that driver.
PATIENCE_S = float(HEARTBEAT_GRACE_S)
BACKOFF_FIRST_S = 0.5
BACKOFF_CAP_S = 5.0  # the database's return is noticed within this


def backoff_s(attempt: int) -> float:
    """How long to wait before try number ``attempt + 1`` of a write that failed ``attempt + 1``
    times: 0.5 s, doubling, at most :data:`BACKOFF_CAP_S`."""
    return min(BACKOFF_CAP_S, BACKOFF_FIRST_S * 2 ** min(attempt, 16))


def failure_line(exc: BaseException) -> str | None:
    """The one line for a database error that reached the command outside a run's retries (the
    database away while a run opens, plans or sums up, or a write it refused), said as what it
    is; None for an error that is not the database's."""
    from optuna.exceptions import StorageInternalError
    from sqlalchemy.exc import SQLAlchemyError

    if unreachable(exc):
        return (
            f"the study's database did not answer ({describe_error(exc)}); run the same "
            "command again once it answers"
        )
    if isinstance(exc, StorageInternalError | SQLAlchemyError):
        return f"the study's database refused an operation: {describe_error(exc)}"
    return None


class DatabaseAway(Exception):
    """The study's database stayed away past the run's patience; the message is the one line
    the command prints."""


class DatabaseWatch:
    """Whether the study's database answers, as seen by every thread of the driver that writes.

    Each thread reports a write the database did not answer (:meth:`failed`, or :meth:`retry`,
    which also waits before the next try) and the first one it answered after that
    (:meth:`answered`). The watch gives up, for good, at the first failure seen once the
    database has been away for ``patience_s``.
    """

    def __init__(
        self,
        where: str = "",
        *,
        patience_s: float = PATIENCE_S,
        say: Callable[[str], None] = print,
    ) -> None:
        self._where = f" at {where}" if where else ""  # a URL already masked
        self.patience_s = patience_s
        self._say = say
        self._lock = threading.Lock()
        self._since: float | None = None  # when the current outage began (time.monotonic)
        self._reason = ""
        self._away_s = 0.0
        self._gave_up = False
        self._said: set[str] = set()

    # Tune pickles the run's stopper, which holds this (tuner.pkl): a copy keeps the state only.
    def __getstate__(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_say")}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._lock, self._say = threading.Lock(), print

    @property
    def away(self) -> bool:
        """The last write failed for want of an answer, and none has been answered since."""
        return self._since is not None

    @property
    def gave_up(self) -> bool:
        """The database stayed away past the patience: the run ends."""
        return self._gave_up

    def failed(self, exc: BaseException) -> None:
        """A write the database did not answer (``exc`` says why)."""
        now = time.monotonic()
        with self._lock:
            self._reason = describe_error(exc)
            first = self._since is None
            if self._since is None:
                self._since = now
            self._away_s = now - self._since
            if self._away_s >= self.patience_s:
                self._gave_up = True
        if first:
            self._say(
                f"the study's database stopped answering ({self._reason}); launching nothing "
                f"more while it is away, retrying for up to {self.patience_s:.0f} s"
            )

    def answered(self) -> None:
        """A write (or a probe) the database answered."""
        if self._since is None:
            return
        with self._lock:
            since, self._since = self._since, None
        if since is not None and not self._gave_up:
            self._say(
                f"the study's database answers again after {time.monotonic() - since:.0f} s "
                "away; launching again"
            )

    def retry(self, exc: BaseException, attempt: int) -> bool:
        """Whether a write that raised ``exc`` on try ``attempt + 1`` should be tried again; if
        so, after waiting :func:`backoff_s`. No for an error that is not the database being
        away (it is raised as it is), and no once the watch has given up."""
        if not unreachable(exc):
            return False
        self.failed(exc)
        if self._gave_up:
            return False
        time.sleep(backoff_s(attempt))
        return True

    def say_once(self, key: str, line: str) -> None:
        """Say ``line`` the first time something under ``key`` happens."""
        with self._lock:
            if key in self._said:
                return
            self._said.add(key)
        self._say(line)

    def ending(self, lost: Iterable[int] = ()) -> str:
        """The line that ends a run the database stayed away from; ``lost``: the numbers of the
        trials whose results could not be recorded."""
        numbers = sorted(set(lost))
        results = ""
        if numbers:
            results = (
                f", and the results of trial(s) {', '.join(map(str, numbers))} could not be "
                "recorded (the next run trains them again)"
            )
        return (
            f"the study's database{self._where} did not answer for {self._away_s:.0f} s "
            f"({self._reason}): this run stopped its trials{results}; run the same command "
            "again once the database answers"
        )

    def check(self, lost: Iterable[int] = ()) -> None:
        """Raise :class:`DatabaseAway` with :meth:`ending` if the watch has given up."""
        if self._gave_up:
            raise DatabaseAway(self.ending(lost))
