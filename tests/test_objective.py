"""The objective hook: a study's ``objective: "package.module:function"`` trains its trials."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
from conftest import run_study_cli

from scaling_search.config import TrainConfig
from scaling_search.data.sources import make_synthetic
from scaling_search.objective import ObjectiveError, ObjectiveFit, load_objective
from scaling_search.space import Coefficients
from scaling_search.train import EpochMetrics

# A user's module: a quadratic bowl with its top at the paper's triple (1.2, 1.1, 1.15), and
# objectives that break the contract in each way the hook checks. Each call appends a line to
# calls.txt beside the module, so that a test can count how often a trial ran.
SURFACES = """
from pathlib import Path

CALLS = Path(__file__).with_name("calls.txt")


def _count(point):
    with CALLS.open("a") as calls:
        calls.write(f"{point['alpha']} {point['beta']} {point['gamma']} {point['seed']}\\n")


def bowl(point):
    _count(point)
    a, b, g = point["alpha"], point["beta"], point["gamma"]
    top = 0.9 - (a - 1.2) ** 2 - (b - 1.1) ** 2 - (g - 1.15) ** 2
    for epoch in range(1, point["epochs"] + 1):
        point["report"](epoch=epoch, accuracy=top * epoch / point["epochs"])
    return {"accuracy": top, "resolution_px": point["resolution_px"]}


def val_test(point):
    # Validation and test disagree: validation's top is at α = 1.1, test's at α = 1.3.
    a, b, g = point["alpha"], point["beta"], point["gamma"]
    val = 0.8 - (a - 1.1) ** 2 - (b - 1.1) ** 2 - (g - 1.25) ** 2 + 0.002 * point["seed"]
    test = 0.8 - (a - 1.3) ** 2 - (b - 1.1) ** 2 - (g - 1.15) ** 2
    for epoch in range(1, point["epochs"] + 1):
        point["report"](epoch=epoch, accuracy=val * epoch / point["epochs"])
    return {"accuracy": val, "test_accuracy": test}


def counted_val_test(point):
    _count(point)
    return val_test(point)


def broken_key(point):
    raise KeyError("depth")


def by_beta(point):
    # A network key: here the user's network depends on β alone.
    return ["beta", point["beta"]]


def returns_a_number(point):
    _count(point)
    return 0.5


def reports_backwards(point):
    point["report"](epoch=2, accuracy=0.1)
    point["report"](epoch=1, accuracy=0.2)
    return {"accuracy": 0.3}


def returns_nan(point):
    return {"accuracy": float("nan")}


NOT_A_FUNCTION = 3
"""


@pytest.fixture
def surfaces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A module ``surfaces`` importable here (and, through PYTHONPATH, by a CLI and its workers)."""
    folder = tmp_path / "user"
    folder.mkdir()
    (folder / "surfaces.py").write_text(SURFACES, encoding="utf-8")
    monkeypatch.syspath_prepend(str(folder))
    sys.modules.pop("surfaces", None)
    return folder


# --- loading -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_package.mod:f", "no module named 'no_such_package'"),
        ("surfaces:nowhere", "module 'surfaces' has no 'nowhere'"),
        ("surfaces:NOT_A_FUNCTION", "'NOT_A_FUNCTION' is not callable (it is 3)"),
    ],
)
def test_an_objective_that_does_not_load_is_named_in_one_line(
    surfaces: Path, spec: str, message: str
) -> None:
    with pytest.raises(ObjectiveError) as caught:
        load_objective(spec)
    text = str(caught.value)
    assert text.startswith(f"objective {spec!r}: {message}") and "\n" not in text, text


def test_a_module_that_fails_to_import_is_named(surfaces: Path) -> None:
    (surfaces / "broken.py").write_text("raise ImportError('needs a GPU driver')\n")
    with pytest.raises(
        ObjectiveError, match=r"importing 'broken' failed: ImportError: needs a GPU"
    ):
        load_objective("broken:f")


# --- the contract, without Ray -------------------------------------------------------------------

CONFIG = TrainConfig(base_resolution_px=32, epochs=3)
DATA = make_synthetic(num_classes=2, train_size=8, test_size=4, image_px=8, seed=0)


def _call(
    spec: str, resume: dict[str, Any] | None = None
) -> tuple[list[EpochMetrics], dict[str, Any]]:
    reports: list[EpochMetrics] = []
    result = ObjectiveFit(spec)(
        CONFIG,
        DATA,
        Coefficients(1.3, 1.0, 1.2),
        seed=7,
        report=lambda metrics, state: reports.append(metrics),
        resume=resume,
    )
    return reports, dict(result)


