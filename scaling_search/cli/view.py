"""``scaling-search dashboard``, ``report``, ``space`` and ``model``: seeing a study, its
candidates and a network."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scaling_search import limits
from scaling_search.cli._common import emit, existing_study
from scaling_search.config import StudyConfig, StudyError, load_study

if TYPE_CHECKING:
    import optuna


REPORT_FILENAME = "report.html"


def dashboard(args: argparse.Namespace) -> int:
    import optuna_dashboard

    from scaling_search.study.storage import ENV_VAR, mask_url, open_storage, resolve_url

    if args.study is not None and args.storage is not None:
        raise StudyError("dashboard takes a study file or --storage URL, not both")
    # Checked before the storage is opened (which may create a SQLite file).
    limits.check_range("--port", args.port, 1, limits.MAX_PORT)
    for flag, value in (("--host", args.host), ("--storage", args.storage)):
        if value is not None and not value.strip():  # never silently the default
            raise StudyError(f"{flag} is empty; give a value or leave the option out")
    if args.study is not None:
        study, _ = existing_study(args)
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

    study, ot_study = existing_study(args)
    path = write_report_for(study, ot_study, args.out)
    print(f"report: {path}")
    return 0


def write_report_for(
    study: StudyConfig, ot_study: optuna.Study, out: Path | None, num_classes: int | None = None
) -> Path:
    """Write the study's report to ``out`` (default ``<output_dir>/report.html``)."""
    from scaling_search.cli.export import study_classes
    from scaling_search.report.publish import write_report

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
    from scaling_search.cli.export import study_classes

    study = load_study(args.study, args.overrides)
    if study.search.sampler != "grid":
        raise StudyError(
            f"space lists grid candidates; sampler {study.search.sampler!r} samples "
            "the continuous surface α·β²·γ² = product instead"
        )
    data = space_data(study, study_classes(study))
    emit(data, args.format, _space_table(data, study))
    return 0


def space_data(study: StudyConfig, num_classes: int) -> dict[str, Any]:
    """The grid's candidates (costs, network key, network number) and its networks (key,
    representative, members), as ``space --format json`` writes them."""
    from scaling_search.sampling import study_network_key
    from scaling_search.space import describe, representative
    from scaling_search.study.ledger import grid_classes

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


def model(args: argparse.Namespace) -> int:
    """`scaling-search model`: exact params, MACs and stage shapes of a scaled B0."""
    from scaling_search.network import architecture, count_macs, count_params

    top = limits.MAX_MULTIPLIER
    limits.check_range("--width", args.width, 0, top, low_open=True, note="B7's is 2.0")
    limits.check_range("--depth", args.depth, 0, top, low_open=True, note="B7's is 3.1")
    limits.check_range("--resolution", args.resolution, 1, limits.MAX_RESOLUTION_PX)
    limits.check_range("--num-classes", args.num_classes, 1, limits.MAX_CLASSES)
    arch = architecture(width=args.width, depth=args.depth, num_classes=args.num_classes)
    params, macs = count_params(arch), count_macs(arch, resolution_px=args.resolution)
    data = {
        "width": args.width,
        "depth": args.depth,
        "resolution_px": args.resolution,
        "num_classes": args.num_classes,
        "params": params,
        "macs": macs,
        **arch.to_dict(),
    }
    table = [
        f"params {params:,}  macs {macs:,} ({macs / 1e9:.3f} G) at {args.resolution} px",
        f"stem {arch.stem_channels}  head {arch.head_channels}",
        "stage  expand kernel stride  in  out  repeats",
    ]
    table += [
        f"{i:5d} {s.expand_ratio:6d} {s.kernel:6d} {s.stride:6d} {s.in_channels:4d} "
        f"{s.out_channels:4d} {s.repeats:8d}"
        for i, s in enumerate(arch.stages, 1)
    ]
    emit(data, args.format, table)
    return 0


def status(args: argparse.Namespace) -> int:
    """``scaling-search status``: the study's trials by state, duplicates and the best so far."""
    from scaling_search.results.ranking import ResultsError, best_triple
    from scaling_search.study.storage import mask_url, resolve_url

    study, ot_study = existing_study(args)
    try:
        best = best_triple(ot_study)
    except ResultsError:
        best = None
    data = {"study": study.name, "storage": mask_url(resolve_url(study)), **_counts(ot_study)}
    data["best"] = None
    if best is not None:  # as `best --format json` writes it
        from scaling_search.cli.export import study_classes
        from scaling_search.results.verdict import best_view

        data["best"], _ = best_view(
            best,
            base_resolution_px=study.train.base_resolution_px,
            num_classes=study_classes(study, ot_study),
        )
    emit(data, args.format, _status_lines(data, best))
    return 0


def _counts(ot_study: Any) -> dict[str, Any]:
    """The study's trials: all, those that trained by state, shared results, trials given back
    by a stopped run, and queue duplicates."""
    from scaling_search.results.ranking import trials_frame
    from scaling_search.study.ledger import duplicates
    from scaling_search.study.record import TrialRecord

    frame = trials_frame(ot_study)
    trained = frame[~frame["shared"].astype(bool)]
    ended = frame["state"].isin(["COMPLETE", "PRUNED"])
    trials = ot_study.get_trials(deepcopy=False)
    return {
        "trials": len(frame),
        "states": {str(k): int(v) for k, v in trained["state"].value_counts().items()},
        "shared": int((frame["shared"].astype(bool) & ended).sum()),
        "given_back": sum(TrialRecord.of(t).given_back for t in trials),
        "duplicates": duplicates(trials),
    }


def _status_lines(data: dict[str, Any], best: Any) -> list[str]:
    """``status``'s text: the counts of :func:`_counts` and the best so far, in words."""
    from scaling_search.results.verdict import format_accuracy

    shared, given_back, twice = data["shared"], data["given_back"], data["duplicates"]
    lines = [
        f"study {data['study']}  storage {data['storage']}",
        f"trials {data['trials']}: "
        + ", ".join(f"{k.lower()} {v}" for k, v in data["states"].items())
        + (f", shared {shared} (triples whose network was trained: no training)" if shared else "")
        + (
            f"; of the failed, {given_back} given back by a stopped run (trained again next run)"
            if given_back
            else ""
        ),
    ]
    if twice["skipped_duplicates"] or twice["trained_twice"]:
        lines.append(
            f"duplicates: {twice['skipped_duplicates']} queued twice by concurrent drivers and "
            f"skipped (FAIL, duplicate_of), {twice['trained_twice']} point(s) trained twice"
        )
    if best is not None:
        accuracy = format_accuracy(best.mean_accuracy, best.std_accuracy, best.n_seeds)
        lines.append(
            f"best so far {best.coefficients.label()} {best.chosen_on} accuracy {accuracy}"
        )
    return lines


def best(args: argparse.Namespace) -> int:
    """``scaling-search best``: the winner, as the end of ``run`` says it."""
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
