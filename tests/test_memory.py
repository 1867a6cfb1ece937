"""A trial's memory: the estimate Ray is asked for, the allocator given back between trials, and
Ray holding a node to the trials its memory fits (real Ray, real training)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import ray.cloudpickle

from scaling_search import memory
from scaling_search.config import load_study
from scaling_search.data.sources import load_data
from scaling_search.space import network_key, scaled_network
from scaling_search.study.storage import open_storage, resolve_url

QUICKSTART = Path(__file__).resolve().parent.parent / "studies" / "quickstart.yaml"

# Ray's workers cannot import this module (tests/ is not on their path): its trainer double
# travels by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _peak_of_one_epoch(study_file: Path, overrides: list[str]) -> dict[str, int]:
    """Train the study's largest network for one epoch in a fresh process, as a worker does
    (allocator tuned, the trial on its own thread); its resident memory in kB."""
    script = textwrap.dedent(
        f"""
        import json, threading
        import torch
        from scaling_search import memory
        from scaling_search.config import load_study
        from scaling_search.data.sources import load_data
        from scaling_search.train import fit

        memory.tune_allocator()
        torch.set_num_threads(1)
        study = load_study({str(study_file)!r}, {overrides!r} + ["train.epochs=1"])
        data = load_data(study.data)
        point, _, _ = memory.largest_networks(study, data.num_classes)[0]

        def status():
            fields = {{}}
            for line in open("/proc/self/status"):
                name, _, value = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    fields[name] = int(value.split()[0])
            return fields

        thread = threading.Thread(target=fit, args=(study.train, data, point), kwargs={{"seed": 0}})
        thread.start()
        thread.join()
        after = status()
        memory.release_memory()
        released = status()
        print(json.dumps({{"peak": after["VmHWM"], "after": after["VmRSS"],
                          "released": released["VmRSS"]}}))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_the_estimate_covers_a_measured_trial_of_the_quickstart():
    # The estimate Ray is asked for against the peak of the quickstart's largest network trained
    # for an epoch in a process of its own (which, without Ray in it, holds less than a worker).
    study = load_study(QUICKSTART)
    estimate = memory.trial_memory_bytes(study, load_data(study.data))
    measured = _peak_of_one_epoch(QUICKSTART, [])
    peak = measured["peak"] * 1024
    assert peak <= estimate <= 2 * peak, (peak, estimate)
    # What the trial freed went back to the system.
    assert measured["released"] < measured["peak"] / 2, measured


def test_the_estimate_follows_the_batch_size_and_leaves_gpu_activations_out():
    study = load_study(QUICKSTART)
    data = load_data(study.data)
    base = memory.trial_memory_bytes(study, data)
    double = memory.trial_memory_bytes(load_study(QUICKSTART, ["train.batch_size=128"]), data)
    on_gpu = memory.trial_memory_bytes(load_study(QUICKSTART, ["resources.gpus_per_trial=1"]), data)
    (_, arch, px), *_ = memory.largest_networks(study, data.num_classes)
    _, per_image, _, _ = memory._measure(arch, px)
    # 64 more images of activations, at the headroom's rate.
    assert double - base == pytest.approx(64 * per_image * memory.HEADROOM, rel=0.01)
    assert per_image > 2**20  # megabytes per 64 px image: what batch size costs on CPU
    # On a GPU the activations are the device's; the host keeps a CUDA context instead.
    assert on_gpu < base + memory.CUDA_CONTEXT_BYTES * memory.HEADROOM
    assert on_gpu > memory.WORKER_BYTES + memory.CUDA_CONTEXT_BYTES * memory.HEADROOM


def test_the_largest_networks_are_measured_once_each():
    study = load_study(QUICKSTART)
    networks = memory.largest_networks(study, 10)
    keys = [network_key(arch, px) for _, arch, px in networks]
    assert len(set(keys)) == len(keys) == 3
    for point, arch, px in networks:  # each with a triple of the grid that builds it
        assert scaled_network(point, base_resolution_px=56, num_classes=10) == (arch, px)
    # The grid's largest input side comes first (quickstart: γ up to 1.2 of 56 px).
    assert networks[0][2] == max(px for _, _, px in networks) == 67


