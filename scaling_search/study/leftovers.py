"""What runs leave under a study's folder (Ray Tune's experiments, with the trials' weights), and
removing it once the run that wrote it is gone.

Ray Tune writes each stage of a run (the search, racing) as an experiment folder under
``<output_dir>/ray/``: its state, each trial's results and the trial's checkpoint (the model and
optimizer state of its last epoch). The Optuna study records everything a trial did, and a run
never resumes from these files (the trials a killed run left are trained again from the start),
so they matter only while their own run may still retry a trial from its checkpoint. The driver
removes a trial's checkpoints once its end is recorded and the stage's folder once the stage
ends (unless ``run --keep-checkpoints``); what a killed run left, ``scaling-search clean`` or
the study's next finished run removes.

Each folder names the driver that writes it (:data:`DRIVER_FILE`), and is removed only once that
driver is gone (:func:`scaling_search.study.liveness.driver_alive`); where nothing says (a folder
that names no driver, or a driver on another host that holds no trial right now), once nothing in it
has changed for the heartbeat grace.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from scaling_search.config import StudyConfig
from scaling_search.study.storage import HEARTBEAT_GRACE_S

if TYPE_CHECKING:
    import optuna

__all__ = [
    "DRIVER_FILE",
    "RAY_FOLDER",
    "Experiment",
    "Sweep",
    "experiments",
    "format_bytes",
    "new_experiment",
    "remove_experiment",
    "sweep",
]

RAY_FOLDER = "ray"  # under the study's output_dir: Ray Tune's storage_path
DRIVER_FILE = "scaling-search-driver.json"  # in an experiment folder: its study and driver


@dataclass(frozen=True)
class Experiment:
    """One experiment folder of a study, as found on disk."""

    path: Path
    driver: str | None  # the driver_id() that writes it; None for a folder that names none
    size_bytes: int  # the files in it, apparent size
    changed_at: float  # the newest modification time in it (seconds since the epoch)


@dataclass(frozen=True)
class Sweep:
    """What :func:`sweep` removed, and what it kept with why."""

    removed: list[Experiment]
    kept: list[tuple[Experiment, str]]

    @property
    def removed_bytes(self) -> int:
        return sum(experiment.size_bytes for experiment in self.removed)


def new_experiment(study: StudyConfig, driver: str) -> Path:
    """Make this stage's experiment folder (a new one per Tuner) and name its driver in it."""
    name = f"{study.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    path = (study.out_dir / RAY_FOLDER / name).resolve()
    path.mkdir(parents=True, exist_ok=True)
    marker = json.dumps({"study": study.name, "driver": driver})
    (path / DRIVER_FILE).write_text(marker + "\n", encoding="utf-8")
    return path


def experiments(study: StudyConfig) -> list[Experiment]:
    """The study's experiment folders under ``<output_dir>/ray``, oldest name first."""
    folder = study.out_dir / RAY_FOLDER
    if not folder.is_dir():
        return []
    # Before folders named their driver, the name alone told the study: NAME-YYYYmmdd-HHMMSS-PID.
    unnamed = re.compile(rf"{re.escape(study.name)}-\d{{8}}-\d{{6}}-\d+")
    found = []
    for path in sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink()):
        marker = _read_marker(path / DRIVER_FILE)
        if marker is not None and marker.get("study") == study.name:
            driver = marker.get("driver")
            owner = driver if isinstance(driver, str) else None
        elif marker is None and unnamed.fullmatch(path.name):
            owner = None
        else:  # another study's, in a shared output_dir
            continue
        with contextlib.suppress(FileNotFoundError):  # removed meanwhile: nothing to report
            found.append(_measure(path, owner))
    return found


def _read_marker(path: Path) -> dict[str, object] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _measure(path: Path, driver: str | None) -> Experiment:
    size, changed = 0, path.lstat().st_mtime
    for root, dirs, files in os.walk(path):
        for name, is_file in [(d, False) for d in dirs] + [(f, True) for f in files]:
            try:
                info = os.lstat(os.path.join(root, name))
            except FileNotFoundError:  # removed meanwhile
                continue
            changed = max(changed, info.st_mtime)
            size += info.st_size if is_file else 0
    return Experiment(path, driver, size, changed)


def sweep(study: StudyConfig, ot_study: optuna.Study | None) -> Sweep:
    """Remove the study's experiment folders whose driver is gone; keep the others, saying why.

    ``ot_study`` (None if the study has no record) tells which drivers on other hosts still
    hold trials with fresh heartbeats.
    """
    from scaling_search.study.liveness import driver_alive

    now = time.time()
    removed: list[Experiment] = []
    kept: list[tuple[Experiment, str]] = []
    for experiment in experiments(study):
        alive = None if experiment.driver is None else driver_alive(ot_study, experiment.driver)
        quiet_s = now - experiment.changed_at
        if alive:
            kept.append((experiment, f"its driver {experiment.driver} is running"))
        elif alive is None and quiet_s < HEARTBEAT_GRACE_S:
            whose = f"driver {experiment.driver}" if experiment.driver else "a driver"
            kept.append(
                (
                    experiment,
                    f"changed {quiet_s:.0f} s ago and {whose} may still be running "
                    f"(removed once unchanged for {HEARTBEAT_GRACE_S} s)",
                )
            )
        else:
            remove_experiment(experiment.path)
            removed.append(experiment)
    _remove_if_empty(study.out_dir / RAY_FOLDER)
    return Sweep(removed, kept)


def remove_experiment(path: Path) -> None:
    """Remove an experiment folder; files that vanish meanwhile are no error."""
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():  # what ignore_errors passed over, once more, with the error this time
        shutil.rmtree(path)
    _remove_if_empty(path.parent)


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not empty, or not there: both fine
        folder.rmdir()


def format_bytes(size: int) -> str:
    """``1.1 GiB``, ``12 MiB``, ``980 B``: binary units, as ``du -h`` counts them."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            value = size / scale
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{size} B"
