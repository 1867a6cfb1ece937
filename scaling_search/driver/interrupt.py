"""Ctrl-C and SIGTERM during a run: stop cleanly once, at once the second time.

Ray Tune's own handler swallows the first SIGINT, lets ``Tuner.fit`` return as if the run had
ended, and prints advice about ``Tuner.restore``, which this project does not use (the Optuna
study is what a rerun continues from). So the ``run`` command handles both signals itself:

- while a stage's trials run (:meth:`StopRequest.graceful`), the first signal only asks the
  driver to stop: it launches nothing more, stops the running trials, records them as
  interrupted (the next run trains them again), gives back the trials it claimed ahead and then
  raises :class:`Interrupted`; no further stage starts;
- anywhere else (loading data, planning, starting Ray) it raises :class:`Interrupted` at once;
- a second signal ends the process at once (``os._exit``: an exception raised inside Ray's
  compiled code would come out as a SystemError). The trials it was running stay RUNNING in the
  study under a driver that is gone, which the next run recognises at once on this host and
  trains again; Ray's own reaper stops the local Ray's processes.

The command prints "interrupted; run the same command again to continue" and exits with 128 +
the signal's number (130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

__all__ = ["INTERRUPTED_LINE", "SIGNALS", "Interrupted", "StopRequest", "handle_signals"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)
INTERRUPTED_LINE = "interrupted; run the same command again to continue"


class Interrupted(BaseException):
    """The run was stopped by a signal. A BaseException, as KeyboardInterrupt is, so that no
    ``except Exception`` on the way (Ray Tune's loop, the recorder) takes it for an error."""

    def __init__(self, signum: int, summary: Any = None) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.summary = summary  # what the run did before it stopped, where the driver knows

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @staticmethod
    def behind(exc: BaseException) -> Interrupted | None:
        """The :class:`Interrupted` that ``exc`` stands for: raised inside compiled code
        (Ray's), an exception from a signal handler comes out as a SystemError caused by it."""
        while exc is not None:
            if isinstance(exc, Interrupted):
                return exc
            exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        return None


class StopRequest:
    """Whether a signal asked the run to stop; set by the handlers of :func:`handle_signals`."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._graceful = False
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def check(self) -> None:
        """Raise :class:`Interrupted` if a signal asked the run to stop."""
        if self.signum is not None:
            raise Interrupted(self.signum)

    @contextlib.contextmanager
    def graceful(self) -> Iterator[None]:
        """While inside, a first signal only sets :attr:`requested` (the driver stops its
        trials); the handlers are installed again on entry, since ``ray.init`` replaces the
        SIGTERM handler with its own."""
        self.install()
        self._graceful = True
        try:
            yield
        finally:
            self._graceful = False

    def install(self) -> None:
        """(Re)install this request's handlers; a no-op outside the main thread."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in SIGNALS:
            previous = signal.signal(signum, self._handle)
            self._previous.setdefault(signum, previous)

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
            os.write(2, f"scaling-search: {INTERRUPTED_LINE}\n".encode())
            os._exit(128 + signum)
        if not self._graceful:
            self.signum = signum
            raise Interrupted(signum)
        self.signum = signum
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        # os.write, not print: the main thread may be inside a print of its own right now.
        os.write(
            2,
            f"scaling-search: {name}: stopping the running trials and recording them "
            "(press Ctrl-C again to stop at once)\n".encode(),
        )


@contextlib.contextmanager
def handle_signals() -> Iterator[StopRequest]:
    """Handle SIGINT and SIGTERM as described in this module while inside; the handlers
    found on entry are put back on exit."""
    request = StopRequest()
    request.install()
    try:
        yield request
    finally:
        request.restore()
