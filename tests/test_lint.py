"""The test command also runs the linters: ruff (lint and format) and mypy, as configured in
pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "command",
    [
        ["ruff", "check", "."],
        ["ruff", "format", "--check", "."],
        ["mypy"],
    ],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_linter_is_clean(command: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    """CI proves the README: the second command of its opening is .ci/run's last line."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = [b.split("```", 1)[0].strip() for b in readme.split("```bash\n")[1:3]]
    assert len(blocks) == 2 and "scaling-search run studies/quickstart.yaml" in blocks[0]
    ci_lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()
    assert ci_lines[-1] == blocks[1]


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
        "print(sorted(m for m in ('optuna', 'plotly', 'scaling_search.ledger', "
        "'scaling_search.report', 'scaling_search.driver._search') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
