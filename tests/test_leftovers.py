"""``scaling-search clean`` on a study folder laid out as killed runs leave it: real files, a real
SQLite study with heartbeats, the real CLI. (The driver's own removal is tested in
test_driver.py and test_faults.py, with real runs.)"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from conftest import TINY_STUDY, run_cli

from scaling_search.config import load_study
from scaling_search.study.leftovers import DRIVER_FILE, format_bytes
from scaling_search.study.liveness import driver_id
from scaling_search.study.record import DRIVER_ATTR
from scaling_search.study.storage import open_storage, resolve_url

HOUR_S = 3600.0


def _experiment(ray: Path, name: str, *, study: str, driver: str | None, age_s: float) -> Path:
    """A Ray Tune experiment folder as a run leaves it: state files, one trial with its results
    and its last checkpoint (random bytes standing in for the weights), all ``age_s`` old."""
    path = ray / name
    trial = path / "train_trial_0a1b2c3d_1_alpha=1.2000,beta=1.1000,gamma=1.1500,seed=0"
    (trial / "checkpoint_000002").mkdir(parents=True)
    (trial / "checkpoint_000002" / "state.pt").write_bytes(os.urandom(50_000))
    (trial / "result.json").write_text('{"epoch": 2, "accuracy": 0.5}\n')
    (trial / "params.json").write_text('{"alpha": 1.2}\n')
    (path / "experiment_state-2026-12-06_10-00-00.json").write_text("{}\n")
    if driver is not None:
        (path / DRIVER_FILE).write_text(json.dumps({"study": study, "driver": driver}))
    stamp = time.time() - age_s
    for root, _dirs, files in os.walk(path):
        for entry in [root, *(os.path.join(root, f) for f in files)]:
            os.utime(entry, (stamp, stamp))
    return path


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _trials(url: str) -> list[tuple[int, str, dict[str, object]]]:
    trials = optuna.load_study(study_name="tiny", storage=url).get_trials()
    return [(t.number, t.state.name, t.system_attrs) for t in trials]


def _remote_trial(url: str, holder: str, *, heartbeat_age_s: float) -> None:
    """A RUNNING trial held by a driver on another host, with its last heartbeat that old."""
    storage = open_storage(url)
    trial_id = optuna.load_study(study_name="tiny", storage=storage).ask()._trial_id
    storage.set_trial_system_attr(trial_id, DRIVER_ATTR, holder)
    storage.record_heartbeat(trial_id)
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as connection:
        connection.execute(
            sqlalchemy.text(
                "UPDATE trial_heartbeats SET heartbeat = datetime('now', :age) WHERE trial_id = :id"
            ),
            {"age": f"-{heartbeat_age_s:.0f} seconds", "id": trial_id},
        )
    engine.dispose()


@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")
def test_clean_removes_what_gone_drivers_left_and_keeps_the_rest(tmp_path: Path):
    study_file = tmp_path / "tiny.yaml"
    # The folder given with --set, as every command takes it.
    study_file.write_text(TINY_STUDY.format(name="tiny", out=tmp_path / "not-here"))
    overrides = ["--set", f"output_dir={tmp_path / 'runs'}"]
    study = load_study(study_file, [overrides[1]])
    url = resolve_url(study)
    optuna.create_study(study_name="tiny", storage=open_storage(url))
    _remote_trial(url, "elsewhere:1:1", heartbeat_age_s=0)
    _remote_trial(url, "elsewhere:2:2", heartbeat_age_s=HOUR_S)
    results = {name: study.out_dir / name for name in ("report.html", "family.json")}
    results["report.html"].write_text("<html>report</html>")
    results["family.json"].write_text('{"members": []}')
    before = {name: _digest(path) for name, path in results.items()}
    trials_before = _trials(url)

    ended = subprocess.Popen(["true"])
    ended.wait()
    here = socket.gethostname()
    ray = study.out_dir / "ray"
    folders = {
        # The driver is a process of this host that has ended: removed, however recent.
        "killed": ("tiny-20261206-100000-11", f"{here}:{ended.pid}:1", 0.0),
        # This test's own process is a live driver on this host: kept.
        "live": ("tiny-20261206-100001-12", driver_id(), HOUR_S),
        # Another host: heartbeats decide, fresh (kept) or an hour old (removed).
        "remote_live": ("tiny-20261206-100002-13", "elsewhere:1:1", HOUR_S),
        "remote_dead": ("tiny-20261206-100003-14", "elsewhere:2:2", 0.0),
        # Another host, holding no trial: removed once unchanged for the heartbeat grace.
        "remote_silent": ("tiny-20261206-100004-15", "elsewhere:3:3", HOUR_S),
        # Folders that name no driver (as earlier versions wrote them): the same rule.
        "unnamed_old": ("tiny-20261206-100005-16", None, HOUR_S),
        "unnamed_recent": ("tiny-20261206-100006-17", None, 0.0),
    }
    paths = {
        key: _experiment(ray, name, study="tiny", driver=driver, age_s=age)
        for key, (name, driver, age) in folders.items()
    }
    # Another study's run in the same folder is never touched, whatever its age.
    other = _experiment(ray, "tiny-x-20261206-100000-18", study="tiny-x", driver=None, age_s=HOUR_S)
    other_marked = _experiment(
        ray, "tiny-20261206-100007-19", study="tiny-x", driver="elsewhere:4:4", age_s=HOUR_S
    )
    gone = ("killed", "remote_dead", "remote_silent", "unnamed_old")
    sizes = {key: _size(paths[key]) for key in gone}

    result = run_cli("clean", str(study_file), *overrides)

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    for key, path in paths.items():
        assert path.exists() == (key not in gone), key
    for key in gone:
        assert f"removed {paths[key]} ({format_bytes(sizes[key])})" in lines
    total = sum(sizes.values())
    assert lines[-1] == f"removed 4 folder(s), {format_bytes(total)} ({total} bytes); kept 3"
    kept = {line.split(":")[0].removeprefix("kept ") for line in lines if line.startswith("kept")}
    assert kept == {str(paths[key]) for key in ("live", "remote_live", "unnamed_recent")}
    assert f"its driver {driver_id()} is running" in result.stdout
    assert other.exists() and other_marked.exists()
    assert {name: _digest(path) for name, path in results.items()} == before
    assert _trials(url) == trials_before and len(trials_before) == 2
    assert not (tmp_path / "not-here").exists()


def test_clean_of_a_study_never_run_writes_nothing(tmp_path: Path):
    study_file = tmp_path / "tiny.yaml"
    study_file.write_text(TINY_STUDY.format(name="tiny", out=tmp_path / "runs"))

    result = run_cli("clean", str(study_file))

    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        f"nothing to clean: no Ray Tune folder of study 'tiny' in {tmp_path / 'runs' / 'ray'}\n"
    )
    assert not (tmp_path / "runs").exists()