def test_the_objective_gets_the_point_and_its_reports_reach_the_trial(surfaces: Path) -> None:
    reports, result = _call("surfaces:bowl")
    top = 0.9 - 0.1**2 - 0.1**2 - 0.05**2
    assert [m.epoch for m in reports] == [1, 2, 3]
    assert [m.accuracy for m in reports] == pytest.approx([top / 3, 2 * top / 3, top])
    assert result["accuracy"] == pytest.approx(top)
    assert result["resolution_px"] == round(32 * 1.2)  # base_resolution_px · γ
    assert (surfaces / "calls.txt").read_text().split() == ["1.3", "1.0", "1.2", "7"]
    assert math.isnan(reports[0].val_loss) and reports[-1].epoch_seconds >= 0


def test_a_retried_trial_does_not_report_its_epochs_twice(surfaces: Path) -> None:
    reports, _ = _call("surfaces:bowl", resume={"epoch": 2})
    assert [m.epoch for m in reports] == [3]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("surfaces:returns_a_number", "returned 0.5; expected a mapping with 'accuracy'"),
        ("surfaces:reports_backwards", "reported epoch 1; expected an integer after 2"),
        ("surfaces:returns_nan", "returned accuracy nan; expected a finite number"),
    ],
)
def test_an_objective_that_breaks_the_contract_fails_in_one_line(
    surfaces: Path, spec: str, message: str
) -> None:
    with pytest.raises(ObjectiveError) as caught:
        _call(spec)
    text = str(caught.value)
    assert text.startswith(f"objective {spec!r} {message}") and "\n" not in text, text


# --- through the CLI, Ray and Optuna -------------------------------------------------------------

STUDY = """\
name: {name}
output_dir: {out}
objective: "{objective}"
space: {{alpha: [1.1, 1.3], beta: [1.0, 1.2], gamma: [1.05, 1.25], step: 0.1, tolerance: 0.12}}
train: {{epochs: 2}}
resources: {{num_cpus: 2}}
"""
# The 7 triples of that space (α·β²·γ² within 0.12 of 2 on a 0.1 step).
HOOK_GRID = (
    (1.1, 1.1, 1.25), (1.1, 1.2, 1.15), (1.2, 1.1, 1.15), (1.2, 1.2, 1.05),
    (1.3, 1.0, 1.25), (1.3, 1.1, 1.15), (1.3, 1.2, 1.05),
)  # fmt: skip


def _run(
    folder: Path, objective: str, ray_tmp: str, extra: str = ""
) -> tuple[subprocess.CompletedProcess[str], Path]:
    study = folder / "study.yaml"
    text = STUDY.format(name="hook", out=folder / "runs", objective=objective) + extra
    study.write_text(text, encoding="utf-8")
    return run_study_cli(study, ray_tmp, pythonpath=folder), folder / "runs" / "optuna.db"


