"""How little of the exhaustive grid finds its winner? Search strategies on noisy surfaces.

Three response surfaces over the *networks* that triples build (bench/workloads.py: a function of
each network's realised depth, width and resolution after rounding, with its optimum inside the
space, on its border, or nearly flat), seed noise 0.01 drawn per network and seed (two triples of
one network score alike, as real training does), a budget of ``--epochs`` epochs whose early
epochs score lower but rank alike. Each strategy runs ``--seeds`` times per surface through the
real driver (Ray Tune, Optuna storage in SQLite, the objective hook with its network key, so each
network is trained once per seed and the triples that share it get its result):

- grid: every distinct network of the grid at the full budget (the paper's step 1);
- grid+asha: the same grid under ASHA (stopped trials never win);
- tpe+asha: TPE on the constraint surface, trainings for a third of the grid's networks, under
  ASHA (a sampled triple whose network was trained costs nothing);
- tpe+asha+racing: tpe+asha, then its top 2 networks raced with 2 new seeds each;
- grid+asha+racing: grid+asha, then the top 3 networks raced with 3 new seeds each.

After a race the winner is the raced network with the best mean (scaling_search.results.ranking).

Compute: trial-epochs trained (trainings actually run; shared results cost nothing) / (the grid's
distinct networks × budget), the exhaustive grid's cost. Found: the chosen network's true
accuracy is within one seed-noise standard deviation (0.01) of the best grid network's: tied with
it, since one run of each could not tell them apart. Last line:
``best strategy: NAME compute: X% found: Y%`` (the cheapest strategy finding ≥ 90%, else the
one finding most).

    .venv/bin/python bench/search_efficiency.py --seeds 20   # ~55 minutes on 2 CPUs
    .venv/bin/python bench/search_efficiency.py --seeds 3    # a quick look
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SPACE = {
    "alpha": [1.0, 1.4],
    "beta": [1.0, 1.25],
    "gamma": [1.0, 1.3],
    "step": 0.05,
    "tolerance": 0.1,
}
STRATEGIES: dict[str, dict[str, Any]] = {
    "grid": {"sampler": "grid"},
    "grid+asha": {"sampler": "grid", "scheduler": "asha"},
    "tpe+asha": {"sampler": "tpe", "scheduler": "asha", "n_trials": 1 / 3},  # of the grid's
    "tpe+asha+racing": {
        "sampler": "tpe",
        "scheduler": "asha",
        "n_trials": 1 / 3,
        "racing": {"top_k": 2, "repeats": 2},
    },
    "grid+asha+racing": {
        "sampler": "grid",
        "scheduler": "asha",
        "racing": {"top_k": 3, "repeats": 3},
    },
}
FOUND_WITHIN = 0.01  # one seed-noise standard deviation (workloads.NOISE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--surfaces", nargs="+", default=["interior", "border", "flat"])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="ss-efficiency-"))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    sys.path.insert(0, str(HERE))

    import optuna
    import ray
    from workloads import BASE_PX, true_accuracy

    from scaling_search.config import parse_study
    from scaling_search.data.sources import load_data
    from scaling_search.driver import run_study
    from scaling_search.results.ranking import best_triple
    from scaling_search.study.ledger import grid_classes, is_shared
    from scaling_search.study.record import TrialRecord
    from scaling_search.study.storage import open_storage

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no Tune tables
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config = {
        "name": "g",
        "objective": "workloads:interior",
        "network_key": "workloads:network",
        "space": SPACE,
        "train": {"base_resolution_px": BASE_PX},
    }
    classes = grid_classes(parse_study(config), num_classes=10)
    grid = [members[0] for members in classes.values()]  # one triple per network
    full_cost = len(grid) * args.epochs
    candidates = sum(len(members) for members in classes.values())
    print(
        f"{candidates} grid candidates build {len(grid)} networks; {len(grid)} × {args.epochs} "
        f"epochs = {full_cost} trial-epochs"
    )

    summary: dict[str, tuple[float, float]] = {}
    for name in args.strategies:
        costs, found = [], []
        for surface in args.surfaces:
            best_true = max(true_accuracy(surface, *c.as_tuple()) for c in grid)
            for seed in range(args.seeds):
                search = {**STRATEGIES[name], "seed": seed, "max_concurrent_trials": 2}
                if "n_trials" in search:  # trainings: a share of the grid's networks
                    search["n_trials"] = round(len(grid) * search["n_trials"])
                study = parse_study(
                    {
                        "name": f"{name.replace('+', '_')}-{surface}-{seed}",
                        "output_dir": str(folder / f"{name.replace('+', '_')}-{surface}-{seed}"),
                        "objective": f"workloads:{surface}",
                        "network_key": "workloads:network",
                        "data": {"train_size": 64, "test_size": 16},
                        "space": SPACE,
                        "search": search,
                        "train": {"epochs": args.epochs, "base_resolution_px": BASE_PX},
                        "resources": {"cpus_per_trial": 1},
                    }
                )
                storage = open_storage(f"sqlite:///{study.out_dir / 'optuna.db'}")
                run_study(
                    study, data=load_data(study.data), storage=storage, progress=lambda _: None
                )
                ot_study = optuna.load_study(study_name=study.name, storage=storage)
                trained = sum(
                    TrialRecord.of(t).epochs_completed or 0
                    for t in ot_study.get_trials()
                    if not is_shared(t)
                )
                chosen = best_triple(ot_study).coefficients
                costs.append(trained / full_cost)
                found.append(true_accuracy(surface, *chosen.as_tuple()) >= best_true - FOUND_WITHIN)
                storage.engine.dispose()
            print(
                f"{name:>17} {surface:>8}: compute {sum(costs[-args.seeds :]) / args.seeds:6.1%}"
                f"  found {sum(found[-args.seeds :]) / args.seeds:6.1%}",
                flush=True,
            )
        summary[name] = (sum(costs) / len(costs), sum(found) / len(found))
        print(
            f"{name:>17}      all: compute {summary[name][0]:6.1%}  found {summary[name][1]:6.1%}"
        )

    finders = [n for n in summary if summary[n][1] >= 0.9]
    best = (
        min(finders, key=lambda n: summary[n][0])
        if finders
        else max(summary, key=lambda n: summary[n][1])
    )
    print(f"best strategy: {best} compute: {summary[best][0]:.0%} found: {summary[best][1]:.0%}")


if __name__ == "__main__":
    main()
