"""A real multi-node Ray cluster on this machine (ray.cluster_utils.Cluster: a head and worker
nodes, each its own raylet): `scaling-search run --address` joins it, trials are placed on every
node, and a worker node that dies mid-trial costs a retry, not the study.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from scaling_search.config import load_study
from scaling_search.space import grid_candidates
from scaling_search.study.ledger import is_shared
from scaling_search.study.storage import resolve_url, study_exists

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(ray_tmp: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """A head node and one worker node with one CPU each; the worker also offers a custom
    resource "trainer". (temp_dir in the node arguments is refused by Ray; RAY_TMPDIR places the
    session instead.)"""
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    nodes = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    nodes.add_node(num_cpus=1, resources={"trainer": 2})
    nodes.wait_for_nodes()
    yield nodes
    nodes.shutdown()


def _launch(
    study_path: Path, address: str, cwd: Path, log: Path, *, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "scaling_search.cli", "run", str(study_path)]
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k != "SCALING_SEARCH_STORAGE"}
    return subprocess.Popen(
        [*command, "--address", address],
        cwd=cwd,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )


def _trials(study_path: Path) -> list[optuna.trial.FrozenTrial]:
    study = load_study(study_path)
    url = resolve_url(study)
    if not study_exists(url, study.name):
        return []
    try:
        return optuna.load_study(study_name=study.name, storage=url).get_trials()
    except KeyError:
        return []  # the driver is creating the study right now


def test_trials_run_on_every_node_of_an_existing_cluster(cluster, tiny_study: Path, tmp_path):
    log = tmp_path / "run.log"
    # `--address auto` finds the cluster the way Ray documents: through RAY_ADDRESS.
    proc = _launch(tiny_study, "auto", tmp_path, log, env={"RAY_ADDRESS": cluster.address})
    assert proc.wait(timeout=420) == 0, log.read_text()[-3000:]

    trials = _trials(tiny_study)
    study = load_study(tiny_study)
    assert len(trials) == len(grid_candidates(study.space))
    assert all(t.state == TrialState.COMPLETE for t in trials)
    nodes = {node.node_id for node in cluster.list_all_nodes()}
    used = {t.user_attrs["node_id"] for t in trials if not is_shared(t)}
    assert used == nodes, f"trials ran on {used}, the cluster has {nodes}"
    # It joined the cluster: no local Ray of its own was started.
    assert "Started a local Ray instance" not in log.read_text()


def test_a_worker_node_killed_mid_trial_costs_a_retry_not_the_study(
    cluster, tiny_study: Path, tmp_path: Path
):
    # Epochs of a fraction of a second: 20 of them, so the node dies while its trial is mid-way
    # (with 5, a fast trial could finish between the poll that picks it and the kill).
    # Two candidates (one per node) are enough here.
    text = tiny_study.read_text().replace("epochs: 2", "epochs: 20")
    tiny_grid = "alpha: [1.0, 1.3], beta: [1.0, 1.15], gamma: [1.1, 1.15]"
    assert tiny_grid in text
    text = text.replace(tiny_grid, "alpha: [1.2, 1.2], beta: [1.1, 1.15], gamma: [1.15, 1.15]")
    tiny_study.write_text(text)
    worker = next(node for node in cluster.list_all_nodes() if not node.head)
    log = tmp_path / "run.log"
    proc = _launch(tiny_study, cluster.address, tmp_path, log)

    def victim() -> optuna.trial.FrozenTrial | None:
        for trial in _trials(tiny_study):
            on_worker = trial.user_attrs.get("node_id") == worker.node_id
            # Epoch 2 recorded: epoch 1's checkpoint is surely registered with Tune by now.
            trained = trial.user_attrs.get("epochs_completed", 0) >= 2
            if trial.state == TrialState.RUNNING and on_worker and trained:
                return trial
        return None

    deadline = time.monotonic() + 300
    while (killed := victim()) is None:
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no trial reached epoch 2 on the worker node"
        time.sleep(0.3)
    cluster.remove_node(worker, allow_graceful=False)  # SIGKILLs the node's raylet and workers
    assert proc.wait(timeout=420) == 0, log.read_text()[-3000:]

    trials = {t.number: t for t in _trials(tiny_study)}
    assert all(t.state == TrialState.COMPLETE for t in trials.values()), log.read_text()[-3000:]
    retried = trials[killed.number]
    assert retried.user_attrs["node_id"] != worker.node_id  # it finished on the head node
    # From its checkpoint, not from zero.
    assert retried.user_attrs.get("resumed_from_epoch", 0) >= 1, (
        retried.user_attrs,
        log.read_text()[-3000:],
    )
    assert "retrying from its last checkpoint" in log.read_text()


def test_custom_resources_from_the_study_place_trials(cluster, tiny_study: Path, tmp_path: Path):
    tiny_study.write_text(
        tiny_study.read_text().replace("num_cpus: 2}", "num_cpus: 2, custom: {trainer: 1}}")
    )
    assert load_study(tiny_study).resources.custom == {"trainer": 1.0}
    log = tmp_path / "run.log"
    proc = _launch(tiny_study, cluster.address, tmp_path, log)
    assert proc.wait(timeout=420) == 0, log.read_text()[-3000:]

    worker = next(node for node in cluster.list_all_nodes() if not node.head)
    trials = _trials(tiny_study)
    assert trials and all(t.state == TrialState.COMPLETE for t in trials)
    # Only the worker node offers "trainer": every trial ran there.
    assert {t.user_attrs["node_id"] for t in trials if not is_shared(t)} == {worker.node_id}


def _other_host_works() -> bool:
    """Whether a process can be given a hostname of its own (a UTS namespace: root, Linux)."""
    try:
        subprocess.run(
            ["unshare", "--uts", "hostname", "elsewhere"], check=True, capture_output=True
        )
    except (OSError, subprocess.CalledProcessError):
        return False
    return True


def test_a_dead_driver_of_another_host_is_recovered_at_once_by_asking_ray(
    cluster, tiny_study: Path, tmp_path: Path
):
    # As under `docker compose run`, where each driver has a new hostname: driver A runs with a
    # hostname of its own (a UTS namespace), so its process cannot be looked up from here, and
    # its trials' heartbeats stay fresh for HEARTBEAT_GRACE_S (60 s) after it dies. Driver B,
    # started at once on the same cluster, asks Ray about A's job and takes its trials back now.
    if not _other_host_works():
        pytest.skip("cannot give a process a hostname of its own here (unshare --uts)")
    # Two networks of 12 short epochs: A is killed mid-trial, B trains what is left.
    text = tiny_study.read_text().replace("epochs: 2", "epochs: 12")
    tiny_grid = "alpha: [1.0, 1.3], beta: [1.0, 1.15], gamma: [1.1, 1.15]"
    assert tiny_grid in text
    text = text.replace(tiny_grid, "alpha: [1.2, 1.2], beta: [1.1, 1.15], gamma: [1.15, 1.15]")
    tiny_study.write_text(text)
    log_a = tmp_path / "a.log"
    driver_a = subprocess.Popen(
        [
            "unshare",
            "--uts",
            "sh",
            "-c",
            'hostname compose-driver-1 && exec "$@"',
            "sh",
            sys.executable,
            "-m",
            "scaling_search.cli",
            "run",
            str(tiny_study),
            "--address",
            cluster.address,
        ],
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k != "SCALING_SEARCH_STORAGE"},
        stdout=log_a.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def held_by_a() -> list[optuna.trial.FrozenTrial]:
        return [
            t
            for t in _trials(tiny_study)
            if t.state == TrialState.RUNNING
            and str(t.system_attrs.get("driver", "")).startswith("compose-driver-1:")
            and t.user_attrs.get("epochs_completed", 0) >= 1
        ]

    deadline = time.monotonic() + 300
    while not held_by_a():
        assert driver_a.poll() is None, log_a.read_text()[-3000:]
        assert time.monotonic() < deadline, "driver A trained no epoch"
        time.sleep(0.3)
    os.killpg(driver_a.pid, 9)
    driver_a.wait()
    orphaned = {t.number: t.system_attrs["ray_job"] for t in held_by_a()}
    assert orphaned, "A's trials ended before it was killed"

    log_b = tmp_path / "b.log"
    driver_b = _launch(tiny_study, cluster.address, tmp_path, log_b)
    assert driver_b.wait(timeout=600) == 0, log_b.read_text()[-3000:]

    output = log_b.read_text()
    assert "of a driver whose Ray job has ended as FAIL" in output, output[-3000:]
    trials = {t.number: t for t in _trials(tiny_study)}
    for number, job in orphaned.items():
        reason = trials[number].user_attrs["fail_reason"]
        assert trials[number].state == TrialState.FAIL
        assert (
            reason.startswith("driver compose-driver-1:") and f"Ray job {job} has ended" in reason
        )
    # B trained their networks again: every network of the grid has a complete trial.
    done = [t for t in trials.values() if t.state == TrialState.COMPLETE and not is_shared(t)]
    assert len(done) == 2, output[-3000:]
