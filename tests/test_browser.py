"""The report and optuna-dashboard in a real browser: Debian's Chromium, headless, via chromedriver.

Nothing is downloaded: selenium is pointed at /usr/bin/chromium and /usr/bin/chromedriver
(scripts/browser.sh installs them), and the browser resolves no host name at all, so a page that
tried to fetch anything from the network would log an error and fail here. Screenshots of every
page land in dashboards/screenshots/ (or $SCALING_SEARCH_SCREENSHOTS) for CI to keep.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import CRAFTED_SEEDS, CRAFTED_TRIALS, cli_env, make_crafted_study

from scaling_search.config import load_study
from scaling_search.report import publish as report

pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SCREENSHOTS = Path(
    os.environ.get(
        "SCALING_SEARCH_SCREENSHOTS", Path(__file__).parent.parent / "dashboards" / "screenshots"
    )
)
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    # No name resolves (but the dashboard's 127.0.0.1): anything fetched from the network fails,
    # and shows as a console error.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--window-size=1280,1400",
)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        if os.environ.get("SCALING_SEARCH_REQUIRE_BROWSER"):
            pytest.fail(f"browser tests required but {', '.join(missing)} missing")
        pytest.skip(f"{', '.join(missing)} missing (bash scripts/browser.sh installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="ss-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(60)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _wait_for(driver: Any, script: str, *, timeout_s: float = 30) -> Any:
    """Poll a JavaScript expression until it is truthy; return its value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = driver.execute_script(f"return ({script});")
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"page never satisfied: {script}")
        time.sleep(0.25)


def _console_errors(driver: Any) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def _screenshot(driver: Any, name: str) -> Path:
    """The whole page, not only the window, through the DevTools protocol."""
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}
    )
    path = SCREENSHOTS / name
    path.write_bytes(base64.b64decode(shot["data"]))
    assert path.stat().st_size > 20_000  # a real picture, not a blank page
    return path


_PARTS_RENDERED = " && ".join(
    f"document.querySelector('#part-{p} svg.main-svg')" for p in report.PARTS
)
_COUNTS = """{
  simplex: document.querySelectorAll('#part-simplex .ternarylayer .point').length,
  cost: document.querySelectorAll('#part-cost .scatterlayer .point').length,
  curves: document.querySelectorAll('#part-curves .scatterlayer .trace').length,
  family: document.querySelectorAll('#part-family .subplot.xy, #part-family .subplot.x2y2').length,
  top: document.querySelector('#part-top .table-control-view') ? 1 : 0,
  table: document.querySelector('#part-top').textContent,
}"""


def _open_report(driver: Any, path: Path) -> dict[str, Any]:
    driver.get_log("browser")  # drop what earlier pages logged
    driver.get(path.resolve().as_uri())
    _wait_for(driver, _PARTS_RENDERED)
    return driver.execute_script(f"return {_COUNTS};")


def test_report_renders_all_five_parts(browser: Any, tmp_path: Path) -> None:
    study = make_crafted_study(f"sqlite:///{tmp_path / 'crafted.db'}")
    page = report.write_report(
        study, tmp_path / "report.html", base_resolution_px=32, num_classes=10
    )
    counts = _open_report(browser, page)
    trained = len(CRAFTED_TRIALS) * len(CRAFTED_SEEDS)
    failed = sum(len(CRAFTED_SEEDS) for _, state, _, _ in CRAFTED_TRIALS if state == "FAIL")
    # Every trained trial on the simplex, plus the paper's triple and the winner's star.
    assert counts["simplex"] == trained + 2
    # Every trial with an accuracy against its cost, plus the winner's seeds again as stars.
    assert counts["cost"] == trained - failed + len(CRAFTED_SEEDS)
    assert counts["curves"] == trained  # one line per trial with a learning curve
    assert counts["family"] == 2  # params and MACs against φ
    assert counts["top"] == 1 and "1.4" in counts["table"] and "0.6550 ± 0.0071" in counts["table"]
    assert _console_errors(browser) == []
    _screenshot(browser, "report-all-outcomes.png")


def test_report_of_a_real_run_renders(browser: Any, finished_study: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "scaling_search.cli",
            "report",
            str(finished_study),
            "--out",
            str(out),
        ],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    counts = _open_report(browser, out)
    trials = len(_trial_numbers(finished_study))  # all complete: trained, or sharing a result
    trained = len(_trial_numbers(finished_study, trained_only=True))
    winner = _best(finished_study)
    # Every triple on the simplex, the paper's triple, the winner's star and an open star for
    # each other triple of its class; learning curves and cost points for trained trials only.
    assert counts["simplex"] == trials + 2 + len(winner.members) - 1
    assert counts["curves"] == trained
    assert counts["cost"] == trained + winner.n_seeds  # and the winner's seeds again as stars
    assert counts["family"] == 2 and counts["top"] == 1
    assert _console_errors(browser) == []
    _screenshot(browser, "report.png")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _study_id(port: int, name: str) -> int:
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as r:
                studies = json.loads(r.read())["study_summaries"]
            return int(next(s["study_id"] for s in studies if s["study_name"] == name))
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_dashboard_shows_the_finished_study(browser: Any, finished_study: Path) -> None:
    study = load_study(finished_study)
    port = _free_port()
    command = [sys.executable, "-m", "scaling_search.cli", "dashboard", str(finished_study)]
    server = subprocess.Popen(
        [*command, "--port", str(port)],
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        study_id = _study_id(port, study.name)
        base = f"http://127.0.0.1:{port}/dashboard/studies/{study_id}"
        browser.get_log("browser")
        # The study's page: optuna-dashboard's own plots and the driver's figures and note.
        browser.get(base)
        _wait_for(browser, "document.body.innerText.includes('Where the FLOPs go')")
        _wait_for(browser, "document.querySelectorAll('.ternarylayer .point').length > 0")
        _screenshot(browser, "dashboard-study.png")
        # The trial list: every trial of the run is listed.
        browser.get(f"{base}/trials")
        count = len(_trial_numbers(finished_study))
        _wait_for(browser, f"document.body.innerText.includes('{count} Trials')")
        text = browser.execute_script("return document.body.innerText")
        for number in range(count):
            assert f"Trial {number}\n" in text
        _screenshot(browser, "dashboard-trials.png")
        # The study's note, kept by the driver: the best triple.
        browser.get(f"{base}/note")
        _wait_for(browser, "document.body.innerText.includes('best: α=')")
        assert _console_errors(browser) == []
    finally:
        server.terminate()
        server.wait(timeout=30)


def _ot_study(study_path: Path) -> Any:
    import optuna

    from scaling_search.study.storage import open_storage, resolve_url

    study = load_study(study_path)
    return optuna.load_study(study_name=study.name, storage=open_storage(resolve_url(study)))


def _trial_numbers(study_path: Path, *, trained_only: bool = False) -> list[int]:
    from scaling_search.study.ledger import is_shared

    trials = _ot_study(study_path).get_trials(deepcopy=False)
    return [t.number for t in trials if not (trained_only and is_shared(t))]


def _best(study_path: Path) -> Any:
    from scaling_search.results.ranking import best_triple

    return best_triple(_ot_study(study_path))
