"""``scaling-search dashboard``, ``report`` and the tied set of ``best``: seeing a study."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scaling_search.config import StudyConfig, StudyError

if TYPE_CHECKING:
    import optuna

REPORT_FILENAME = "report.html"


def dashboard(args: argparse.Namespace) -> int:
    import optuna_dashboard

    from scaling_search.cli import _existing_study
    from scaling_search.storage import ENV_VAR, mask_url, open_storage, resolve_url

    if args.study is not None and args.storage is not None:
        raise StudyError("dashboard takes a study file or --storage URL, not both")
    if args.study is not None:
        study, _ = _existing_study(args)
        url = resolve_url(study)
    else:
        url = args.storage or os.environ.get(ENV_VAR, "").strip()
        if not url:
            raise StudyError(
                f"dashboard needs a study file, --storage URL or ${ENV_VAR}; none was given"
            )
    storage = open_storage(url)
    print(f"optuna-dashboard on {mask_url(url)} at http://{args.host}:{args.port}/  (Ctrl-C stops)")
    optuna_dashboard.run_server(storage, host=args.host, port=args.port)
    return 0


def report(args: argparse.Namespace) -> int:
    from scaling_search.cli import _existing_study

    study, ot_study = _existing_study(args)
    path = write_report_for(study, ot_study, args.out)
    print(f"report: {path}")
    return 0


def write_report_for(
    study: StudyConfig, ot_study: optuna.Study, out: Path | None, num_classes: int | None = None
) -> Path:
    """Write the study's report to ``out`` (default ``<output_dir>/report.html``)."""
    from scaling_search._cli_export import study_classes
    from scaling_search.report import write_report

    path = out if out is not None else study.out_dir / REPORT_FILENAME
    if path.is_dir():
        raise StudyError(f"--out {str(path)!r} is a folder; give an HTML file name")
    return write_report(
        ot_study,
        path,
        base_resolution_px=study.train.base_resolution_px,
        num_classes=num_classes or study_classes(study),
    )


def tied_lines(best: dict[str, Any]) -> list[str]:
    """The tied set of ``best`` (BestTriple.to_dict()) as table lines."""
    if best["tied"] is None:
        return [
            "tied: not tested (no candidate has 2 or more seeds to estimate the seed noise; "
            "set search.repeats)"
        ]
    head = (
        f"seed noise: std {best['noise_std']:.4f} pooled over repeated candidates "
        f"(df {best['noise_df']}); tied with the winner (two-sided t-test, p >= 0.05): "
        f"{len(best['tied'])}"
    )
    return [head] + [
        f"  alpha {t['alpha']:g}  beta {t['beta']:g}  gamma {t['gamma']:g}  accuracy "
        f"{t['mean_accuracy']:.4f}  seeds {t['n_seeds']}  p {t['p_value']:.3f}"
        for t in best["tied"]
    ]
