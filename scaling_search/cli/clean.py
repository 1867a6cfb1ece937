"""``scaling-search clean``: remove what stopped runs of a study left on disk."""

from __future__ import annotations

import argparse

from scaling_search.config import load_study


def clean(args: argparse.Namespace) -> int:
    """Remove the Ray Tune folders (checkpoints included) whose driver is gone; never the study's
    database, report or family. Folders of a driver that may still run are kept, with why."""
    from scaling_search.cli._common import load_optuna_study
    from scaling_search.study.leftovers import RAY_FOLDER, format_bytes, sweep
    from scaling_search.study.storage import open_storage, resolve_url, study_exists

    study = load_study(args.study, args.overrides)
    url = resolve_url(study)
    # Which drivers on other hosts still run, the study's heartbeats say; no study, no answer.
    ot_study = (
        load_optuna_study(study, open_storage(url)) if study_exists(url, study.name) else None
    )
    swept = sweep(study, ot_study)
    for experiment in swept.removed:
        print(f"removed {experiment.path} ({format_bytes(experiment.size_bytes)})")
    for experiment, why in swept.kept:
        print(f"kept {experiment.path}: {why}")
    folder = study.out_dir / RAY_FOLDER
    if not swept.removed and not swept.kept:
        print(f"nothing to clean: no Ray Tune folder of study {study.name!r} in {folder}")
        return 0
    print(
        f"removed {len(swept.removed)} folder(s), {format_bytes(swept.removed_bytes)} "
        f"({swept.removed_bytes} bytes); kept {len(swept.kept)}"
    )
    return 0
