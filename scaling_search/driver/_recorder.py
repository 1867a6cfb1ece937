"""The searcher's storage work, off Ray Tune's event loop.

Tune calls the searcher from its event loop, between one trial's end and the next trial's start.
Recording a trial in Optuna there (its epochs, timing and placement, its final state, the next
trial's claim, sample and derived values) costs tens of milliseconds of SQL per trial, during
which a worker sits idle. The :class:`Recorder` runs that work on one background thread, in the
order it was handed over, once the event loop has been quiet for a moment (so the two do not
contend for the GIL while the loop starts the next trial).

``bench/orchestration.py`` measures the gain.

A call that the study's database did not answer is tried again, after a backoff, until it is
answered or the :class:`~scaling_search.study.outage.DatabaseWatch` gives up; from then on nothing
more is tried, and the trials whose results were among what was not written are
:meth:`Recorder.lost`.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from scaling_search.study.outage import DatabaseAway, DatabaseWatch
from scaling_search.study.storage import unreachable

T = TypeVar("T")
Item = tuple[Future[Any], Callable[[], Any], bool, int | None]

QUIET_S = 0.03  # how long Tune's event loop must have been idle before recording starts


class Recorder:
    """One background thread that runs submitted calls in order, each once the caller has been
    quiet for :data:`QUIET_S`; at once while a call is wanted soon or waited for. With a
    ``watch``, a call the database did not answer is tried again (see the module)."""

    def __init__(self, quiet_s: float = QUIET_S, watch: DatabaseWatch | None = None) -> None:
        self._quiet_s = quiet_s
        self._watch = watch
        self._queue: queue.SimpleQueue[Item | None] = queue.SimpleQueue()
        self._last_call = time.monotonic()
        self._lock = threading.Lock()  # for what follows, shared with the caller's thread
        self._hurried = 0  # queued calls wanted soon, or waited for
        self._hurry = threading.Event()  # set while _hurried > 0
        self._error: BaseException | None = None
        self._lost: set[int] = set()  # trials whose results were not written (database away)
        self._thread = threading.Thread(target=self._run, name="scaling-search-recorder")
        self._thread.daemon = True  # a driver killed mid-run must still exit
        self._thread.start()

    def busy(self) -> None:
        """The caller is working now: hold queued calls back until it has been quiet again."""
        self._last_call = time.monotonic()

    def submit(
        self, call: Callable[[], T], *, soon: bool = False, trial: int | None = None
    ) -> Future[T]:
        """Queue ``call`` after everything queued before it; ``soon``: run it (and those before
        it) without waiting for quiet; ``trial``: the number of the trial whose result it
        records (named if it is lost)."""
        future: Future[T] = Future()
        if soon:
            self._hurried_by(+1)
        self._queue.put((future, call, soon, trial))
        return future

    def result(self, future: Future[T]) -> T:
        """Wait for ``future`` (and all queued before it), running them without delay."""
        self._hurried_by(+1)
        try:
            return future.result()
        except BaseException as exc:
            with self._lock:
                if exc is self._error:
                    self._error = None  # raised here: not again at flush
            raise
        finally:
            self._hurried_by(-1)

    def check(self) -> None:
        """Raise the first error that a call raised and nobody waited for (once)."""
        with self._lock:
            error, self._error = self._error, None
        if error is not None:
            raise error

    def flush(self) -> None:
        """Wait until everything queued so far has run (or, once the database watch has given
        up, was left), then :meth:`check`."""
        with contextlib.suppress(DatabaseAway):
            self.result(self.submit(lambda: None))
        self.check()

    def lost(self) -> list[int]:
        """The trials whose results were left unwritten once the database watch gave up."""
        with self._lock:
            return sorted(self._lost)

    def close(self) -> None:
        """Run what is queued, then stop the thread."""
        try:
            self.flush()
        finally:
            self._queue.put(None)
            self._thread.join()

    def _hurried_by(self, change: int) -> None:
        with self._lock:
            self._hurried += change
            if self._hurried:
                self._hurry.set()
            else:
                self._hurry.clear()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            future, call, soon, trial = item
            self._wait_for_quiet()
            try:
                future.set_result(self._call(call))
            except BaseException as exc:  # raised to whoever waits for it, else at flush
                self._failed(exc, trial)
                future.set_exception(exc)
            finally:
                if soon:
                    self._hurried_by(-1)

    def _call(self, call: Callable[[], T]) -> T:
        """``call()``, tried again while the database is away (until the watch gives up)."""
        attempt = 0
        while True:
            if self._watch is not None and self._watch.gave_up:
                raise DatabaseAway(self._watch.ending())  # the run is ending: not tried
            try:
                result = call()
            except Exception as exc:
                if self._watch is None or not self._watch.retry(exc, attempt):
                    raise
                attempt += 1
                continue
            if attempt and self._watch is not None:
                self._watch.answered()
            return result

    def _failed(self, exc: BaseException, trial: int | None) -> None:
        """Keep a call's error for :meth:`check`; one the database's absence caused once the
        watch gave up is no error of the call: its trial's result is lost, and named."""
        gave_up = self._watch is not None and self._watch.gave_up
        with self._lock:
            if gave_up and (isinstance(exc, DatabaseAway) or unreachable(exc)):
                if trial is not None:
                    self._lost.add(trial)
            elif self._error is None:
                self._error = exc

    def _wait_for_quiet(self) -> None:
        while not self._hurry.is_set():
            left = self._last_call + self._quiet_s - time.monotonic()
            if left <= 0:
                return
            self._hurry.wait(left)
