"""``scaling-search dashboard``, ``report`` and ``space``: seeing a study and its candidates."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scaling_search.config import StudyConfig, StudyError, load_study

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
        num_classes=num_classes or study_classes(study, ot_study),
    )


def space(args: argparse.Namespace) -> int:
    """`scaling-search space`: the grid's candidates by the network each builds."""
    from scaling_search._cli_export import study_classes
    from scaling_search.cli import _emit

    study = load_study(args.study, args.overrides)
    if study.search.sampler != "grid":
        raise StudyError(
            f"space lists grid candidates; sampler {study.search.sampler!r} samples "
            "the continuous surface α·β²·γ² = product instead"
        )
    data = space_data(study, study_classes(study))
    _emit(data, args.format, _space_table(data, study))
    return 0


def space_data(study: StudyConfig, num_classes: int) -> dict[str, Any]:
    """The grid's candidates (costs, network key, network number) and its networks (key,
    representative, members), as ``space --format json`` writes them."""
    from scaling_search.ledger import grid_classes
    from scaling_search.sampling import study_network_key
    from scaling_search.space import describe, representative

    key = study_network_key(study, num_classes)
    classes = grid_classes(study, num_classes=num_classes, network_key=key)
    networks, candidates = [], []
    for number, (network, members) in enumerate(classes.items(), start=1):
        chosen = representative(members, study.space.product)
        networks.append(
            {"network": number, "network_key": network, "representative": list(chosen.as_tuple()),
             "members": [list(m.as_tuple()) for m in members]}
        )  # fmt: skip
        for member in members:
            cost = describe(
                member, base_resolution_px=study.train.base_resolution_px, num_classes=num_classes
            )
            candidates.append(
                {**cost.to_dict(), "network_key": network, "network": number,
                 "trained": member == chosen}
            )  # fmt: skip
    return {
        "study": study.name,
        "cost": study.space.cost,
        "n_candidates": len(candidates),
        "n_networks": len(networks),
        "candidates": candidates,
        "networks": networks,
    }


def _space_table(data: dict[str, Any], study: StudyConfig) -> list[str]:
    table = [
        f"{'alpha':>6} {'beta':>6} {'gamma':>6} {'nominal':>8} {'measured':>9} "
        f"{'params':>11} {'px':>5} {'network':>8}"
    ]
    table += [
        f"{c['alpha']:6.3f} {c['beta']:6.3f} {c['gamma']:6.3f} {c['flops_ratio_nominal']:8.4f} "
        f"{c['flops_ratio_measured']:9.4f} {c['params']:11,d} {c['resolution_px']:5d} "
        f"{c['network']:>7d}{'*' if c['trained'] else ' '}"
        for c in data["candidates"]
    ]
    cost = "measured MACs ratio" if study.space.cost == "measured" else "α·β²·γ²"
    return [
        *table,
        f"{data['n_candidates']} candidates, {data['n_networks']} distinct networks (cost: {cost} "
        f"within {study.space.tolerance:g} of {study.space.product:g})",
        "* the triple trained for each network; the other triples of its class share its result",
    ]
