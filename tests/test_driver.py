"""End to end through real Ray Tune and a real Optuna storage: concurrency, resume, interruption."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
import torch
from conftest import TINY_CANDIDATES, TINY_NETWORKS
from optuna.trial import TrialState

from scaling_search.config import load_study
from scaling_search.data.sources import load_data
from scaling_search.report.publish import LIVE_FIGURES, LiveDashboard
from scaling_search.space import grid_candidates
from scaling_search.study.ledger import driver_id, grid_classes, is_shared
from scaling_search.study.storage import StorageError, open_storage, resolve_url, study_exists

pytestmark = pytest.mark.slow

DERIVED = (
    "alpha",
    "beta",
    "gamma",
    "flops_ratio_nominal",
    "flops_ratio_measured",
    "params",
    "resolution_px",
    "epochs_completed",
)


def _run(study_path: Path, progress=lambda _: None, **options):
    """Run as `scaling-search run` does: with the dashboard's figures and note kept current."""
    from scaling_search import driver

    study = load_study(study_path)
    data = load_data(study.data)
    storage = open_storage(resolve_url(study))
    options.setdefault("live_view", LiveDashboard)
    summary = driver.run_study(study, data=data, storage=storage, progress=progress, **options)
    return study, summary, optuna.load_study(study_name=study.name, storage=storage)


def _checkpointed(out_dir: Path) -> set[Path]:
    """The trial folders that hold a checkpoint, in every Ray Tune folder of the study."""
    return {checkpoint.parent for checkpoint in (out_dir / "ray").glob("*/*/checkpoint_*")}


def _no_weights_left(out_dir: Path) -> None:
    """A finished run leaves the study's results, not Ray Tune's folder or any checkpoint."""
    assert not (out_dir / "ray").exists(), sorted((out_dir / "ray").rglob("*"))[:10]
    assert not list(out_dir.rglob("checkpoint_*")) and not list(out_dir.rglob("*.pt"))


def _point(trial: optuna.trial.FrozenTrial) -> tuple[float, float, float, int]:
    return (
        trial.params["alpha"],
        trial.params["beta"],
        trial.params["gamma"],
        trial.params["seed"],
    )


def _value(trial: optuna.trial.FrozenTrial) -> float:
    """The value of a trial that has one (a complete trial)."""
    assert trial.value is not None, trial.number
    return trial.value


