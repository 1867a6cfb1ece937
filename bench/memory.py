"""How much memory does a trial worker hold? RSS of the Ray worker that runs a study's trials.

Runs ``--study`` (default: the quickstart) for real with ``scaling_search.driver.run_study``, one
trial at a time (``search.max_concurrent_trials=1``), so that one reused Ray worker trains every
trial in sequence, as each worker of a real run does. The built-in trainer is wrapped to read the
worker's own /proc at the start and end of each trial: resident set (VmRSS), its anonymous part
(RssAnon) and the peak since the previous reading (VmHWM, reset at each trial's start through
/proc/self/clear_refs), so that a trial's peak includes nothing of the one before.

Printed: one line per trial; the allocator settings the worker saw; the peak RSS over the run
(from the worker's start, so the import of torch and the fetch of the data count too); and the
growth per trial, the least-squares slope of the RSS at the end of each trial after the first
(the first pays one-time costs), within one worker (if Ray's memory monitor killed a worker, its
replacement's trials are listed as a second worker). Last line:
``peak_rss_gb: X growth_per_trial_mb: Y``.

    .venv/bin/python bench/memory.py                       # the quickstart's 10 trials
    .venv/bin/python bench/memory.py --set train.epochs=1  # any study override, as with `run`
    .venv/bin/python bench/memory.py --log FILE            # the summary of an earlier run's log
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
LOG_ENV = "SCALING_SEARCH_BENCH_MEMORY_LOG"


def _status_kb() -> dict[str, int]:
    """This process's memory lines of /proc/self/status, in kB."""
    fields = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM", "RssAnon"):
                fields[name] = int(value.split()[0])
    return fields


def measured_fit(*args: Any, **kwargs: Any) -> Any:
    """The built-in trainer, with this worker's memory read before and after (in the worker)."""
    from scaling_search.memory import WORKER_ENV, tune_allocator
    from scaling_search.train import fit

    before = _status_kb()
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
        clear.write("5")  # VmHWM := VmRSS: the next peak is this trial's own
    started = time.time()
    result = fit(*args, **kwargs)
    after = _status_kb()
    line = {
        "pid": os.getpid(),
        # The trainable tuned the allocator before calling this; the call only reads it back.
        "allocator": tune_allocator(),
        "env": {name: os.environ.get(name) for name in WORKER_ENV},  # as the worker started
        "started": started,
        "seconds": time.time() - started,
        "resolution_px": result.resolution_px,
        "before": before,
        "after": after,
    }
    with open(os.environ[LOG_ENV], "a", encoding="utf-8") as log:
        log.write(json.dumps(line) + "\n")
    return result


def _slope(values: list[float]) -> float:
    """Least-squares slope of ``values`` against their index (0 for fewer than two)."""
    count = len(values)
    if count < 2:
        return 0.0
    mean_x, mean_y = (count - 1) / 2, sum(values) / count
    numerator = sum((x - mean_x) * (y - mean_y) for x, y in enumerate(values))
    return numerator / sum((x - mean_x) ** 2 for x in range(count))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default=str(HERE.parent / "studies" / "quickstart.yaml"))
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a study override"
    )
    parser.add_argument("--log", type=Path, help="summarise the log of an earlier run instead")
    args = parser.parse_args()
    if args.log:
        summarise(args.log)
        return

    folder = Path(tempfile.mkdtemp(prefix="ss-memory-"))
    log = folder / "memory.jsonl"
    print(f"log: {log}", flush=True)
    os.environ[LOG_ENV] = str(log)  # the local Ray's workers inherit the driver's environment

    from scaling_search.config import load_study
    from scaling_search.data.sources import load_data
    from scaling_search.driver import run_study
    from scaling_search.memory import trial_memory_bytes
    from scaling_search.study.storage import open_storage

    overrides = ["search.max_concurrent_trials=1", f"output_dir={folder / 'runs'}", *args.set]
    study = load_study(args.study, overrides)
    storage = open_storage(f"sqlite:///{folder / 'optuna.db'}")
    data = load_data(study.data)
    estimate = trial_memory_bytes(study, data)  # what `run` reserves per trial with Ray
    print(f"estimated peak of a trial (resources.memory_per_trial): {estimate / 2**30:.2f} GiB")
    run_study(
        study,
        data=data,
        storage=storage,
        progress=lambda line: None,
        fit_fn=measured_fit,
    )
    summarise(log)


def summarise(log: Path) -> None:
    """Print the table and the last line from a log the workers wrote."""
    trials = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
    trials.sort(key=lambda trial: trial["started"])
    workers: dict[int, list[dict[str, Any]]] = {}
    for trial in trials:
        workers.setdefault(trial["pid"], []).append(trial)
    print(f"{len(trials)} trials in {len(workers)} worker process(es); MB of the worker:")
    print("trial worker  px  seconds  rss_before  rss_after  anon_after  peak_in_trial")
    for number, trial in enumerate(trials, 1):
        before, after = trial["before"], trial["after"]
        print(
            f"{number:>5} {list(workers).index(trial['pid']) + 1:>6} {trial['resolution_px']:>3} "
            f"{trial['seconds']:>8.1f} {before['VmRSS'] / 1024:>11.0f} "
            f"{after['VmRSS'] / 1024:>10.0f} {after['RssAnon'] / 1024:>11.0f} "
            f"{after['VmHWM'] / 1024:>14.0f}"
        )
    allocator = trials[0].get("allocator")
    shown = " ".join(f"{k}={v}" for k, v in (allocator or {}).items())
    print("worker allocator: " + (shown or "glibc defaults (not tuned)"))
    env = trials[0].get("env") or {}
    print("worker environment: " + (" ".join(f"{k}={v}" for k, v in env.items()) or "not logged"))
    # VmHWM before a worker's first trial: its start (imports, data); after a trial: the trial's
    # own peak; before a later trial: the time between (checkpoint, report).
    peak_kb = max(max(t["before"]["VmHWM"], t["after"]["VmHWM"]) for t in trials)
    # Growth: within each worker, the slope of the RSS at the end of its trials after the first.
    slopes = {
        pid: _slope([t["after"]["VmRSS"] / 1024 for t in runs[1:]]) for pid, runs in workers.items()
    }
    if len(workers) > 1:
        print(
            "a worker was replaced (killed?); growth per trial of each: "
            + ", ".join(f"{slope:.1f} MB" for slope in slopes.values())
        )
    busiest = max(workers, key=lambda pid: len(workers[pid]))
    print(f"peak_rss_gb: {peak_kb / 2**20:.2f} growth_per_trial_mb: {slopes[busiest]:.1f}")


if __name__ == "__main__":
    main()
