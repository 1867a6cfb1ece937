"""Ctrl-C and SIGTERM on a real run (the CLI in a subprocess, real Ray, real training): the run
stops, records what it was running as interrupted, starts no further stage, exits 130 / 143 with
one line, and the next run continues where the study stood (scaling_search.driver.interrupt)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
from conftest import cli_env, run_cli
from optuna.trial import FrozenTrial, TrialState

from scaling_search.config import StudyConfig, load_study
from scaling_search.driver.interrupt import INTERRUPTED_LINE
from scaling_search.study import ledger, racing
from scaling_search.study.storage import resolve_url, study_exists

pytestmark = pytest.mark.slow

LAST_LINE = f"scaling-search: {INTERRUPTED_LINE}"


class Run:
    """``scaling-search run STUDY`` in its own session (as a terminal's foreground job)."""

    def __init__(self, study_file: Path, ray_tmp: str, log: Path) -> None:
        self.log, self.err = log, log.with_suffix(".err")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "scaling_search.cli", "run", str(study_file)],
            env={**cli_env(), "RAY_TMPDIR": ray_tmp},
            start_new_session=True,
            stdout=log.open("w"),
            stderr=self.err.open("w"),
        )

    def wait_for(self, what: str, condition: Callable[[], bool], timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None, f"the run ended before {what}: {self.output()}"
            assert time.monotonic() < deadline, f"no {what} after {timeout} s: {self.output()}"
            time.sleep(0.3)

    def output(self) -> str:
        return self.log.read_text() + self.err.read_text()

    def finish(self, timeout: float = 120) -> int:
        return self.proc.wait(timeout)


def _trials(study: StudyConfig) -> list[FrozenTrial]:
    url = resolve_url(study)
    if not study_exists(url, study.name):
        return []
    return optuna.load_study(study_name=study.name, storage=url).get_trials(deepcopy=False)


def _training(study: StudyConfig, stage: str) -> bool:
    """A trial of ``stage`` is RUNNING and has reported an epoch: stopped mid-training."""
    return any(
        t.state == TrialState.RUNNING
        and ledger.stage_of(t) == stage
        and t.user_attrs.get("epochs_completed", 0) >= 1
        for t in _trials(study)
    )


def _finished(study: StudyConfig) -> dict[tuple[str, int] | None, tuple[int, float | None]]:
    return {
        ledger.point_of(t): (t.number, t.value)
        for t in _trials(study)
        if t.state == TrialState.COMPLETE and not ledger.is_shared(t)
    }


def _assert_stopped_cleanly(study: StudyConfig, signame: str) -> list[FrozenTrial]:
    """Nothing left RUNNING; the trials it stopped are given back, saying why."""
    trials = _trials(study)
    assert [t.number for t in trials if t.state == TrialState.RUNNING] == []
    stopped = [
        t for t in trials if f"interrupted by {signame}" in t.user_attrs.get("fail_reason", "")
    ]
    assert stopped, "the signal should have stopped a running trial"
    assert all(t.state == TrialState.FAIL and t.user_attrs["given_back"] for t in stopped)
    return stopped


def test_ctrl_c_in_search_sigterm_in_racing_ctrl_c_twice_and_the_rerun_finishes(
    tiny_study: Path, tmp_path: Path, ray_tmp: str
) -> None:
    text = tiny_study.read_text().replace("epochs: 2", "epochs: 3")
    text = text.replace(
        "max_concurrent_trials: 2}", "max_concurrent_trials: 2, racing: {top_k: 1, repeats: 2}}"
    )
    tiny_study.write_text(text)
    study = load_study(tiny_study)
    assert study.search.racing is not None

    # 1. Ctrl-C during the search (the terminal signals the whole foreground group).
    run = Run(tiny_study, ray_tmp, tmp_path / "1.log")
    run.wait_for("a search trial mid-training", lambda: _training(study, "search"))
    os.killpg(run.proc.pid, signal.SIGINT)
    assert run.finish() == 130, run.output()
    assert run.err.read_text().strip().splitlines()[-1] == LAST_LINE
    assert "this run before it was stopped:" in run.log.read_text()
    assert "Tuner.restore" not in run.output()
    _assert_stopped_cleanly(study, "SIGINT")
    assert not any(ledger.stage_of(t) == "racing" for t in _trials(study))  # no next stage
    searched = _finished(study)
    status = run_cli("status", str(tiny_study), "--format", "json")
    given_back = [t for t in _trials(study) if t.user_attrs.get("given_back")]
    assert json.loads(status.stdout)["given_back"] == len(given_back) >= 1

    # 2. The rerun continues; SIGTERM (a service manager, the driver only) during racing.
    run = Run(tiny_study, ray_tmp, tmp_path / "2.log")
    run.wait_for("a racing trial mid-training", lambda: _training(study, "racing"))
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 143, run.output()
    assert run.err.read_text().strip().splitlines()[-1] == LAST_LINE
    stopped = _assert_stopped_cleanly(study, "SIGTERM")
    assert {ledger.stage_of(t) for t in stopped} == {"racing"}
    finished = _finished(study)
    for point, trained in searched.items():  # nothing finished was trained again
        assert finished[point] == trained

    # 3. Ctrl-C twice: the run ends at once, leaving its trials RUNNING for the next run.
    run = Run(tiny_study, ray_tmp, tmp_path / "3.log")
    run.wait_for("a racing trial mid-training", lambda: _training(study, "racing"))
    os.killpg(run.proc.pid, signal.SIGINT)
    time.sleep(0.2)
    os.killpg(run.proc.pid, signal.SIGINT)
    assert run.finish(timeout=30) == 130, run.output()
    assert run.err.read_text().strip().splitlines()[-1] == LAST_LINE
    assert "Traceback" not in run.output()

    # 4. The last run finishes the study: each (network, seed) trained to the end once.
    run = Run(tiny_study, ray_tmp, tmp_path / "4.log")
    assert run.finish(timeout=600) == 0, run.output()
    assert "best:" in run.log.read_text()
    trials = _trials(study)
    assert [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)] == []
    assert ledger.duplicates(trials)["trained_twice"] == 0
    finished = _finished(study)
    for point, trained in searched.items():
        assert finished[point] == trained
    raced = [t for t in trials if ledger.stage_of(t) == "racing" and t.state == TrialState.COMPLETE]
    assert sorted(t.user_attrs["seed"] for t in raced) == sorted(
        racing.racing_seeds(study) * study.search.racing.top_k
    )
    search_seeds = set(ledger.seeds(study))
    assert all(
        point[1] in search_seeds
        for t in trials
        if ledger.stage_of(t) == "search" and (point := ledger.point_of(t)) is not None
    )