def test_grid_study_runs_trials_concurrently_and_records_them(ray_local, tiny_study: Path):
    study, summary, ot_study = _run(tiny_study, keep_checkpoints=True)

    candidates = grid_candidates(study.space)
    classes = grid_classes(study, num_classes=study.data.num_classes)
    every = ot_study.get_trials()
    trials = [t for t in every if not is_shared(t)]  # those that trained
    copies = [t for t in every if is_shared(t)]
    assert (len(candidates), len(classes)) == (TINY_CANDIDATES, TINY_NETWORKS)
    # One training per distinct network; every other triple gets its network's result.
    assert summary.launched == len(classes) == summary.completed
    assert summary.shared == len(candidates) - len(classes) == len(copies)
    assert [t.state for t in every] == [TrialState.COMPLETE] * len(candidates)
    assert sorted(_point(t)[:3] for t in every) == sorted(c.as_tuple() for c in candidates)
    assert sorted(t.user_attrs["network_key"] for t in trials) == sorted(classes)
    for copy in copies:
        source = every[copy.user_attrs["shared_from"]]
        assert copy.user_attrs["network_key"] == source.user_attrs["network_key"]
        assert copy.value == source.value and copy.intermediate_values == source.intermediate_values
    for trial in every:
        assert set(DERIVED) <= trial.user_attrs.keys()
        assert trial.user_attrs["epochs_completed"] == study.train.epochs
        assert (
            abs(
                trial.user_attrs["flops_ratio_nominal"]
                - trial.params["alpha"] * trial.params["beta"] ** 2 * trial.params["gamma"] ** 2
            )
            < 1e-6
        )
        assert sorted(trial.intermediate_values) == list(range(1, study.train.epochs + 1))
        assert 0.0 <= trial.value <= 1.0
        # Chosen on validation (32 images); the test split (48) measured once, at the end.
        assert (trial.value * 32).is_integer()
        assert (trial.user_attrs["test_accuracy"] * 48).is_integer()
    # Two workers ran the trials; each fetched the dataset once and kept it for its next trials.
    fetched = [t.number for t in trials if not t.user_attrs["data_reused"]]
    assert 1 <= len(fetched) <= study.search.max_concurrent_trials, fetched
    # The first optimiser step of each trial came after its training began.
    assert all(t.user_attrs["first_step_at"] >= t.user_attrs["train_started_at"] for t in trials)
    # The training intervals measured inside the workers overlap for at least one pair.
    spans = [(t.user_attrs["train_started_at"], t.user_attrs["train_reported_at"]) for t in trials]
    overlapping = [
        (a, b) for a, b in itertools.combinations(spans, 2) if a[0] < b[1] and b[0] < a[1]
    ]
    assert overlapping, f"no two trials trained at the same time: {spans}"
    # --keep-checkpoints: each trial keeps its newest checkpoint only, the last epoch's, in the
    # run's Ray Tune folder, which names its driver (this process).
    checkpoints = sorted((study.out_dir / "ray").glob("*/*/checkpoint_*"))
    assert len({c.parent for c in checkpoints}) == len(checkpoints) == len(classes)
    for checkpoint in checkpoints:
        state = torch.load(checkpoint / "state.pt", weights_only=False)
        assert state["epoch"] == study.train.epochs
    (experiment,) = (study.out_dir / "ray").iterdir()
    marker = json.loads((experiment / "scaling-search-driver.json").read_text())
    assert marker == {"study": study.name, "driver": driver_id()}

    _optuna_cli_lists_the_attributes(study, ot_study)
    _dashboard_serves_the_trials(tiny_study, study.name, len(classes), len(copies))

    # Running the finished study again trains nothing and changes nothing.
    before = [(t.number, t.state, t.value, t.datetime_complete) for t in every]
    _, again, ot_again = _run(tiny_study)
    assert again.launched == 0
    assert [
        (t.number, t.state, t.value, t.datetime_complete) for t in ot_again.get_trials()
    ] == before
    # Its driver (this process) is alive: the run that keeps nothing removed none of it.
    assert _checkpointed(study.out_dir) == {c.parent for c in checkpoints}


