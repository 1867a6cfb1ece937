"""A trial's checkpoints: its newest kept while Tune may retry the trial from it, none once its
end is recorded (unless the run keeps them)."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any

from ray import tune

from scaling_search.driver._search import StudySearch

CHECKPOINT_GLOB = "checkpoint_*"  # Tune's checkpoint folders in a trial's folder


class TrialCheckpoints(tune.Callback):
    """Keep each trial's newest checkpoint only (a retry resumes from it), removing the one
    before as soon as a new one is saved; once the trial's end (COMPLETE, PRUNED or FAIL) is
    recorded, remove its checkpoints, unless ``keep`` (then its newest stays).

    Tune's ``CheckpointConfig(num_to_keep=1)`` would remove the older ones too, but it also
    snapshots the whole experiment state after every checkpoint, on the event loop (~17 ms per
    epoch here, bench/orchestration.py), for ``Tuner.restore``; this project resumes from the
    Optuna study instead.

    The removal runs on the searcher's recorder thread, after the trial's end is written: off
    Tune's event loop, and never before the study says the trial is over. Tune calls this only
    when it will not retry the trial (``on_trial_recover`` otherwise).
    """

    def __init__(self, searcher: StudySearch, *, keep: bool) -> None:
        self._searcher, self._keep = searcher, keep
        self._newest: dict[str, tune.Checkpoint] = {}

    def on_checkpoint(
        self, iteration: int, trials: list, trial: Any, checkpoint: tune.Checkpoint, **info: Any
    ) -> None:
        previous = self._newest.get(trial.trial_id)
        self._newest[trial.trial_id] = checkpoint
        if previous is None or previous.path == checkpoint.path or previous.filesystem is None:
            return
        with contextlib.suppress(FileNotFoundError):  # removed already: nothing to keep
            previous.filesystem.delete_dir(previous.path)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._newest.pop(trial.trial_id, None)
        if self._keep or not trial.path:
            return
        # The recorder has the trial's end queued already: Tune tells the searcher before the
        # callbacks, and an error's reason reaches it through ProgressCallback, listed first.
        folder = Path(trial.path)  # storage_path is a local (or mounted) folder: see _run
        self._searcher.after_recorded(lambda: remove_checkpoints(folder))

    on_trial_error = on_trial_complete


def remove_checkpoints(trial_folder: Path) -> None:
    """Remove every checkpoint folder of a trial (those of a retry included)."""
    for checkpoint in trial_folder.glob(CHECKPOINT_GLOB):
        shutil.rmtree(checkpoint, ignore_errors=True)
