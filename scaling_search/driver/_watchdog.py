"""The Ray processes a run depends on, watched: their loss ends the run with one line.

When the raylet of the driver's node dies (killed, out of memory) or the cluster's head (GCS)
goes away, Ray's own reaction is to print its state dump and end the driver from compiled code,
with no word that says what happened or what to do. So, while trials run, a thread knocks on
both ports (public addresses from ``ray.nodes()`` and the runtime context) every
:data:`INTERVAL_S`; after :data:`MISSES` knocks in a row that nobody answers, it copies Ray's
logs into the study's folder, prints one line and ends the process with exit code 1. The trials
it leaves RUNNING are recognised by the next run as a dead driver's, and trained again.

Ray's console output (its error listener, its loggers) goes to ``<output_dir>/logs/`` for the
whole run (:func:`ray_output_to`), so none of it reaches the terminal.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

import ray

__all__ = ["RayWatchdog", "TerminalLines", "ray_output_to"]

INTERVAL_S = 2.0
MISSES = 3  # knocks in a row without an answer before a process counts as gone


@contextlib.contextmanager
def ray_output_to(path: Path) -> Iterator[TextIO]:
    """Point ``sys.stdout``/``sys.stderr`` at ``path`` while inside (Ray prints there, at the
    moment it prints); yields the terminal's stdout, for the run's own lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    terminal_out, terminal_err = sys.stdout, sys.stderr
    with path.open("a", encoding="utf-8", buffering=1) as log:
        sys.stdout = sys.stderr = log
        try:
            yield terminal_out
        finally:
            sys.stdout, sys.stderr = terminal_out, terminal_err


class TerminalLines:
    """The run's own lines, printed to the stdout it started with (Ray's output goes to the
    study's logs meanwhile). Tune pickles its callbacks, which hold this, for its own restore
    (unused here): the copy prints to whatever stdout is then."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def __call__(self, line: str) -> None:
        print(line, file=self._stream, flush=True)

    def __getstate__(self) -> dict[str, object]:
        return {}

    def __setstate__(self, state: dict[str, object]) -> None:
        self._stream = sys.stdout


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=INTERVAL_S):
            return True
    except OSError:
        return False


class RayWatchdog:
    """Knocks on the GCS and on this node's raylet until stopped (a context manager)."""

    def __init__(self, logs: Path, *, local: bool, end: Callable[[str], None] | None = None):
        self._logs, self._local = logs, local
        self._end = end or _end_process
        self._stop = threading.Event()
        self._targets = self._find_targets()
        self._thread = threading.Thread(target=self._run, name="scaling-search-watchdog")
        self._thread.daemon = True

    def _find_targets(self) -> dict[str, tuple[str, int]]:
        context = ray.get_runtime_context()
        targets = {}
        host, _, port = context.gcs_address.rpartition(":")
        head = "the local Ray's GCS" if self._local else "the Ray cluster's head (GCS)"
        targets[f"{head} at {context.gcs_address}"] = (host, int(port))
        for node in ray.nodes():
            if node.get("NodeID") == context.get_node_id():
                address, port = node["NodeManagerAddress"], int(node["NodeManagerPort"])
                where = "the local Ray's raylet" if self._local else "this node's raylet"
                targets[f"{where} at {address}:{port}"] = (address, port)
        return targets

    def __enter__(self) -> RayWatchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        misses = dict.fromkeys(self._targets, 0)
        while not self._stop.wait(INTERVAL_S):
            for name, (host, port) in self._targets.items():
                misses[name] = 0 if _answers(host, port) else misses[name] + 1
                if misses[name] >= MISSES and not self._stop.is_set():
                    self._end(self._message(name))
                    return

    def _message(self, name: str) -> str:
        kept = self._keep_logs()
        cause = "killed, or out of memory" if self._local else "stopped, or unreachable"
        return (
            f"{name} stopped answering ({cause}); Ray's logs: {kept}; run the same command "
            "again to continue (completed trials are kept)"
        )

    def _keep_logs(self) -> Path:
        """Copy this Ray session's logs into the study's folder (where they outlive /tmp)."""
        context = ray.get_runtime_context()
        session_logs = Path(context.get_temp_dir()) / context.get_session_name() / "logs"
        target = self._logs / f"ray-{context.get_session_name()}"
        with contextlib.suppress(OSError):
            shutil.copytree(session_logs, target, dirs_exist_ok=True)
        return target if target.is_dir() else session_logs


def _end_process(message: str) -> None:
    """One line on the terminal's stderr (fd 2, whatever sys.stderr is now) and exit 1."""
    os.write(2, f"scaling-search: error: {message}\n".encode())
    time.sleep(0.1)
    os._exit(1)
