"""How long from ``scaling-search run`` to the first training step of the first trial?

Runs the real command on a small study (synthetic data, one grid point per run, 1 epoch, local
Ray on 2 CPUs) ``--runs`` times, each in a fresh output folder and a private RAY_TMPDIR, and reads
from the study's storage when the first trial's first optimiser step ended (``first_step_at``,
recorded by the driver) and when its training began (``train_started_at``). Printed per run: the
seconds from launching the command to the trial's training start and to its first step, and the
whole command's wall time; then the median. The last line is ``startup: X.XX s`` (median seconds
from launch to the first step).

    .venv/bin/python bench/startup.py [--runs 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

from scaling_search.study.record import TrialRecord

STUDY = """\
name: startup
output_dir: {out}
data: {{kind: synthetic, num_classes: 10, train_size: 256, test_size: 64, image_px: 32}}
space: {{alpha: [1.2, 1.2], beta: [1.1, 1.1], gamma: [1.15, 1.15], tolerance: 0.1}}
search: {{sampler: grid, max_concurrent_trials: 1}}
train: {{base_resolution_px: 32, epochs: 1, batch_size: 64}}
resources: {{cpus_per_trial: 1, num_cpus: 2}}
"""


def _one_run(folder: Path) -> tuple[float, float, float]:
    study = folder / "study.yaml"
    study.write_text(STUDY.format(out=folder / "runs"), encoding="utf-8")
    ray_tmp = tempfile.mkdtemp(prefix="ss-ray-", dir="/tmp")
    command = [sys.executable, "-m", "scaling_search.cli", "run", str(study)]
    launched = time.time()
    try:
        subprocess.run(
            command,
            env={"RAY_TMPDIR": ray_tmp, "PATH": "/usr/bin:/bin", "PYTHONWARNINGS": "ignore"},
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=600,
        )
        wall = time.time() - launched
    finally:
        subprocess.run(["pkill", "-9", "-f", ray_tmp], check=False, capture_output=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{folder / 'runs' / 'optuna.db'}"
    trials = optuna.load_study(study_name="startup", storage=storage).get_trials()
    records = [TrialRecord.of(t) for t in trials]
    first_step, started = min(
        (r.first_step_at, r.train_started_at)
        for r in records
        if r.first_step_at is not None and r.train_started_at is not None
    )
    return started - launched, first_step - launched, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    firsts = []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="ss-startup-") as folder:
            started, first, wall = _one_run(Path(folder))
        firsts.append(first)
        print(
            f"run {run + 1}: training starts after {started:.2f} s, first step ends after "
            f"{first:.2f} s, command took {wall:.1f} s"
        )
    print(f"startup: {statistics.median(firsts):.2f} s")


if __name__ == "__main__":
    main()
