"""What does the trial worker's allocator setting cost and save? Peak RSS and speed, side by side.

For each allocator setting (glibc's defaults, and mmap thresholds of 8, 4 and 1 MiB with two
arenas, with and without transparent huge pages; the one ``scaling_search.memory`` applies to
trial workers is marked), a fresh process tunes its allocator as a worker does, then trains each
of the study's ``--networks`` largest networks (``scaling_search.memory.largest_networks``) for
one epoch with the built-in trainer, on a thread of its own with ``resources.cpus_per_trial``
torch threads, as a trial runs in a Ray worker. Settings run in turn, ``--rounds`` times, so
drift of a shared machine hits them all.

Printed: per setting and network, the process's peak RSS (VmHWM: torch, the data and the trial)
and the training images/s (``EpochMetrics.images_per_second``), the medians over rounds, and
each setting's ratios to glibc's defaults. Last line:
``chosen_peak_mb: X defaults_peak_mb: Y chosen_speed_ratio: Z`` (the worst network's peak, and
the chosen setting's images/s over the defaults', the median over networks).

    .venv/bin/python bench/allocators.py                 # the quickstart, ~10 minutes on 2 cores
    .venv/bin/python bench/allocators.py --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent

_MIB = 1 << 20
_THP = {"THP_MEM_ALLOC_ENABLE": "1"}


def _settings() -> dict[str, tuple[dict[str, int] | None, dict[str, str]]]:
    """Name -> (mallopt settings or None for glibc's defaults, environment)."""
    from scaling_search.memory import ALLOCATOR_SETTINGS, WORKER_ENV

    def threshold(size: int) -> dict[str, int]:
        return {"mmap_threshold": size, "trim_threshold": size, "arena_max": 2}

    table: dict[str, tuple[dict[str, int] | None, dict[str, str]]] = {
        "glibc defaults": (None, {}),
        "8 MiB, 2 arenas, THP": (threshold(8 * _MIB), _THP),
        "4 MiB, 2 arenas, THP": (threshold(4 * _MIB), _THP),
        "4 MiB, 2 arenas": (threshold(4 * _MIB), {}),
        "1 MiB, 2 arenas, THP": (threshold(1 * _MIB), _THP),
    }
    marked: dict[str, tuple[dict[str, int] | None, dict[str, str]]] = {}
    for name, (settings, env) in table.items():
        chosen = (settings, env) == (ALLOCATOR_SETTINGS, WORKER_ENV)
        marked[f"{name} (chosen)" if chosen else name] = (settings, env)
    if not any(name.endswith("(chosen)") for name in marked):
        marked["chosen"] = (dict(ALLOCATOR_SETTINGS), dict(WORKER_ENV))
    return marked


_CHILD = textwrap.dedent(
    """
    import json, sys, threading
    settings, study_file, network = json.loads(sys.argv[1])
    from scaling_search import memory
    if settings is not None:
        memory.tune_allocator(settings)
    import torch
    from scaling_search.config import load_study
    from scaling_search.data.sources import load_data
    from scaling_search.train import fit

    study = load_study(study_file, ["train.epochs=1"])
    torch.set_num_threads(max(1, int(study.resources.cpus_per_trial)))
    data = load_data(study.data)
    point, _, px = memory.largest_networks(study, data.num_classes)[network]
    result = {}
    def trial():
        result["fit"] = fit(study.train, data, point, seed=0)
    thread = threading.Thread(target=trial)
    thread.start()
    thread.join()
    peak = 0
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) * 1024
    epoch = result["fit"].history[-1]
    print(json.dumps({"px": px, "peak": peak, "images_per_second": epoch.images_per_second}))
    """
)


def _run(settings: dict[str, int] | None, env: dict[str, str], study: str, network: int) -> dict:
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("THP_MEM_ALLOC")}
    child_env.update(env)
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps([settings, study, network])],
        capture_output=True,
        text=True,
        env=child_env,
        timeout=1800,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"a training process failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default=str(HERE.parent / "studies" / "quickstart.yaml"))
    parser.add_argument("--networks", type=int, default=2, help="the study's largest N networks")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()

    table = _settings()
    runs: dict[tuple[str, int], list[dict]] = {}
    for round_ in range(args.rounds):
        for name, (settings, env) in table.items():
            for network in range(args.networks):
                run = _run(settings, env, args.study, network)
                runs.setdefault((name, network), []).append(run)
                print(
                    f"round {round_ + 1} {name:32s} {run['px']:4d} px  "
                    f"peak {run['peak'] / 1e6:7.0f} MB  {run['images_per_second']:6.1f} img/s",
                    flush=True,
                )

    def median(name: str, network: int, key: str) -> float:
        return statistics.median(run[key] for run in runs[(name, network)])

    defaults = next(iter(table))
    chosen = next(name for name in table if "chosen" in name)
    print(f"\n{'setting':32s} {'peak MB (each network)':>24s} {'img/s':>14s}  vs defaults")
    for name in table:
        peaks = [median(name, n, "peak") for n in range(args.networks)]
        speeds = [median(name, n, "images_per_second") for n in range(args.networks)]
        peak_ratio = max(peaks) / max(median(defaults, n, "peak") for n in range(args.networks))
        speed_ratio = statistics.median(
            s / median(defaults, n, "images_per_second") for n, s in enumerate(speeds)
        )
        print(
            f"{name:32s} {' / '.join(f'{p / 1e6:,.0f}' for p in peaks):>24s} "
            f"{' / '.join(f'{s:.1f}' for s in speeds):>14s}  "
            f"peak {peak_ratio:.2f}x speed {speed_ratio:.2f}x"
        )
    chosen_peak = max(median(chosen, n, "peak") for n in range(args.networks))
    defaults_peak = max(median(defaults, n, "peak") for n in range(args.networks))
    speed = statistics.median(
        median(chosen, n, "images_per_second") / median(defaults, n, "images_per_second")
        for n in range(args.networks)
    )
    print(
        f"chosen_peak_mb: {chosen_peak / 1e6:.0f} defaults_peak_mb: {defaults_peak / 1e6:.0f} "
        f"chosen_speed_ratio: {speed:.2f}"
    )


if __name__ == "__main__":
    main()
