"""What Ray does to a run, made into trial outcomes or one line (real Ray, real training):
a trial worker SIGKILLed is retried from its checkpoint and then fails naming what killed it;
Ray's memory monitor killing workers fails those trials and the study goes on; a GPU asked on
this CPU-only machine, or an address where no Ray answers, is one line and exit code 2."""

from __future__ import annotations

import inspect
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import ray
from conftest import cli_env
from optuna.trial import TrialState
from ray.air.execution._internal.actor_manager import RayActorManager
from ray.air.execution._internal.tracked_actor_task import TrackedActorTask
from ray.air.execution.resources import FixedResourceManager, ResourceRequest
from ray.exceptions import OutOfMemoryError

from scaling_search import driver
from scaling_search.config import load_study
from scaling_search.data.sources import load_data
from scaling_search.driver._ray_compat import (
    LostWorker,
    ended_jobs,
    this_job,
    trial_failures_for_lost_workers,
)
from scaling_search.study.storage import open_storage, resolve_url

pytestmark = pytest.mark.slow

ERROR = "scaling-search: error: "


def _cli(study: Path, *args: str, env: dict[str, str] | None = None, ray_tmp: str):
    return subprocess.run(
        [sys.executable, "-m", "scaling_search.cli", "run", str(study), *args],
        env={**cli_env(), "RAY_TMPDIR": ray_tmp, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_ray_tune_private_actor_manager_is_as_the_compat_module_expects(ray_local: None):
    """tests the one private name of Ray Tune the driver wraps (driver/_ray_compat.py)."""
    parameters = list(inspect.signature(RayActorManager._actor_task_failed).parameters)
    assert parameters == ["self", "tracked_actor_task", "exception"]
    trial_failures_for_lost_workers()
    trial_failures_for_lost_workers()  # idempotent: wrapped once

    @ray.remote(num_cpus=0)
    class Idle:
        def ping(self) -> str:
            return "pong"

    manager = RayActorManager(FixedResourceManager({"CPU": 1}))
    errors: list[BaseException] = []
    tracked = manager.add_actor(Idle, kwargs={}, resource_request=ResourceRequest([{"CPU": 1}]))
    while not manager.num_live_actors:
        manager.next(timeout=1)
    task = TrackedActorTask(tracked, on_error=lambda _actor, exc: errors.append(exc))
    # How Ray reports a worker its memory monitor killed: Tune alone raises RuntimeError.
    oom = OutOfMemoryError("1 worker(s) were killed due to the node running low on memory")
    manager._actor_task_failed(task, oom)
    assert len(errors) == 1 and isinstance(errors[0], LostWorker)
    assert errors[0].cause is oom
    assert manager.num_live_actors == 0  # handled as the actor's death


def test_rays_job_table_says_which_drivers_jobs_have_ended(ray_local: None):
    """tests the private job table read by driver/_ray_compat.ended_jobs: a driver that
    connected to this cluster and exited has ended; this one has not; a job named on another
    cluster is never said to have ended."""
    address = ray.get_runtime_context().gcs_address
    other = subprocess.run(
        [
            sys.executable,
            "-c",
            "import ray; from scaling_search.driver._ray_compat import this_job; "
            f"ray.init(address={address!r}, log_to_driver=False); print(this_job())",
        ],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    finished = other.stdout.strip().splitlines()[-1]
    here = this_job()
    assert here is not None
    cluster = here.partition("@")[2]
    assert cluster.startswith(address + "/") and finished.endswith("@" + cluster)
    elsewhere = finished.split("@")[0] + "@192.0.2.1:6379/" + cluster.partition("/")[2]
    restarted = finished.split("@")[0] + f"@{address}/another-head-node"
    deadline = time.monotonic() + 30  # the raylet tells the cluster as the driver disconnects
    while not ended_jobs({finished}) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ended_jobs({finished, here, elsewhere, restarted}) == {finished}


def _kill_workers(url: str, name: str, kills: dict[int, int], done: threading.Event) -> None:
    """SIGKILL the worker of a RUNNING trial that has reported an epoch: the first such
    trial once, the second twice (a new worker each retry); ``kills``: pids by trial."""
    killed: set[int] = set()
    budget: dict[int, int] = {}
    while not done.is_set():
        try:
            trials = optuna.load_study(study_name=name, storage=url).get_trials(
                deepcopy=False, states=(TrialState.RUNNING,)
            )
        except Exception:  # the driver is creating the schema right now
            trials = []
        for trial in trials:
            pid = trial.user_attrs.get("worker_pid")
            if pid is None or pid in killed or trial.user_attrs.get("epochs_completed", 0) < 1:
                continue
            if trial.number not in budget and len(budget) < 2:
                budget[trial.number] = len(budget) + 1  # the first trial once, the next twice
            if budget.get(trial.number, 0) > kills.get(trial.number, 0):
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
                kills[trial.number] = kills.get(trial.number, 0) + 1
        done.wait(0.2)


def test_a_killed_worker_is_retried_from_its_checkpoint_then_fails_naming_what_killed_it(
    ray_local: None, tiny_study: Path
):
    tiny_study.write_text(tiny_study.read_text().replace("epochs: 2", "epochs: 4"))
    study = load_study(tiny_study, ["search.trial_retries=1"])
    storage = open_storage(resolve_url(study))
    kills: dict[int, int] = {}
    done = threading.Event()
    killer = threading.Thread(
        target=_kill_workers, args=(resolve_url(study), study.name, kills, done), daemon=True
    )
    killer.start()
    lines: list[str] = []
    try:
        summary = driver.run_study(
            study, data=load_data(study.data), storage=storage, progress=lines.append
        )
    finally:
        done.set()
        killer.join()

    assert sorted(kills.values()) == [1, 2], kills
    once, twice = sorted(kills, key=kills.__getitem__)
    trials = {
        t.number: t for t in optuna.load_study(study_name=study.name, storage=storage).get_trials()
    }
    # Killed once: retried from its last checkpoint (not from scratch), and completed.
    assert trials[once].state == TrialState.COMPLETE
    assert trials[once].user_attrs["resumed_from_epoch"] >= 1
    assert trials[once].user_attrs["epochs_completed"] == study.train.epochs
    # Killed twice with one retry: FAIL, saying what happened to its worker.
    reason = trials[twice].user_attrs["fail_reason"]
    assert trials[twice].state == TrialState.FAIL
    assert "died without a Python error: killed (SIGKILL" in reason, reason
    assert any("retrying from its last checkpoint" in line for line in lines)
    # And the study went on: every other network trained.
    assert summary.failed == 1 and summary.completed == 5


def test_workers_killed_by_rays_memory_monitor_fail_their_trials_and_the_run_goes_on(
    tiny_study: Path, ray_tmp: str
):
    # A memory threshold of 1% of the machine: the monitor kills every trial's worker.
    env = {"RAY_memory_usage_threshold": "0.01", "RAY_memory_monitor_refresh_ms": "100"}
    result = _cli(tiny_study, env=env, ray_tmp=ray_tmp)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Caught unexpected exception" not in result.stderr + result.stdout
    failed = [line for line in result.stdout.splitlines() if "FAILED:" in line]
    assert len(failed) == 6  # every network tried, none took the run down
    assert all("killed by Ray's memory monitor" in line for line in failed), failed
    assert result.stderr.strip().splitlines()[-1].startswith(ERROR + "study 'tiny' has no trial")


def test_a_gpu_asked_on_this_cpu_only_machine_is_one_line(tiny_study: Path, ray_tmp: str):
    result = _cli(tiny_study, "--set", "resources.gpus_per_trial=1", ray_tmp=ray_tmp)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        ERROR + "resources.gpus_per_trial: a trial asks for 1 GPU(s), but no node of the Ray "
        "cluster has that much (the most any node offers: 0 GPU(s); "
        + result.stderr.split("0 GPU(s); ", 1)[1].strip()
    ]
    assert "1 node(s): 2 CPU, 0 GPU" in result.stderr
    assert "Traceback" not in result.stderr


def test_more_cpus_per_trial_than_any_node_has_is_one_line(tiny_study: Path, ray_tmp: str):
    result = _cli(tiny_study, "--set", "resources.cpus_per_trial=3", ray_tmp=ray_tmp)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(ERROR + "resources.cpus_per_trial: a trial asks for 3 CPU(s)")
    assert "the most any node offers: 2 CPU(s)" in line


def test_more_memory_per_trial_than_any_node_has_is_one_line(tiny_study: Path, ray_tmp: str):
    result = _cli(tiny_study, "--set", "resources.memory_per_trial=60TiB", ray_tmp=ray_tmp)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(
        ERROR + "resources.memory_per_trial: a trial asks for 61440.00 GiB of memory, but no node"
    ), line
    assert "GiB of memory; 1 node(s)" in line


def test_an_address_where_no_ray_answers_is_one_line(tiny_study: Path, ray_tmp: str):
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = _cli(tiny_study, "--address", f"127.0.0.1:{port}", ray_tmp=ray_tmp)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(ERROR + f"--address 127.0.0.1:{port}: no Ray cluster answers there")
    assert "ray start --head" in line
    assert not (tiny_study.parent / "runs" / "optuna.db").exists()  # nothing written


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of ``pid``'s child processes, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(parent) == pid:
            found.append((int(entry.name), command))
    return found


def test_the_local_raylet_killed_ends_the_run_with_one_line_and_keeps_rays_logs(
    tiny_study: Path, tmp_path: Path, ray_tmp: str
):
    study = load_study(tiny_study)
    proc = subprocess.Popen(
        [sys.executable, "-m", "scaling_search.cli", "run", str(tiny_study)],
        env={**cli_env(), "RAY_TMPDIR": ray_tmp},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:  # the first trial is recorded: trials are running
        if " done, " in line:
            break
    (raylet,) = [pid for pid, command in _children(proc.pid) if "raylet/raylet" in command]
    os.kill(raylet, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    (line,) = err.strip().splitlines()
    assert line.startswith(ERROR + "the local Ray's raylet at ")
    assert "stopped answering (killed, or out of memory)" in line
    assert line.endswith("run the same command again to continue (completed trials are kept)")
    kept = Path(line.split("Ray's logs: ")[1].split(";")[0])
    assert kept.is_relative_to(study.out_dir.resolve()) and any(kept.glob("raylet*.out"))
    assert "[state-dump]" not in err
