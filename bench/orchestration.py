"""How busy does the search keep its workers? The project's driver against a default Tune setup.

In one Ray session on ``--cpus`` CPUs, ``--trials`` trials of ``--seconds`` of real CPU work
(bench/workloads.py), one CPU each, run twice:

- project: ``scaling_search.driver.run_study`` on a study whose objective is that work (TPE on the
  constraint surface, ``max_concurrent_trials`` = CPUs, the Optuna study in a SQLite file);
- baseline: ``tune.Tuner`` with ``OptunaSearch`` over α, β, γ and Tune's default settings.

Each trial logs when its work began and ended. Busy fraction = Σ trial work / (CPUs × wall),
where wall runs from the first trial's start to the last trial's end: the time the workers could
have been working. Also printed: the set-up before the first trial and the wind-down after the
last. Last line: ``busy: X.XX baseline: Y.YY``.

    .venv/bin/python bench/orchestration.py              # 40 trials of 2 s on 2 CPUs, ~2 minutes
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _measure(label: str, search: Callable[[], None], log: Path, cpus: int) -> float:
    log.write_text("", encoding="utf-8")
    began = time.time()
    search()
    ended = time.time()
    spans = [(float(s), float(e)) for s, e in map(str.split, log.read_text().splitlines())]
    first, last = min(s for s, _ in spans), max(e for _, e in spans)
    busy = sum(e - s for s, e in spans) / (cpus * (last - first))
    print(
        f"{label:>8}: {len(spans)} trials, busy {busy:.3f} over {last - first:.1f} s, median gap "
        f"{statistics.median(_gaps(spans, cpus)):.3f} s between a trial's end and the next start "
        f"(set-up {first - began:.1f} s before the first, {ended - last:.1f} s after the last)"
    )
    return busy


def _gaps(spans: list[tuple[float, float]], cpus: int) -> list[float]:
    """For each trial after the first ``cpus``: seconds from the earliest unclaimed end of an
    earlier trial (a freed worker) to its start."""
    ends = sorted(e for _, e in spans)
    starts = sorted(s for s, _ in spans)[cpus:]
    return [start - end for start, end in zip(starts, ends, strict=False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument(
        "--tuned-baseline",
        action="store_true",
        help="also run the baseline with reuse_actors and max_concurrent_trials = CPUs",
    )
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="ss-orch-"))
    log = folder / "spans.txt"
    # Workers inherit the environment: they import bench/workloads.py and log to `log`.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    os.environ["SCALING_SEARCH_BENCH_LOG"] = str(log)
    os.environ["SCALING_SEARCH_BENCH_SECONDS"] = str(args.seconds)
    sys.path.insert(0, str(HERE))

    import optuna
    import ray
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch
    from workloads import tune_spin

    from scaling_search.config import parse_study
    from scaling_search.data.sources import load_data
    from scaling_search.driver import run_study
    from scaling_search.report.publish import LiveDashboard
    from scaling_search.study.storage import open_storage

    # No worker logs on the terminal: Ray prints them late, after the last line.
    ray.init(
        num_cpus=args.cpus,
        include_dashboard=False,
        logging_level=logging.ERROR,
        log_to_driver=False,
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = parse_study(
        {
            "name": "orchestration",
            "output_dir": str(folder / "runs"),
            "objective": "workloads:spin",
            "data": {"train_size": 64, "test_size": 16},
            "search": {
                "sampler": "tpe",
                "n_trials": args.trials,
                "max_concurrent_trials": args.cpus,
            },
            "train": {"epochs": 1},
            "resources": {"cpus_per_trial": 1},
        }
    )

    def project() -> None:
        storage = open_storage(f"sqlite:///{folder / 'optuna.db'}")  # as `scaling-search run`
        run_study(
            study,
            data=load_data(study.data),
            storage=storage,
            progress=lambda line: None,
            live_view=LiveDashboard,  # as `scaling-search run`: the dashboard kept current
        )

    def baseline(**settings: int | bool) -> Callable[[], None]:
        def search() -> None:
            space = {name: tune.uniform(1.0, 1.5) for name in ("alpha", "beta", "gamma")}
            tune.Tuner(
                tune.with_resources(tune_spin, {"cpu": 1}),
                param_space=space,
                tune_config=tune.TuneConfig(
                    search_alg=OptunaSearch(metric="accuracy", mode="max"),
                    num_samples=args.trials,
                    **settings,  # type: ignore[arg-type]
                ),
                run_config=tune.RunConfig(storage_path=str(folder / "tune"), verbose=0),
            ).fit()

        return search

    ours = _measure("project", project, log, args.cpus)
    theirs = _measure("baseline", baseline(), log, args.cpus)
    if args.tuned_baseline:
        _measure(
            "tuned",
            baseline(reuse_actors=True, max_concurrent_trials=args.cpus),
            log,
            args.cpus,
        )
    print(f"busy: {ours:.2f} baseline: {theirs:.2f}")


if __name__ == "__main__":
    main()
