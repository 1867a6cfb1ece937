"""The test command also runs the linters: ruff (lint and format) and mypy, as configured in
pyproject.toml."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# The project's own Python files: what a user writes into the checkout (an exported family.py,
# a study's objective module) is theirs, not the project's to lint.
PROJECT_PATHS = ["scaling_search", "tests", "bench"]
TESTED_WITHOUT_SIGNATURES = ["tests", "bench"]


@pytest.mark.parametrize(
    "command",
    [
        ["ruff", "check", *PROJECT_PATHS],
        ["ruff", "format", "--check", *PROJECT_PATHS],
        ["mypy"],  # the package, as pyproject.toml's [tool.mypy] says: every signature typed
        # Tests and benches: their bodies are checked, their functions need no annotations.
        ["mypy", "--allow-untyped-defs", *TESTED_WITHOUT_SIGNATURES],
    ],
    ids=["ruff-check", "ruff-format", "mypy", "mypy-tests-bench"],
)
def test_linter_is_clean(command: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_the_linters_check_the_projects_files_and_nothing_else() -> None:
    # Every tracked Python file is in a checked folder, and mypy checks each of them: a file
    # the user adds at the root is left alone.
    tracked = subprocess.run(
        ["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    files = tracked.stdout.split()
    assert files and all(name.split("/")[0] in PROJECT_PATHS for name in files), files
    config = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    section = config.split("[tool.mypy]", 1)[1].split("\n[", 1)[0]
    listed = re.search(r"^files = \[(.*?)\]", section, re.MULTILINE)
    assert listed is not None, section
    typed = re.findall(r'"([^"]+)"', listed.group(1))
    assert sorted(typed + TESTED_WITHOUT_SIGNATURES) == sorted(PROJECT_PATHS)


@pytest.mark.parametrize(
    "script",
    [*sorted((ROOT / "scripts").glob("*.sh")), ROOT / ".ci" / "run"],
    ids=lambda path: path.name,
)
def test_shell_scripts_parse(script: Path) -> None:
    # The project's shell scripts (set-up and CI) are read by bash without running them.
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("library", ["torch", "ray[tune]", "optuna"])
def test_the_fast_moving_libraries_have_an_upper_bound(library: str) -> None:
    # Their next major is refused until tested; the README says which versions were.
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    (line,) = [ln for ln in pyproject.splitlines() if ln.strip().startswith(f'"{library}>')]
    assert ",<" in line, line
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "Tested with torch 2.13.0, Ray 2.60.0 and Optuna 5.1.0" in readme


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    """CI proves the README: the second command of its opening is a line of .ci/run, and only
    the compose stack's check (scripts/compose_check.sh) runs after it."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = [b.split("```", 1)[0].strip() for b in readme.split("```bash\n")[1:3]]
    assert len(blocks) == 2 and "scaling-search run studies/quickstart.yaml" in blocks[0]
    ci_lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()
    assert blocks[1] in ci_lines
    after = [line for line in ci_lines[ci_lines.index(blocks[1]) + 1 :] if line[:1] != "#"]
    assert after in ([], ["bash scripts/compose_check.sh"])


def test_only_the_driver_package_imports_ray() -> None:
    """Ray's API moves often: scaling_search/driver/ is the one place that imports it."""
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "scaling_search").rglob("*.py")
        if "driver" not in path.relative_to(ROOT / "scaling_search").parts
        and any(
            line.startswith(("import ray", "from ray"))
            for line in (text.strip() for text in path.read_text(encoding="utf-8").splitlines())
        )
    ]
    assert offenders == []


def test_a_worker_imports_neither_optuna_nor_the_drivers_side() -> None:
    """What a Ray worker imports before its first trial is start-up time (bench/startup.py):
    the trainable module must not bring Optuna, the report or the searcher with it."""
    probe = (
        "import sys, ray, ray.tune; import scaling_search.driver._trainable; "
        "print(sorted(m for m in ('optuna', 'plotly', 'scaling_search.study.ledger', "
        "'scaling_search.report.publish', 'scaling_search.driver._search') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