def _optuna_cli_lists_the_attributes(study, ot_study) -> None:
    """`optuna trials --storage URL --study-name NAME` shows α, β, γ on every trial."""
    optuna_cli = Path(sys.executable).with_name("optuna")
    result = subprocess.run(
        [
            str(optuna_cli),
            "trials",
            "--storage",
            resolve_url(study),
            "--study-name",
            study.name,
            "-f",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    rows = json.loads(result.stdout)
    assert len(rows) == len(ot_study.trials)
    for row in rows:
        attrs = row["user_attrs"]
        assert {"alpha", "beta", "gamma", "flops_ratio_measured"} <= attrs.keys()
        assert attrs["alpha"] == row["params"]["alpha"]


def _dashboard_serves_the_trials(study_path: Path, name: str, count: int, shared: int) -> None:
    """`scaling-search dashboard` serves the study through optuna-dashboard's API: the trials
    that trained and the triples that share their results, as rows."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "scaling_search.cli",
            "dashboard",
            str(study_path),
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        studies = _get_json(f"http://127.0.0.1:{port}/api/studies", deadline_s=60)
        [summary] = [s for s in studies["study_summaries"] if s["study_name"] == name]
        detail = _get_json(
            f"http://127.0.0.1:{port}/api/studies/{summary['study_id']}", deadline_s=10
        )
        assert len(detail["trials"]) == count + shared
        attrs = [{a["key"] for a in t["user_attrs"]} for t in detail["trials"]]
        assert all({"alpha", "beta", "gamma", "network_key"} <= keys for keys in attrs)
        assert sum("shared_from" in keys for keys in attrs) == shared
        # The driver's own figures and its note with the best triple, on the study's page.
        assert sorted(g["id"] for g in detail["plotly_graph_objects"]) == sorted(LIVE_FIGURES)
        note = detail["note"]["body"]
        assert f"{count} trials ({count} complete); {shared} more triple(s) share" in note
        assert "best: α=" in note and "validation accuracy" in note
        _only_on_loopback(port)
    finally:
        server.terminate()
        server.wait(timeout=30)


def _only_on_loopback(port: int) -> None:
    """The dashboard bound 127.0.0.1 by default: this machine's network address is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing address
        address = probe.getsockname()[0]
    if address.startswith("127."):
        return  # no network interface to try from
    with pytest.raises(OSError), socket.create_connection((address, port), timeout=5):
        pass


def _get_json(url: str, *, deadline_s: float):
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_the_quickstart_grid_trains_each_network_once_per_seed(ray_local, tmp_path: Path):
    """The quickstart's own space, base resolution and seeds with the real trainer (on fewer
    images, for one epoch): 10 triples build 5 networks, each trained once per seed; all 10
    triples appear with each seed's result."""
    import yaml

    text = (Path(__file__).resolve().parents[1] / "studies" / "quickstart.yaml").read_text()
    config = yaml.safe_load(text)
    config["output_dir"] = str(tmp_path / "runs")
    config["data"].update(train_size=96, validation_size=32, test_size=32)
    config["train"].update(epochs=1, batch_size=32, bn_recalibration_images=32)
    path = tmp_path / "quickstart.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    holding: list[int] = []  # trial folders with a checkpoint, as each trial's line is written

    def progress(line: str) -> None:
        if line.startswith("["):  # "[n done, …]": written once the trial's end is recorded
            holding.append(len(_checkpointed(Path(config["output_dir"]))))

    study, summary, ot_study = _run(path, progress)

    every = ot_study.get_trials()
    trained = [t for t in every if not is_shared(t)]
    assert study.search.repeats == 2 and len(grid_candidates(study.space)) == 10
    points = [(t.user_attrs["network_key"], t.params["seed"]) for t in trained]
    assert len(points) == len(set(points)) == 5 * 2  # never the same network and seed twice
    assert summary.launched == 10 and summary.shared == 10
    assert sorted(_point(t) for t in every) == sorted(
        (*c.as_tuple(), seed) for c in grid_candidates(study.space) for seed in (0, 1)
    )
    for trial in every:
        assert trial.state == TrialState.COMPLETE
        source = every[trial.user_attrs.get("shared_from", trial.number)]
        assert (trial.value, trial.params["seed"]) == (source.value, source.params["seed"])
    # A trial's checkpoint is removed right after its end is recorded: at each trial's line its
    # own is still there, and besides it at most the running trials' (2 at a time), never the
    # 10 trials' in all.
    assert len(holding) == 10
    assert min(holding) >= 1 and max(holding) <= study.search.max_concurrent_trials + 1, holding
    _no_weights_left(study.out_dir)


def test_changed_training_settings_refuse_to_continue(tiny_study: Path):
    from scaling_search.study.ledger import LedgerError, open_study

    study = load_study(tiny_study)
    storage = open_storage(resolve_url(study))
    open_study(study, storage)
    open_study(study, storage)  # the same settings continue
    changed = load_study(tiny_study, ["train.epochs=3", "data.train_size=64"])
    with pytest.raises(LedgerError, match=r"data\.train_size, train\.epochs"):
        open_study(changed, storage)
    # The search settings may change between runs, and so may train.compile (speed, not maths).
    open_study(load_study(tiny_study, ["search.max_concurrent_trials=1"]), storage)
    open_study(load_study(tiny_study, ["train.compile=true"]), storage)


def _kill_leftovers(ray_tmp: str) -> None:
    """Ray processes of the killed driver's session (they name its temp folder) go too."""
    subprocess.run(["pkill", "-9", "-f", ray_tmp], check=False, capture_output=True)


def _count(study_path: Path, state: TrialState) -> int:
    """Trials in ``state``, read without creating anything while the CLI sets the storage up."""
    study = load_study(study_path)
    url = resolve_url(study)
    try:
        if not study_exists(url, study.name):
            return 0
        ot_study = optuna.load_study(study_name=study.name, storage=url)
    except (StorageError, KeyError):
        return 0  # the CLI is creating the schema right now
    return len(ot_study.get_trials(deepcopy=False, states=(state,)))


def test_killed_driver_resumes_without_retraining(tiny_study: Path, tmp_path: Path, ray_tmp: str):
    """SIGKILL the CLI mid-study; the next run retrains only what was not finished."""
    slower = tiny_study.read_text().replace("epochs: 2", "epochs: 4")
    tiny_study.write_text(slower)
    command = [sys.executable, "-m", "scaling_search.cli", "run", str(tiny_study)]
    env = {k: v for k, v in os.environ.items() if k != "SCALING_SEARCH_STORAGE"}
    env["RAY_TMPDIR"] = ray_tmp
    log = tmp_path / "first-run.log"
    proc = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=env,
        start_new_session=True,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 240
    while _count(tiny_study, TrialState.COMPLETE) < 2 and time.monotonic() < deadline:
        assert proc.poll() is None, f"the first run ended before the kill: {log.read_text()}"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _kill_leftovers(ray_tmp)
    killed_run = list((tmp_path / "runs" / "ray").iterdir())
    assert len(killed_run) == 1, killed_run  # its Ray Tune folder, left behind

    study = load_study(tiny_study)
    ot_study = optuna.load_study(study_name=study.name, storage=resolve_url(study))
    finished = {
        _point(t): (t.number, t.value) for t in ot_study.get_trials(states=(TrialState.COMPLETE,))
    }
    left_running = ot_study.get_trials(states=(TrialState.RUNNING,))
    assert len(finished) >= 2
    assert left_running, "the kill should have left at least one trial RUNNING"

    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]

    trials = optuna.load_study(study_name=study.name, storage=resolve_url(study)).get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    points = [_point(t) for t in complete]
    # Every candidate completed exactly once: finished ones were not trained again.
    assert len(points) == len(set(points)) == len(grid_candidates(study.space))
    for point, (number, value) in finished.items():
        again = [t for t in complete if _point(t) == point]
        assert [(t.number, t.value) for t in again] == [(number, value)]
    # The trials the killed driver left running were marked FAIL, with the reason.
    stale = {t.number for t in left_running}
    for trial in trials:
        if trial.number in stale:
            assert trial.state == TrialState.FAIL
            # Same host, process gone: detected at once, without waiting for heartbeats.
            assert re.fullmatch(
                r"driver \S+:\d+:\d+ stopped mid-trial", trial.user_attrs["fail_reason"]
            )
    assert "best:" in result.stdout
    # The finished run removed its own Ray Tune folder and the one the killed run left.
    assert "removed 1 Ray Tune folder(s) that stopped runs left" in result.stdout
    _no_weights_left(tmp_path / "runs")
    assert (Path(study.out_dir) / "family.json").is_file() or (
        tmp_path / study.out_dir / "family.json"
    ).is_file()


def test_tpe_on_the_surface_with_asha_never_crowns_an_early_stop(ray_local, tiny_study: Path):
    """Continuous coordinates: every sample on α·β²·γ² = c; early-stopped trials cannot win."""
    from scaling_search.results.ranking import best_triple

    overrides = [
        "search.sampler=tpe",
        "search.n_trials=5",
        "search.scheduler=asha",
        "train.epochs=3",
        "space.alpha=[1.0,1.6]",
        "space.beta=[1.0,1.3]",
        "space.gamma=[1.0,1.3]",
    ]
    study = load_study(tiny_study, overrides)
    storage = open_storage(resolve_url(study))
    from scaling_search import driver

    data = load_data(study.data)
    summary = driver.run_study(study, data=data, storage=storage, progress=lambda _: None)
    ot_study = optuna.load_study(study_name=study.name, storage=storage)
    trials = ot_study.get_trials()

    # Five trainings; a sampled triple whose network was trained with the seed shares its result.
    assert summary.launched == 5 and len([t for t in trials if not is_shared(t)]) == 5
    assert summary.shared == len(trials) - 5
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    for trial in trials:
        a, b, g = (trial.user_attrs[k] for k in ("alpha", "beta", "gamma"))
        assert a * b**2 * g**2 == pytest.approx(study.space.product, rel=1e-9)
        shares = [trial.user_attrs[f"{k}_share"] for k in ("depth", "width", "resolution")]
        assert sum(shares) == pytest.approx(1.0, abs=1e-5)
        if trial.state == TrialState.PRUNED:
            assert trial.user_attrs["epochs_completed"] < study.train.epochs
        else:
            assert trial.user_attrs["epochs_completed"] == study.train.epochs
    full = [t for t in trials if t.state == TrialState.COMPLETE]
    best = best_triple(ot_study)
    assert best.mean_accuracy == max(_value(t) for t in full)
    assert best.coefficients.alpha in {round(t.user_attrs["alpha"], 6) for t in full}

    _no_weights_left(study.out_dir)  # PRUNED trials' checkpoints included

    again = driver.run_study(study, data=data, storage=storage, progress=lambda _: None)
    assert again.launched == 0
