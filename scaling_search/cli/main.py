"""The ``scaling-search`` command: run, prepare, status, best, export, space, model, dashboard,
report, clean.

Every error a user can cause is one line on stderr and exit code 2 (``--debug`` shows the
traceback); the study's database failing (away past a run's patience, or refusing a write) is
one line and exit code 1. Heavy modules (torch, ray, optuna) are imported by the subcommands that
need them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from scaling_search._redact import redact
from scaling_search.cli import clean, export, prepare, run, view
from scaling_search.driver.interrupt import INTERRUPTED_LINE, Interrupted
from scaling_search.study.outage import PATIENCE_S, DatabaseAway, failure_line

__all__ = ["main"]

USAGE_ERROR = 2
DATABASE_FAILED = 1


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
    _run_args(sub.add_parser("run", help="run or continue a study"))
    _prepare_args(
        sub.add_parser("prepare", help="decode a study's data files once into its data cache")
    )
    for name, text in (
        ("status", "trial counts and best so far"),
        ("best", "the winning network, its class of triples, its ties"),
        ("space", "the candidates with nominal and measured FLOPs ratios"),
    ):
        command = sub.add_parser(name, help=text)
        _study_args(command)
        command.add_argument("--format", choices=("table", "json"), default="table")
    _export_args(
        sub.add_parser(
            "export", help="write the B1…B7 family for a study's winner (or given α,β,γ)"
        )
    )
    _model_args(sub.add_parser("model", help="params, MACs and shapes of a scaled B0"))
    _dashboard_args(
        sub.add_parser(
            "dashboard", help="open optuna-dashboard on a study's storage (or on --storage URL)"
        )
    )
    report = sub.add_parser(
        "report", help="write the study's plotly report (one offline HTML file)"
    )
    _study_args(report)
    report.add_argument("--out", type=Path, help="HTML file (default: <output_dir>/report.html)")
    clean_parser = sub.add_parser(
        "clean", help="remove the checkpoints and Ray Tune files that stopped runs left"
    )
    _study_args(clean_parser)
    return parser


def _run_args(run_parser: argparse.ArgumentParser) -> None:
    _study_args(run_parser)
    run_parser.add_argument("--address", help="join a running Ray cluster (auto or HOST:PORT)")
    run_parser.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep each trial's last checkpoint and Ray Tune's files under <output_dir>/ray",
    )
    run_parser.add_argument(
        "--database-patience",
        type=float,
        default=PATIENCE_S,
        metavar="SECONDS",
        help="how long the run waits for the study's database to answer again before it "
        f"stops (default {PATIENCE_S:.0f})",
    )


def _positive(text: str) -> int:
    """An argument that must be a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _prepare_args(prepare_parser: argparse.ArgumentParser) -> None:
    _study_args(prepare_parser)
    prepare_parser.add_argument(
        "--verify",
        action="store_true",
        help="hash every source file again, not only those whose size or mtime changed",
    )
    prepare_parser.add_argument(
        "--workers", type=_positive, metavar="N", help="decoding processes (default: the CPUs)"
    )


def _export_args(export_parser: argparse.ArgumentParser) -> None:
    export_parser.add_argument("study", type=Path, nargs="?", help="study file")
    export_parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE"
    )
    export_parser.add_argument(
        "--coefficients",
        metavar="A,B,G",
        help="α,β,γ instead of the study's best (with a study: its resolution, classes, recipe)",
    )
    export_parser.add_argument("--mode", choices=("formula", "flops-matched"), default="formula")
    export_parser.add_argument("--phi", metavar="LIST", help="φ values, e.g. 1,2,3 (default 1..7)")
    budget = export_parser.add_mutually_exclusive_group()
    budget.add_argument(
        "--target-macs", metavar="N", help="one member at the φ closest to N MACs, e.g. 3.0G"
    )
    budget.add_argument(
        "--target-params", metavar="N", help="one member at the φ closest to N params, e.g. 20M"
    )
    export_parser.add_argument(
        "--base-resolution",
        type=int,
        metavar="PX",
        help="B0's resolution (default: the study's, else 224)",
    )
    export_parser.add_argument(
        "--num-classes", type=int, help="classes (default: the study's, else 1000)"
    )
    export_parser.add_argument(
        "--format", choices=("json", "yaml", "python", "onnx"), default="json"
    )
    export_parser.add_argument(
        "--member", metavar="NAME", help="with --format onnx: the member, e.g. b3"
    )
    export_parser.add_argument("--out", type=Path, help="file to write (default: stdout)")


def _model_args(model: argparse.ArgumentParser) -> None:
    model.add_argument("--width", type=float, required=True)
    model.add_argument("--depth", type=float, required=True)
    model.add_argument("--resolution", type=int, required=True, metavar="PX")
    model.add_argument("--num-classes", type=int, default=1000)
    model.add_argument("--format", choices=("table", "json"), default="table")


def _dashboard_args(dashboard: argparse.ArgumentParser) -> None:
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``scaling-search``; returns the exit code."""
    args = _build_parser().parse_args(argv)
    try:
        return _handlers()[args.command](args)
    except (Interrupted, SystemError) as exc:
        interrupted = Interrupted.behind(exc)
        if interrupted is None:
            raise
        return _stopped(interrupted)
    except BrokenPipeError:
        return _reader_gone()
    except (ValueError, OSError, KeyError) as exc:
        if args.debug:
            raise
        return _usage_error(exc)
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


def _handlers() -> dict[str, Callable[[argparse.Namespace], int]]:
    """The function of each subcommand."""
    return {
        "run": run.run,
        "prepare": prepare.prepare,
        "status": view.status,
        "best": view.best,
        "export": export.export,
        "space": view.space,
        "model": view.model,
        "dashboard": view.dashboard,
        "report": view.report,
        "clean": clean.clean,
    }


def _stopped(interrupted: Interrupted) -> int:
    """A signal stopped the command: what the run did before, one line, and the exit code."""
    if interrupted.summary is not None:
        print(run.summary_line(interrupted.summary, "before it was stopped"))
    print(f"scaling-search: {INTERRUPTED_LINE}", file=sys.stderr)
    return interrupted.exit_code


def _reader_gone() -> int:
    """Stdout's reader closed the pipe: exit as a shell reports a command killed by SIGPIPE."""
    # The reader went away (`scaling-search best … | head`): not an error of ours. Point
    # stdout at /dev/null so that the interpreter's last flush cannot raise again.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 141  # 128 + SIGPIPE, as a shell reports a command killed by it


def _usage_error(exc: ValueError | OSError | KeyError) -> int:
    """One line on stderr, the exit code of an error the user can fix."""
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    # Every message that names a storage URL masks it already; this catches any other.
    print(f"scaling-search: error: {' '.join(redact(str(message)).split())}", file=sys.stderr)
    return USAGE_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