def _cli(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    from conftest import cli_env

    return subprocess.run(
        [sys.executable, "-m", "scaling_search.cli", *args, str(folder / "study.yaml")],
        env={**cli_env(), "PYTHONPATH": str(folder)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.slow
def test_the_winner_is_chosen_on_validation_and_best_prints_both(
    surfaces: Path, ray_tmp: str
) -> None:
    """Validation ranks (1.1, 1.1, 1.25) first, test ranks (1.3, 1.1, 1.15) first: the winner is
    validation's, and best shows its test accuracy beside it, labelled."""

    def val(a: float, b: float, g: float) -> float:
        return 0.8 - (a - 1.1) ** 2 - (b - 1.1) ** 2 - (g - 1.25) ** 2

    def test(a: float, b: float, g: float) -> float:
        return 0.8 - (a - 1.3) ** 2 - (b - 1.1) ** 2 - (g - 1.15) ** 2

    by_val, by_test = max(HOOK_GRID, key=lambda t: val(*t)), max(HOOK_GRID, key=lambda t: test(*t))
    assert by_val != by_test
    result, _ = _run(surfaces, "surfaces:val_test", ray_tmp, "search: {repeats: 2}\n")
    assert result.returncode == 0, result.stderr[-3000:]
    shown = _cli(surfaces, "best", "--format", "json")
    assert shown.returncode == 0, shown.stderr
    best = json.loads(shown.stdout)
    assert (best["alpha"], best["beta"], best["gamma"]) == by_val
    assert best["chosen_on"] == "validation" and best["n_seeds"] == 2
    assert best["mean_accuracy"] == pytest.approx(val(*by_val) + 0.001, abs=1e-6)
    assert best["test_accuracy"] == pytest.approx(test(*by_val), abs=1e-6) and best["n_test"] == 2
    table = _cli(surfaces, "best").stdout
    label = "α=1.1 β=1.1 γ=1.25"
    assert (
        f"best: {label}  validation accuracy {best['mean_accuracy']:.4f} ± 0.0014 (2 seeds)"
        in table
    )
    assert f"test accuracy {test(*by_val):.4f} over 2 (never used to choose)" in table
    # The objective trains its own networks: best states no built-in B0 cost for them.
    assert best["flops_ratio_measured"] is None and best["params"] is None
    assert "measured MACs ratio" not in table and "α·β²·γ² = " in table
    # The run's last lines name the same winner, the same way.
    assert f"best: {label}  validation accuracy" in result.stdout


@pytest.mark.slow
def test_an_objective_with_a_network_key_trains_each_network_once_per_seed(
    surfaces: Path, ray_tmp: str
) -> None:
    extra = 'network_key: "surfaces:by_beta"\nsearch: {repeats: 2}\n'
    result, db = _run(surfaces, "surfaces:counted_val_test", ray_tmp, extra)
    assert result.returncode == 0, result.stderr[-3000:]
    calls = [tuple(line.split()) for line in (surfaces / "calls.txt").read_text().splitlines()]
    betas = {b for _, b, _ in HOOK_GRID}
    assert len(calls) == len(betas) * 2  # one training per network (β) and seed
    assert len({(b, seed) for _, b, _, seed in calls}) == len(calls)
    trials = optuna.load_study(study_name="hook", storage=f"sqlite:///{db}").get_trials()
    assert len(trials) == len(HOOK_GRID) * 2  # every candidate, every seed, has its result
    for trial in trials:
        b = trial.user_attrs["beta"]
        assert trial.user_attrs["network_key"] == f"key beta {b}"
        trained_with = {
            c for c in calls if float(c[1]) == b and int(c[3]) == trial.user_attrs["seed"]
        }
        (call,) = trained_with
        # The copy's value is the training's: val_test of the triple that trained.
        expected = 0.8 - (float(call[0]) - 1.1) ** 2 - (b - 1.1) ** 2 - (float(call[2]) - 1.25) ** 2
        assert trial.value == pytest.approx(expected + 0.002 * trial.user_attrs["seed"])
    assert "shared a trained network's result" in result.stdout
    space = _cli(surfaces, "space").stdout
    assert f"\n{len(HOOK_GRID)} candidates, {len(betas)} distinct networks (" in space


@pytest.mark.slow
def test_a_study_with_an_objective_runs_it_for_every_trial(surfaces: Path, ray_tmp: str) -> None:
    result, db = _run(surfaces, "surfaces:bowl", ray_tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = optuna.load_study(study_name="hook", storage=f"sqlite:///{db}").get_trials()
    assert trials and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    for trial in trials:
        a, b, g = (trial.params[k] for k in ("alpha", "beta", "gamma"))
        assert trial.value is not None
        assert trial.value == pytest.approx(0.9 - (a - 1.2) ** 2 - (b - 1.1) ** 2 - (g - 1.15) ** 2)
        assert trial.intermediate_values[1] == pytest.approx(trial.value / 2)
    calls = (surfaces / "calls.txt").read_text().splitlines()
    assert len(calls) == len(trials)  # one call per trial
    # The grid holds the paper's triple, the top of the bowl: it wins.
    assert "best: α=1.2 β=1.1 γ=1.15" in result.stdout, result.stdout


@pytest.mark.slow
def test_an_objective_that_returns_nonsense_fails_its_trials_without_retries(
    surfaces: Path, ray_tmp: str
) -> None:
    result, db = _run(surfaces, "surfaces:returns_a_number", ray_tmp)
    trials = optuna.load_study(study_name="hook", storage=f"sqlite:///{db}").get_trials()
    assert trials and all(t.state == optuna.trial.TrialState.FAIL for t in trials)
    reason = (
        "objective 'surfaces:returns_a_number' returned 0.5; expected a mapping with 'accuracy'"
    )
    assert {t.user_attrs["fail_reason"] for t in trials} == {reason}
    # A broken contract repeats: each trial ran once, though the study allows 2 retries.
    assert len((surfaces / "calls.txt").read_text().splitlines()) == len(trials)
    assert f"FAILED: {reason}" in result.stdout


# --- the study's identity ------------------------------------------------------------------------


def test_the_objective_is_part_of_the_studys_identity(tmp_path: Path) -> None:
    from scaling_search.config import parse_study
    from scaling_search.study import ledger

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    built_in = parse_study({"name": "same"})
    ledger.open_study(built_in, storage)  # recorded with the built-in trainer
    ledger.open_study(built_in, storage)  # continues
    with pytest.raises(ledger.LedgerError, match=r"objective\.function differ"):
        ledger.open_study(parse_study({"name": "same", "objective": "surfaces:bowl"}), storage)


@pytest.mark.slow
def test_a_network_key_that_breaks_is_one_line_before_anything_is_written(
    surfaces: Path, ray_tmp: str
) -> None:
    result, db = _run(surfaces, "surfaces:bowl", ray_tmp, 'network_key: "surfaces:broken_key"\n')
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "network_key 'surfaces:broken_key' raised KeyError: 'depth' for α=" in lines[0]
    assert not db.exists() and not (surfaces / "runs").exists()