_FRAGMENTS = """
import sys, threading
import torch
from scaling_search import memory

memory.tune_allocator()

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024

kept = []

def work():
    # 1 MiB blocks (below the mmap threshold: in a heap) between small ones that stay, as a
    # trial's freed activations sit between what lives on: the heap cannot shrink from its top.
    blocks = []
    for _ in range(1000):
        blocks.append(torch.ones(2**18))
        kept.append(torch.ones(256))
    del blocks

before = rss()
thread = threading.Thread(target=work)
thread.start()
thread.join()
if sys.argv[1] == "release":
    memory.release_memory()
print(rss() - before)
"""


@pytest.mark.parametrize("release", [True, False])
def test_released_memory_goes_back_to_the_system(release: bool):
    # Without release_memory the freed megabytes stay resident (the case shows the test can
    # tell); with it, the process comes back near where it was.
    result = subprocess.run(
        [sys.executable, "-c", _FRAGMENTS, "release" if release else "keep"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    grown_mib = int(result.stdout.strip())
    if release:
        assert grown_mib < 64, grown_mib  # of 1,000 MiB allocated
    else:
        assert grown_mib > 500, grown_mib


def test_the_allocator_settings_are_applied_once_on_glibc():
    # What they do is tested above (released_memory) and measured by bench/memory.py.
    if memory._glibc() is None:
        pytest.skip("glibc's allocator only")
    assert memory.tune_allocator() == memory.ALLOCATOR_SETTINGS
    assert memory.tune_allocator() == memory.ALLOCATOR_SETTINGS


def _timed_fit(*args: Any, log: str, **kwargs: Any) -> Any:
    """The built-in trainer, with when it ran written to ``log``."""
    from scaling_search.train import fit

    started = time.time()
    result = fit(*args, **kwargs)
    with open(log, "a", encoding="utf-8") as out:
        out.write(json.dumps([started, time.time(), os.getpid()]) + "\n")
    return result


def _most_at_once(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = most = 0
    for _, change in events:
        running += change
        most = max(most, running)
    return most


@pytest.mark.slow
@pytest.mark.parametrize(("per_trial_gib", "at_once"), [(2, 1), (1, 2)])
def test_ray_runs_no_more_trials_at_once_than_a_nodes_memory_holds(
    per_trial_gib: int, at_once: int, tiny_study: Path, tmp_path: Path
):
    # A node with 3 GiB for trials: trials of 2 GiB run one at a time, of 1 GiB both at once
    # (search.max_concurrent_trials is 2, and 2 CPUs).
    from scaling_search import driver

    # Two networks of the tiny grid, two epochs each.
    tiny_grid = "alpha: [1.0, 1.3], beta: [1.0, 1.15], gamma: [1.1, 1.15]"
    text = tiny_study.read_text()
    assert tiny_grid in text
    two = "alpha: [1.2, 1.2], beta: [1.1, 1.15], gamma: [1.15, 1.15]"
    tiny_study.write_text(text.replace(tiny_grid, two))
    study = load_study(tiny_study, [f"resources.memory_per_trial={per_trial_gib}GiB"])
    log = tmp_path / "ran.jsonl"
    ray.init(num_cpus=2, _memory=3 * 2**30, include_dashboard=False, log_to_driver=False)
    try:
        driver.run_study(
            study,
            data=load_data(study.data),
            storage=open_storage(resolve_url(study)),
            progress=lambda line: None,
            fit_fn=functools.partial(_timed_fit, log=str(log)),
        )
    finally:
        ray.shutdown()
    ran = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
    assert len(ran) == 2
    assert _most_at_once([(start, end) for start, end, _ in ran]) == at_once
    trials = optuna.load_study(study_name=study.name, storage=resolve_url(study)).get_trials()
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
