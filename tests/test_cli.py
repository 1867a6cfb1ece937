"""Tests for the ``scaling-search`` command, run as a real subprocess.

Every bad input must end with exit code 2 and one line on stderr, before anything is written to
storage. Commands run with the working directory in a temporary folder (so the default ``runs/``
would land there) and without $SCALING_SEARCH_STORAGE. Independent commands are started together
in a small process pool: each imports torch, and running them one by one would be slow.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy
import torch
import yaml
from conftest import cli_env
from optuna.trial import TrialState, create_trial
from torch import nn

from scaling_search.network import architecture, build_model

optuna.logging.set_verbosity(optuna.logging.WARNING)

SECRET = "secret"
_WORKERS = max(2, (os.cpu_count() or 2) + 1)
_TIMEOUT_S = 300

BASE_STUDY: dict[str, Any] = {
    "name": "tiny",
    "data": {"kind": "synthetic", "num_classes": 4, "train_size": 32, "test_size": 16},
    "space": {
        "product": 2.0,
        "alpha": [1.15, 1.25],
        "beta": [1.05, 1.15],
        "gamma": [1.1, 1.15],
        "step": 0.05,
        "tolerance": 0.1,
    },
    "search": {"sampler": "grid", "max_concurrent_trials": 1},
    "train": {"base_resolution_px": 16, "epochs": 2, "batch_size": 16},
    "resources": {"cpus_per_trial": 1, "num_cpus": 1},
}


@dataclass(frozen=True)
class Result:
    """A finished command: exit code, output, and the folder it ran in."""

    returncode: int
    stdout: str
    stderr: str
    cwd: Path


def _cli(args: list[str], cwd: Path) -> Result:
    done = subprocess.run(
        [sys.executable, "-m", "scaling_search.cli", *args],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=_TIMEOUT_S,
        check=False,
    )
    return Result(done.returncode, done.stdout, done.stderr, cwd)


def _cli_many(jobs: list[tuple[list[str], Path]]) -> list[Result]:
    with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        return list(pool.map(lambda job: _cli(*job), jobs))


def _study(changes: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    """BASE_STUDY with dotted-key ``changes`` (None deletes the key) and top-level keys set."""
    study = copy.deepcopy(BASE_STUDY)
    for key, value in {**(changes or {}), **top}.items():
        *parents, leaf = key.split(".")
        node = study
        for part in parents:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return study


def _write_study(folder: Path, study: dict[str, Any], name: str = "study.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(study, sort_keys=False), encoding="utf-8")
    return path


def _assert_one_error_line(result: Result, *fragments: str, prefix: str = "") -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"stderr is not one line: {result.stderr!r}"
    line = lines[0]
    assert line.startswith(prefix or "scaling-search: error:"), line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    assert SECRET not in line
    return line


def _assert_nothing_written(folder: Path, expected: set[str]) -> None:
    assert {p.name for p in folder.iterdir()} == expected
    assert not (folder / "runs").exists()
    assert not list(folder.rglob("*.db"))


# --- bad inputs to `run`: one line, exit 2, nothing written --------------------------------------

# id → (study changes, extra arguments, fragments the error line must contain)
BAD_RUNS: dict[str, tuple[dict[str, Any], list[str], tuple[str, ...]]] = {
    "unknown-top-key": ({"bogus_key": 1}, [], ("bogus_key", "allowed here")),
    "bound-below-one": ({"space.alpha": [0.8, 1.25]}, [], ("space.alpha.low", "0.8")),
    # Nearest grid point to 2 is 0.00028 away (brute force over the 0.05 grid of these bounds).
    "tolerance-admits-nothing": (
        {"space.tolerance": 0.0001, "space.gamma": [1.1, 1.2]},
        [],
        ("space.tolerance", "0.0001", "nearest"),
    ),
    "missing-dataset-folder": (
        {"data": {"kind": "cifar10", "path": "no-such-folder"}},
        [],
        ("no-such-folder",),
    ),
    "malformed-storage-in-file": ({"storage": "not a url"}, [], ("storage", "malformed")),
    "malformed-storage-override": ({}, ["--set", "storage=foo://bar"], ("'foo'", "storage")),
    "unsupported-dialect": (
        {"storage": f"mysql://u:{SECRET}@127.0.0.1/db"},
        [],
        ("'mysql'", "not supported"),
    ),
    "non-numeric-set": ({}, ["--set", "train.epochs=abc"], ("train.epochs", "abc")),
    "set-without-equals": ({}, ["--set", "train.epochs"], ("train.epochs", "key.path=value")),
}


# --- the rest of the independent commands --------------------------------------------------------

# Non-published (width, depth, resolution_px, classes): no table lists these, so the expected
# values come from counting the built torch module below.
MODEL_COMBOS = [(1.05, 1.15, 37, 7), (1.3, 0.8, 65, 3), (0.75, 1.6, 23, 11)]


def _commands() -> dict[str, tuple[list[str], Callable[[Path], None]]]:
    """id → (arguments, how to prepare the folder) for every command that needs no database."""
    commands: dict[str, tuple[list[str], Callable[[Path], None]]] = {}
    for key, (changes, extra, _) in BAD_RUNS.items():

        def prepare(folder: Path, changes: dict[str, Any] = changes) -> None:
            _write_study(folder, _study(changes))

        commands[f"run:{key}"] = (["run", "study.yaml", *extra], prepare)

    def write_base(folder: Path) -> None:
        _write_study(folder, _study())

    def nothing(folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)

    for width, depth, px, classes in [*MODEL_COMBOS, (1.1, 1.2, 260, 1000)]:
        args = ["model", "--width", str(width), "--depth", str(depth), "--resolution", str(px)]
        commands[f"model:{width},{depth},{px},{classes}"] = (
            [*args, "--num-classes", str(classes), "--format", "json"],
            nothing,
        )
    paper = ["export", "--coefficients", "1.2,1.1,1.15", "--phi", "1"]
    commands["export:json"] = ([*paper, "--format", "json"], nothing)
    commands["export:yaml-out"] = ([*paper, "--format", "yaml", "--out", "out/b1.yaml"], nothing)
    commands["export:python-out"] = ([*paper, "--format", "python", "--out", "b1.py"], nothing)
    budget = ["export", "--coefficients", "1.2,1.1,1.15"]
    commands["export:target-macs"] = ([*budget, "--target-macs", "1.0G"], nothing)
    commands["export:bad-target"] = ([*budget, "--target-params", "20X"], nothing)
    commands["export:target-and-phi"] = ([*paper, "--target-macs", "1G"], nothing)
    commands["export:below-one"] = (["export", "--coefficients", "0.5,1,1"], nothing)
    commands["export:not-numbers"] = (["export", "--coefficients", "a,b,c"], nothing)
    commands["export:bad-mode"] = ([*paper, "--mode", "bogus"], nothing)
    commands["export:zero-px"] = ([*paper, "--base-resolution", "0"], nothing)
    commands["export:zero-classes"] = ([*paper, "--num-classes", "0"], nothing)
    commands["space:json"] = (["space", "study.yaml", "--format", "json"], write_base)
    for name in ("status", "best", "report"):
        commands[f"never-run:{name}"] = ([name, "study.yaml"], write_base)
    return commands


COMMANDS = _commands()


class _Launched:
    """Starts every command of COMMANDS at once (a few at a time) and hands out the results."""

    def __init__(self, root: Path) -> None:
        self._pool = ThreadPoolExecutor(max_workers=_WORKERS)
        self._futures: dict[str, Future[Result]] = {}
        for index, (key, (args, prepare)) in enumerate(COMMANDS.items()):
            folder = root / f"case{index}"
            prepare(folder)
            self._futures[key] = self._pool.submit(_cli, args, folder)

    def __getitem__(self, key: str) -> Result:
        return self._futures[key].result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Launched]:
    runs = _Launched(tmp_path_factory.mktemp("cli"))
    try:
        yield runs
    finally:
        runs.close()


@pytest.mark.parametrize("case", list(BAD_RUNS))
def test_bad_run_is_one_line_and_writes_nothing(launched: _Launched, case: str) -> None:
    result = launched[f"run:{case}"]
    _assert_one_error_line(result, *BAD_RUNS[case][2])
    assert result.stdout == ""
    _assert_nothing_written(result.cwd, {"study.yaml"})


# --- bad inputs against real storage named in the study file -------------------------------------

# The last check before the storage is opened is the data; the study file, --set and the space
# are checked sooner still (and each case above already checks that no SQLite file appears).
# One case per backend keeps the subprocess count down.
_LAST_BEFORE_STORAGE = ["missing-dataset-folder"]


def _tables(url: str) -> list[str]:
    engine = sqlalchemy.create_engine(url)
    try:
        return sqlalchemy.inspect(engine).get_table_names()
    finally:
        engine.dispose()


def _sqlite_file(url: str) -> Path | None:
    parsed = sqlalchemy.engine.make_url(url)
    return Path(parsed.database or "") if parsed.get_backend_name() == "sqlite" else None


def _bad_jobs(url: str, root: Path, cases: list[str]) -> list[tuple[list[str], Path]]:
    jobs = []
    for index, case in enumerate(cases):
        changes, extra, _ = BAD_RUNS[case]
        folder = root / f"bad{index}"
        _write_study(folder, _study(changes, storage=url))
        jobs.append((["run", "study.yaml", *extra], folder))
    return jobs


def _check_bad_results(cases: list[str], results: list[Result]) -> None:
    for case, result in zip(cases, results, strict=True):
        _assert_one_error_line(result, *BAD_RUNS[case][2])
        _assert_nothing_written(result.cwd, {"study.yaml"})


def test_bad_runs_leave_an_empty_database_empty(storage_url: str, tmp_path: Path) -> None:
    cases = _LAST_BEFORE_STORAGE
    _check_bad_results(cases, _cli_many(_bad_jobs(storage_url, tmp_path, cases)))
    sqlite = _sqlite_file(storage_url)
    if sqlite is not None:
        assert not sqlite.exists(), "a bad run created the SQLite file"
    else:
        assert _tables(storage_url) == []


def _fill(url: str) -> None:
    storage = optuna.storages.RDBStorage(url)
    study = optuna.create_study(storage=storage, study_name="tiny", direction="maximize")
    study.set_user_attr("study_config", {"train": {"epochs": 2}})
    dist: dict[str, optuna.distributions.BaseDistribution] = {
        k: optuna.distributions.FloatDistribution(1.0, 2.0) for k in ("alpha", "beta", "gamma")
    }
    rows = [((1.2, 1.1, 1.15), 0.61, 0), ((1.2, 1.1, 1.15), 0.65, 1), ((1.15, 1.1, 1.15), 0.7, 0)]
    for (alpha, beta, gamma), accuracy, seed in rows:
        study.add_trial(
            create_trial(
                value=accuracy,
                params={"alpha": alpha, "beta": beta, "gamma": gamma},
                distributions=dist,
                user_attrs={
                    "alpha": alpha,
                    "beta": beta,
                    "gamma": gamma,
                    "seed": seed,
                    "epochs_completed": 2,
                    "flops_ratio_nominal": alpha * beta**2 * gamma**2,
                    "flops_ratio_measured": 1.1 * alpha * beta**2 * gamma**2,
                    "params": 1000,
                    "resolution_px": 18,
                },
            )
        )
    study.add_trial(create_trial(state=TrialState.FAIL, distributions={}, params={}))
    storage.engine.dispose()


def _snapshot(url: str) -> tuple[Any, ...]:
    storage = optuna.storages.RDBStorage(url)
    try:
        study = optuna.load_study(study_name="tiny", storage=storage)
        trials = [
            (t.number, t.state.name, t.value, t.params, t.user_attrs, t.datetime_complete)
            for t in study.get_trials()
        ]
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        return (names, study.user_attrs, trials)
    finally:
        storage.engine.dispose()


def _digest(path: Path | None) -> str | None:
    return None if path is None else hashlib.sha256(path.read_bytes()).hexdigest()


def test_bad_runs_leave_a_recorded_study_unchanged(storage_url: str, tmp_path: Path) -> None:
    _fill(storage_url)
    before, sqlite = _snapshot(storage_url), _sqlite_file(storage_url)
    digest = _digest(sqlite)
    assert len(before[2]) == 4
    _write_study(tmp_path / "read", _study(storage=storage_url))
    *bad, status, best = _cli_many(
        [
            *_bad_jobs(storage_url, tmp_path, _LAST_BEFORE_STORAGE),
            (["status", "study.yaml", "--format", "json"], tmp_path / "read"),
            (["best", "study.yaml", "--format", "json"], tmp_path / "read"),
        ]
    )
    _check_bad_results(_LAST_BEFORE_STORAGE, bad)
    assert _snapshot(storage_url) == before
    assert _digest(sqlite) == digest, "the SQLite file changed"

    # The readers see the recorded trials (and did not change them either).
    assert status.returncode == 0 and best.returncode == 0, (status.stderr, best.stderr)
    counts = json.loads(status.stdout)
    assert counts["trials"] == 4 and counts["states"] == {"COMPLETE": 3, "FAIL": 1}
    top = json.loads(best.stdout)
    # Means over seeds: (1.2, 1.1, 1.15) → 0.63 over two; (1.15, 1.1, 1.15) → 0.70 with one.
    assert (top["alpha"], top["beta"], top["gamma"]) == (1.15, 1.1, 1.15)
    assert top["mean_accuracy"] == pytest.approx(0.70) and top["n_seeds"] == 1
    assert top["n_candidates"] == 2
    assert counts["best"] == top


def test_status_of_a_never_run_study_creates_nothing(storage_url: str, tmp_path: Path) -> None:
    _write_study(tmp_path, _study(storage=storage_url))
    _assert_one_error_line(_cli(["status", "study.yaml"], tmp_path), "'tiny'")
    sqlite = _sqlite_file(storage_url)
    if sqlite is not None:
        assert not sqlite.exists()
    else:
        assert _tables(storage_url) == []


# --- status / best of a study that never ran (default SQLite file) -------------------------------


@pytest.mark.parametrize("command", ["status", "best", "report"])
def test_never_run_study_is_one_line_and_creates_no_database(
    launched: _Launched, command: str
) -> None:
    result = launched[f"never-run:{command}"]
    _assert_one_error_line(result, "'tiny'", "not been run")
    _assert_nothing_written(result.cwd, {"study.yaml"})


# --- model: exact counts against an independent count of the torch module ------------------------


def _independent_counts(width: float, depth: float, px: int, classes: int) -> tuple[int, int]:
    """Params by numel; MACs by hooks: conv = out elements × in/groups × kernel area, linear =
    in × out (count_macs's documented convention: convs incl. SE convs, classifier, nothing else).
    """
    model = build_model(architecture(width=width, depth=depth, num_classes=classes)).eval()
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    macs = 0

    def conv_hook(module: nn.Conv2d, _: Any, output: torch.Tensor) -> None:
        nonlocal macs
        kh, kw = module.kernel_size
        macs += output.numel() * (module.in_channels // module.groups) * kh * kw

    def linear_hook(module: nn.Linear, _: Any, output: torch.Tensor) -> None:
        nonlocal macs
        macs += module.in_features * module.out_features

    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(conv_hook)
        elif isinstance(module, nn.Linear):
            module.register_forward_hook(linear_hook)
    with torch.no_grad():
        logits = model(torch.zeros(1, 3, px, px))
    assert logits.shape == (1, classes)
    return params, macs


@pytest.mark.parametrize(("width", "depth", "px", "classes"), MODEL_COMBOS)
def test_model_counts_match_the_built_module(
    launched: _Launched, width: float, depth: float, px: int, classes: int
) -> None:
    result = launched[f"model:{width},{depth},{px},{classes}"]
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    params, macs = _independent_counts(width, depth, px, classes)
    assert data["params"] == params
    assert data["macs"] == macs
    assert (data["width"], data["depth"], data["resolution_px"], data["num_classes"]) == (
        width,
        depth,
        px,
        classes,
    )


def test_model_reproduces_published_b2_params(launched: _Launched) -> None:
    result = launched["model:1.1,1.2,260,1000"]
    assert result.returncode == 0, result.stderr
    # EfficientNet-B2 (width 1.1, depth 1.2, 260 px): 9,109,994 parameters (Keras Applications;
    # Tan & Le 2019).
    assert json.loads(result.stdout)["params"] == 9_109_994


# --- export --------------------------------------------------------------------------------------


def _check_paper_member(document: dict[str, Any]) -> None:
    assert document["coefficients"] == {"alpha": 1.2, "beta": 1.1, "gamma": 1.15}
    (member,) = document["members"]
    # The paper's triple at φ = 1 is B2's shape (width 1.1, depth 1.2): 9,109,994 parameters
    # (Keras Applications; Tan & Le 2019).
    assert member["params"] == 9_109_994
    assert (member["width"], member["depth"], member["phi"]) == (1.1, 1.2, 1.0)
    assert member["resolution_px"] == round(224 * 1.15)


def test_export_json(launched: _Launched) -> None:
    result = launched["export:json"]
    assert result.returncode == 0, result.stderr
    _check_paper_member(json.loads(result.stdout))


def test_export_yaml_to_a_file(launched: _Launched) -> None:
    result = launched["export:yaml-out"]
    assert result.returncode == 0, result.stderr
    path = result.cwd / "out" / "b1.yaml"
    assert path.is_file()
    _check_paper_member(yaml.safe_load(path.read_text(encoding="utf-8")))
    assert "out/b1.yaml" in result.stdout


def test_export_python_to_a_file(launched: _Launched) -> None:
    result = launched["export:python-out"]
    assert result.returncode == 0, result.stderr
    module = ast.parse((result.cwd / "b1.py").read_text(encoding="utf-8"))
    [family] = [n.value for n in module.body if isinstance(n, ast.Assign)][1:]
    _check_paper_member(ast.literal_eval(family))


def test_export_for_a_macs_budget(launched: _Launched) -> None:
    result = launched["export:target-macs"]
    assert result.returncode == 0, result.stderr
    [member] = json.loads(result.stdout)["members"]
    # The closest step of the MACs curve to 1.0G (993,797,968 just below a jump to 1.0109G).
    assert abs(member["macs"] - 1e9) / 1e9 < 0.01
    assert member["name"] == f"phi_{member['phi']:g}"
    assert f"phi={member['phi']:g} gives {member['macs']:,} MACs" in result.stderr


@pytest.mark.parametrize(
    ("case", "fragments", "prefix"),
    [
        ("export:below-one", ("alpha", "0.5"), ""),
        ("export:not-numbers", ("--coefficients", "a,b,c"), ""),
        ("export:bad-mode", ("--mode", "bogus"), "scaling-search export: error:"),
        ("export:zero-px", ("--base-resolution", "at least 1", "got 0"), ""),
        ("export:zero-classes", ("--num-classes", "at least 2", "got 0"), ""),
        ("export:bad-target", ("--target-params", "'20X'", "20M"), ""),
        ("export:target-and-phi", ("--target-macs", "--phi"), ""),
    ],
)
def test_bad_export_is_one_line(
    launched: _Launched, case: str, fragments: tuple[str, ...], prefix: str
) -> None:
    result = launched[case]
    _assert_one_error_line(result, *fragments, prefix=prefix)
    assert result.stdout == ""
    assert [p.name for p in result.cwd.iterdir()] == []


# --- space ---------------------------------------------------------------------------------------


def test_space_lists_the_feasible_grid(launched: _Launched) -> None:
    result = launched["space:json"]
    assert result.returncode == 0, result.stderr
    candidates = json.loads(result.stdout)["candidates"]
    axes = [
        [round(low + k * 0.05, 6) for k in range(round((high - low) / 0.05) + 1)]
        for low, high in ([1.15, 1.25], [1.05, 1.15], [1.1, 1.15])
    ]
    expected = {
        (a, b, g)
        for a, b, g in itertools.product(*axes)
        if abs(a * b * b * g * g - 2.0) <= 0.1 - 1e-9
    }
    assert {(c["alpha"], c["beta"], c["gamma"]) for c in candidates} == expected
    for c in candidates:
        product = c["alpha"] * c["beta"] ** 2 * c["gamma"] ** 2
        assert abs(product - 2.0) <= 0.1 + 1e-9
        assert c["flops_ratio_nominal"] == pytest.approx(product, abs=1e-6)
        assert c["flops_ratio_measured"] > 1.0
        assert c["resolution_px"] == round(16 * c["gamma"])
        assert c["params"] > 0
    _assert_nothing_written(result.cwd, {"study.yaml"})


def test_a_reader_that_stops_early_is_not_an_error() -> None:
    """`scaling-search space … | head -1`: a reader gone before the output is written ends the
    command quietly (141, as a shell reports SIGPIPE), with no "error:" line."""
    from conftest import cli_env

    export = subprocess.Popen(
        [sys.executable, "-m", "scaling_search.cli", "export", "--coefficients", "1.2,1.1,1.15"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(),
    )
    assert export.stdout is not None and export.stderr is not None
    export.stdout.close()  # gone before the command (a second of imports) writes anything
    assert export.wait(timeout=120) == 141
    assert export.stderr.read() == b""
