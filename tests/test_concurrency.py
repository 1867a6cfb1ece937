"""Two drivers on one PostgreSQL grid study, and a database password that never leaks.

Each driver is the real CLI with its own local Ray; they share only the Optuna study.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

from scaling_search.config import load_study
from scaling_search.space import grid_candidates
from scaling_search.study.ledger import Point, grid_classes, is_shared, point_of
from scaling_search.study.record import DRIVER_ATTR

pytestmark = pytest.mark.slow
SECRET = "Sup3rSecretPw"


def _with_password(url: str) -> str:
    """The same database with a password in the URL (trust auth accepts and ignores it)."""
    return url.replace("postgres@", f"postgres:{SECRET}@", 1)


def _cli(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "scaling_search.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _env(url: str, ray_tmp: str) -> dict[str, str]:
    return {**os.environ, "SCALING_SEARCH_STORAGE": url, "RAY_TMPDIR": ray_tmp}


def _point(trial: FrozenTrial) -> Point:
    """The (network key, seed) of a trial the ledger queued, which has one."""
    point = point_of(trial)
    assert point is not None, trial.number
    return point


def test_two_drivers_share_one_grid_study_without_losing_or_repeating_a_candidate(
    postgres_url: str, tiny_study: Path, tmp_path: Path, ray_tmp: str
):
    text = tiny_study.read_text().replace("epochs: 2", "epochs: 4")
    text = text.replace("max_concurrent_trials: 2", "max_concurrent_trials: 1")
    tiny_study.write_text(text.replace("num_cpus: 2", "num_cpus: 1"))
    env = _env(postgres_url, ray_tmp)
    drivers = [_cli("run", str(tiny_study), cwd=tmp_path, env=env) for _ in range(2)]
    logs = [proc.communicate(timeout=540)[0] for proc in drivers]
    assert [proc.returncode for proc in drivers] == [0, 0], logs

    study = load_study(tiny_study)
    # One output folder for both: the first to finish kept the other's Ray Tune folder (its
    # driver was running), which that one removed when it finished.
    assert not (study.out_dir / "ray").exists(), logs
    trials = optuna.load_study(study_name=study.name, storage=postgres_url).get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    trained = [t for t in complete if not is_shared(t)]
    networks = sorted(_point(t) for t in trained)
    classes = grid_classes(study, num_classes=study.data.num_classes)
    assert networks == sorted((key, 0) for key in classes)  # each network once, none lost
    points = sorted((t.params["alpha"], t.params["beta"], t.params["gamma"]) for t in complete)
    expected = sorted(c.as_tuple() for c in grid_candidates(study.space))
    assert points == expected  # every candidate has its result, none twice
    holders = {t.system_attrs[DRIVER_ATTR] for t in trained}
    assert len(holders) == 2, f"one driver trained everything: {holders}"
    # Nothing else was trained: every other trial is a queue duplicate skipped when claimed.
    for trial in trials:
        if trial.state != TrialState.COMPLETE:
            assert trial.state == TrialState.FAIL and "duplicate_of" in trial.user_attrs

    status = subprocess.run(
        [sys.executable, "-m", "scaling_search.cli", "status", str(tiny_study), "--format=json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    reported = json.loads(status.stdout)["duplicates"]
    skipped = sum("duplicate_of" in t.user_attrs for t in trials)
    assert reported == {"skipped_duplicates": skipped, "trained_twice": 0}


def test_the_database_password_appears_in_no_output_and_no_file(
    postgres_url: str, tiny_study: Path, tmp_path: Path, ray_tmp: str
):
    tiny_study.write_text(tiny_study.read_text().replace("gamma: [1.1, 1.15]", "gamma: [1.1, 1.1]"))
    env = _env(_with_password(postgres_url), ray_tmp)
    outputs = []
    for args in (
        # Tune's files kept, to be searched below: its pickles hold the searcher.
        ["run", str(tiny_study), "--keep-checkpoints"],
        ["status", str(tiny_study)],
        ["status", str(tiny_study), "--format", "json"],
        ["best", str(tiny_study)],
        ["run", str(tiny_study), "--set", "train.epochs=3"],  # refused: settings differ
    ):
        output = _cli(*args, cwd=tmp_path, env=env).communicate(timeout=300)[0]
        outputs.append(output)
        assert SECRET not in output, args
    assert "***@" in outputs[1]  # status names the storage, masked
    assert "study 'tiny' was recorded with other settings" in outputs[-1]

    # Nothing the run wrote (Optuna-side files, Ray results, checkpoints, Tune's pickles) or
    # Ray's session logs holds the password.
    for folder in (tmp_path, Path(ray_tmp)):
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert SECRET.encode() not in path.read_bytes(), path
