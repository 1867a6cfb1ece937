"""The ``scaling-search`` command: run, status, best, export, space, model, dashboard, report,
clean.

Every error a user can cause is one line on stderr and exit code 2 (``--debug`` shows the
traceback); the study's database failing (away past a run's patience, or refusing a write) is
one line and exit code 1. Heavy modules (torch, ray, optuna) are imported by the subcommands that
need them.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from scaling_search import limits
from scaling_search._redact import redact
from scaling_search.cli._common import emit, existing_study, load_optuna_study
from scaling_search.config import StudyConfig, StudyError, load_study
from scaling_search.driver.interrupt import (
    INTERRUPTED_LINE,
    Interrupted,
    StopRequest,
    handle_signals,
)
from scaling_search.study.outage import PATIENCE_S, DatabaseAway, failure_line

if TYPE_CHECKING:
    pass

__all__ = ["main"]

USAGE_ERROR = 2
DATABASE_FAILED = 1
MAX_PATIENCE_S = 86_400.0
FAMILY_FILENAME = "family.json"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message}\n")


def _study_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", type=Path, help="study file (YAML), e.g. studies/quickstart.yaml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a study key, e.g. train.epochs=5",
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="scaling-search", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run or continue a study")
    _study_args(run)
    run.add_argument("--address", help="join a running Ray cluster (auto or HOST:PORT)")
    run.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep each trial's last checkpoint and Ray Tune's files under <output_dir>/ray",
    )
    run.add_argument(
        "--database-patience",
        type=float,
        default=PATIENCE_S,
        metavar="SECONDS",
        help="how long the run waits for the study's database to answer again before it "
        f"stops (default {PATIENCE_S:.0f})",
    )

    for name, text in (
        ("status", "trial counts and best so far"),
        ("best", "the winning network, its class of triples, its ties"),
        ("space", "the candidates with nominal and measured FLOPs ratios"),
    ):
        command = sub.add_parser(name, help=text)
        _study_args(command)
        command.add_argument("--format", choices=("table", "json"), default="table")

    export = sub.add_parser(
        "export", help="write the B1…B7 family for a study's winner (or given α,β,γ)"
    )
    export.add_argument("study", type=Path, nargs="?", help="study file")
    export.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    export.add_argument(
        "--coefficients",
        metavar="A,B,G",
        help="α,β,γ instead of the study's best (with a study: its resolution, classes, recipe)",
    )
    export.add_argument("--mode", choices=("formula", "flops-matched"), default="formula")
    export.add_argument("--phi", metavar="LIST", help="φ values, e.g. 1,2,3 (default 1..7)")
    budget = export.add_mutually_exclusive_group()
    budget.add_argument(
        "--target-macs", metavar="N", help="one member at the φ closest to N MACs, e.g. 3.0G"
    )
    budget.add_argument(
        "--target-params", metavar="N", help="one member at the φ closest to N params, e.g. 20M"
    )
    export.add_argument(
        "--base-resolution",
        type=int,
        metavar="PX",
        help="B0's resolution (default: the study's, else 224)",
    )
    export.add_argument("--num-classes", type=int, help="classes (default: the study's, else 1000)")
    export.add_argument("--format", choices=("json", "yaml", "python", "onnx"), default="json")
    export.add_argument("--member", metavar="NAME", help="with --format onnx: the member, e.g. b3")
    export.add_argument("--out", type=Path, help="file to write (default: stdout)")

    model = sub.add_parser("model", help="params, MACs and shapes of a scaled B0")
    model.add_argument("--width", type=float, required=True)
    model.add_argument("--depth", type=float, required=True)
    model.add_argument("--resolution", type=int, required=True, metavar="PX")
    model.add_argument("--num-classes", type=int, default=1000)
    model.add_argument("--format", choices=("table", "json"), default="table")

    dashboard = sub.add_parser(
        "dashboard", help="open optuna-dashboard on a study's storage (or on --storage URL)"
    )
    dashboard.add_argument("study", type=Path, nargs="?", help="study file (omit with --storage)")
    dashboard.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE"
    )
    dashboard.add_argument(
        "--storage",
        metavar="URL",
        help="serve every study at this URL (default without a study: $SCALING_SEARCH_STORAGE)",
    )
    dashboard.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    dashboard.add_argument("--port", type=int, default=8080)

    report = sub.add_parser(
        "report", help="write the study's plotly report (one offline HTML file)"
    )
    _study_args(report)
    report.add_argument("--out", type=Path, help="HTML file (default: <output_dir>/report.html)")

    clean = sub.add_parser(
        "clean", help="remove the checkpoints and Ray Tune files that stopped runs left"
    )
    _study_args(clean)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``scaling-search``; returns the exit code."""
    args = _build_parser().parse_args(argv)
    handlers = {
        "run": _run,
        "status": _status,
        "best": _best,
        "export": _export,
        "space": _space,
        "model": _model,
        "dashboard": _dashboard,
        "report": _report,
        "clean": _clean,
    }
    try:
        return handlers[args.command](args)
    except (Interrupted, SystemError) as exc:
        interrupted = Interrupted.behind(exc)
        if interrupted is None:
            raise
        if interrupted.summary is not None:
            print(_summary_line(interrupted.summary, "before it was stopped"))
        print(f"scaling-search: {INTERRUPTED_LINE}", file=sys.stderr)
        return interrupted.exit_code
    except BrokenPipeError:
        # The reader went away (`scaling-search best … | head`): not an error of ours. Point
        # stdout at /dev/null so that the interpreter's last flush cannot raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a command killed by it
    except (ValueError, OSError, KeyError) as exc:
        if args.debug:
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        # Every message that names a storage URL masks it already; this catches any other.
        print(f"scaling-search: error: {' '.join(redact(str(message)).split())}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print(f"scaling-search: {INTERRUPTED_LINE}", file=sys.stderr)
        return 130
    except DatabaseAway as exc:
        print(f"scaling-search: error: {exc}", file=sys.stderr)
        return DATABASE_FAILED
    except Exception as exc:
        line = None if args.debug else failure_line(exc)
        if line is None:
            raise
        print(f"scaling-search: error: {line}", file=sys.stderr)
        return DATABASE_FAILED


def _export(args: argparse.Namespace) -> int:
    from scaling_search.cli import export as _cli_export

    return _cli_export.export(args)


# --- run -----------------------------------------------------------------------------------------


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


def _run(args: argparse.Namespace) -> int:
    with handle_signals() as stop:
        return _run_study(args, stop)


def _summary_line(summary: Any, when: str = "") -> str:
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
        from scaling_search.data.sources import load_data
        from scaling_search.sampling import ObjectiveNetworkKey, SimplexCoordinates
        from scaling_search.space import grid_candidates
        from scaling_search.study.storage import mask_url, open_storage, resolve_url

        study = load_study(args.study, args.overrides)
        if not 1 <= args.database_patience <= MAX_PATIENCE_S:  # also NaN
            raise StudyError(
                f"--database-patience must be 1 to {MAX_PATIENCE_S:.0f} seconds, got "
                f"{args.database_patience}"
            )
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
        data = load_data(study.data)
        if study.space.cost == "measured":  # counts MACs with the data's classes
            _check_measured_space(study, data.num_classes)
        from scaling_search.driver import check_address, run_study

        check_address(args.address)  # a cluster that does not answer: before anything is written
        url = resolve_url(study)
        storage = open_storage(url)  # everything above is checked before anything is written

    print(f"storage: {mask_url(url)}  (browse: scaling-search dashboard {args.study})")
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
    print(_summary_line(summary))
    from scaling_search.cli.view import write_report_for
    from scaling_search.results.ranking import best_triple
    from scaling_search.results.verdict import best_view

    ot_study = load_optuna_study(study, storage)
    best = best_triple(ot_study)
    _, lines = best_view(
        best, base_resolution_px=study.train.base_resolution_px, num_classes=data.num_classes
    )
    print("\n".join(lines))
    path = study.out_dir / FAMILY_FILENAME
    _write_family(best.coefficients, study, data.num_classes, path)
    print(f"family: {path} (formula mode, φ = 1…7, for {best.coefficients.label()})")
    print(f"report: {write_report_for(study, ot_study, None, data.num_classes)}")
    return 0


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
    from scaling_search.cli import export as _cli_export
    from scaling_search.results.export import dump_family, write_text_atomic
    from scaling_search.results.family import make_family

    family = make_family(
        coefficients,
        mode="formula",
        base_resolution_px=study.train.base_resolution_px,
        num_classes=num_classes,
        recipe=_cli_export.study_recipe(study),
    )
    write_text_atomic(path, dump_family(family, "json"))


# --- reading a study back ------------------------------------------------------------------------


def _status(args: argparse.Namespace) -> int:
    from scaling_search.results.ranking import ResultsError, best_triple, trials_frame
    from scaling_search.results.verdict import format_accuracy
    from scaling_search.study.ledger import GIVEN_BACK_ATTR, duplicates
    from scaling_search.study.storage import mask_url, resolve_url

    study, ot_study = existing_study(args)
    frame = trials_frame(ot_study)
    trained = frame[~frame["shared"].astype(bool)]
    counts = {str(k): int(v) for k, v in trained["state"].value_counts().items()}
    ended = frame["state"].isin(["COMPLETE", "PRUNED"])
    shared = int((frame["shared"].astype(bool) & ended).sum())
    try:
        best = best_triple(ot_study)
    except ResultsError:
        best = None
    twice = duplicates(ot_study.get_trials(deepcopy=False))
    given_back = sum(
        1 for t in ot_study.get_trials(deepcopy=False) if t.user_attrs.get(GIVEN_BACK_ATTR)
    )
    best_data = None
    if best is not None:  # as `best --format json` writes it
        from scaling_search.cli.export import study_classes
        from scaling_search.results.verdict import best_view

        best_data, _ = best_view(
            best,
            base_resolution_px=study.train.base_resolution_px,
            num_classes=study_classes(study, ot_study),
        )
    data = {
        "study": study.name,
        "storage": mask_url(resolve_url(study)),
        "trials": len(frame),
        "states": counts,
        "shared": shared,
        "given_back": given_back,
        "duplicates": twice,
        "best": best_data,
    }
    table = [
        f"study {study.name}  storage {data['storage']}",
        f"trials {len(frame)}: "
        + ", ".join(f"{k.lower()} {v}" for k, v in counts.items())
        + (f", shared {shared} (triples whose network was trained: no training)" if shared else "")
        + (
            f"; of the failed, {given_back} given back by a stopped run (trained again next run)"
            if given_back
            else ""
        ),
    ]
    if twice["skipped_duplicates"] or twice["trained_twice"]:
        table.append(
            f"duplicates: {twice['skipped_duplicates']} queued twice by concurrent drivers and "
            f"skipped (FAIL, duplicate_of), {twice['trained_twice']} point(s) trained twice"
        )
    if best is not None:
        accuracy = format_accuracy(best.mean_accuracy, best.std_accuracy, best.n_seeds)
        table.append(
            f"best so far {best.coefficients.label()} {best.chosen_on} accuracy {accuracy}"
        )
    emit(data, args.format, table)
    return 0


def _best(args: argparse.Namespace) -> int:
    from scaling_search.cli.export import study_classes
    from scaling_search.results.ranking import best_triple
    from scaling_search.results.verdict import best_view

    study, ot_study = existing_study(args)
    data, lines = best_view(
        best_triple(ot_study),
        base_resolution_px=study.train.base_resolution_px,
        num_classes=study_classes(study, ot_study),
    )
    emit(data, args.format, lines)
    return 0


# --- space, model, dashboard -------------------------------------------------------------


def _space(args: argparse.Namespace) -> int:
    from scaling_search.cli import view as _cli_view

    return _cli_view.space(args)


def _model(args: argparse.Namespace) -> int:
    from scaling_search.cli import view as _cli_view

    return _cli_view.model(args)


def _dashboard(args: argparse.Namespace) -> int:
    from scaling_search.cli import view as _cli_view

    return _cli_view.dashboard(args)


def _report(args: argparse.Namespace) -> int:
    from scaling_search.cli import view as _cli_view

    return _cli_view.report(args)


def _clean(args: argparse.Namespace) -> int:
    from scaling_search.cli import clean as _cli_clean

    return _cli_clean.clean(args)


if __name__ == "__main__":
    raise SystemExit(main())
