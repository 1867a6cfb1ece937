"""``scaling-search run``: check everything a study asks for, run it, and write what it found
(the winner, the family, the report)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scaling_search import limits
from scaling_search.cli._common import load_optuna_study
from scaling_search.config import StudyConfig, StudyError, load_study
from scaling_search.driver.interrupt import StopRequest, handle_signals

if TYPE_CHECKING:
    from optuna.storages import RDBStorage

    from scaling_search.data.sources import ImageData

MAX_PATIENCE_S = 86_400.0
FAMILY_FILENAME = "family.json"


def _check_address(address: str | None) -> None:
    """--address names a cluster: never empty (which Ray would take as a new local one), and a
    HOST:PORT's port is one a server can listen on."""
    if address is None:
        return
    if not address.strip():
        raise StudyError("--address is empty; give auto or HOST:PORT, or leave it out")
    _, colon, port = address.rpartition(":")
    if colon and port.isdigit():
        limits.check_range(f"--address {address}: the port", int(port), 1, limits.MAX_PORT)


def run(args: argparse.Namespace) -> int:
    """``scaling-search run``: the study, with Ctrl-C and SIGTERM handled here."""
    with handle_signals() as stop:
        return _run_study(args, stop)


def summary_line(summary: Any, when: str = "") -> str:
    shared = f", {summary.shared} shared a trained network's result" if summary.shared else ""
    if summary.given_back:
        shared += f", {summary.given_back} given back (trained again by the next run)"
    return (
        f"this run{' ' + when if when else ''}: {summary.launched} launched, "
        f"{summary.completed} completed, {summary.pruned} stopped early, {summary.failed} "
        f"failed{shared} in {summary.wall_seconds:.0f} s"
    )


def _run_study(args: argparse.Namespace, stop: StopRequest) -> int:
    from scaling_search._startup import collector_paused

    _check_address(args.address)
    with collector_paused():  # the set-up imports torch, Optuna and Ray Tune
        study, data, url, storage = _set_up(args)
    from scaling_search.study.storage import mask_url

    print(f"storage: {mask_url(url)}  (browse: scaling-search dashboard {args.study})")
    from scaling_search.driver import run_study
    from scaling_search.report.publish import LiveDashboard

    summary = run_study(
        study,
        data=data,
        storage=storage,
        address=args.address,
        stop=stop,
        keep_checkpoints=args.keep_checkpoints,
        database_patience_s=args.database_patience,
        live_view=LiveDashboard,  # the figures and note optuna-dashboard shows, kept current
    )
    print(summary_line(summary))
    _write_findings(study, storage, data.num_classes)
    return 0


def _set_up(args: argparse.Namespace) -> tuple[StudyConfig, ImageData, str, RDBStorage]:
    """The study, its data (prepared first if need be: the data's cache is the one thing
    written before), and its storage's URL and storage, opened once everything the study asks
    for is checked."""
    from scaling_search.cli.prepare import data_line, open_study_data
    from scaling_search.study.storage import open_storage, resolve_url

    study = load_study(args.study, args.overrides)
    if not 1 <= args.database_patience <= MAX_PATIENCE_S:  # also NaN
        raise StudyError(
            f"--database-patience must be 1 to {MAX_PATIENCE_S:.0f} seconds, got "
            f"{args.database_patience}"
        )
    _check_hooks(study)
    data, readiness = open_study_data(study)  # decodes the files, the first time: minutes
    if study.space.cost == "measured":  # counts MACs with the data's classes
        _check_measured_space(study, data.num_classes)
    from scaling_search.driver import check_address

    check_address(args.address)  # a cluster that does not answer: before anything is written
    url = resolve_url(study)
    storage = open_storage(url)  # everything above is checked before anything is written
    print(data_line(study, data, readiness))  # once all is checked: bad input prints one line
    return study, data, url, storage


def _check_hooks(study: StudyConfig) -> None:
    """The study's objective imports, and its network key works on a first point (of a nominal
    space; a measured one's is checked once the classes are known)."""
    from scaling_search.sampling import ObjectiveNetworkKey, SimplexCoordinates
    from scaling_search.space import grid_candidates

    if study.objective is not None:
        from scaling_search._hooks import load_function

        # Importable here, before anything is launched.
        load_function(study.objective, what="objective")
    if study.space.cost == "nominal":  # measured: checked once the classes are known
        if study.search.sampler != "grid":
            first = SimplexCoordinates(study.space).to_coefficients(0.5, 0.5)
        else:
            first = grid_candidates(study.space)[0]
        if study.network_key is not None:  # a key function that breaks: one line, now
            ObjectiveNetworkKey(
                study.network_key, base_resolution_px=study.train.base_resolution_px
            )(first)


def _write_findings(study: StudyConfig, storage: RDBStorage, num_classes: int) -> None:
    """The winner's lines, its family's file and the report, each named on stdout."""
    from scaling_search.cli.view import write_report_for
    from scaling_search.results.ranking import best_triple
    from scaling_search.results.verdict import best_view

    ot_study = load_optuna_study(study, storage)
    best = best_triple(ot_study)
    _, lines = best_view(
        best, base_resolution_px=study.train.base_resolution_px, num_classes=num_classes
    )
    print("\n".join(lines))
    path = study.out_dir / FAMILY_FILENAME
    _write_family(best.coefficients, study, num_classes, path)
    print(f"family: {path} (formula mode, φ = 1…7, for {best.coefficients.label()})")
    print(f"report: {write_report_for(study, ot_study, None, num_classes)}")


def _check_measured_space(study: StudyConfig, num_classes: int) -> None:
    """Some network in the space costs c × B0 as built (space.cost: measured), or SpaceError."""
    from scaling_search.sampling import MeasuredCoordinates
    from scaling_search.space import grid_candidates

    base_px = study.train.base_resolution_px
    if study.search.sampler == "grid":
        grid_candidates(study.space, base_resolution_px=base_px, num_classes=num_classes)
    else:
        space = study.space
        MeasuredCoordinates(
            space, base_resolution_px=base_px, num_classes=num_classes
        ).alpha_range()


def _write_family(coefficients: Any, study: StudyConfig, num_classes: int, path: Path) -> None:
    from scaling_search.cli import export
    from scaling_search.results.export import dump_family, write_text_atomic
    from scaling_search.results.family import make_family

    family = make_family(
        coefficients,
        mode="formula",
        base_resolution_px=study.train.base_resolution_px,
        num_classes=num_classes,
        recipe=export.study_recipe(study),
    )
    write_text_atomic(path, dump_family(family, "json"))
