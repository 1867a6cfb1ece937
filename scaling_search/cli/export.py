"""`scaling-search export`: a family for a study's winner or for given coefficients, at
chosen φ values or at the φ that meets a MACs or parameter budget; as a document (JSON, YAML,
Python) or, for one member, as an ONNX file."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from scaling_search import limits
from scaling_search.config import StudyConfig, StudyError

if TYPE_CHECKING:
    import optuna

    from scaling_search.results.family import Family, FamilyMember, Recipe
    from scaling_search.space import Coefficients

__all__ = ["export", "study_classes", "study_recipe"]


def export(args: argparse.Namespace) -> int:
    """`scaling-search export`: the family of a study's winner (its class's representative) or of
    given coefficients (with a study too: at the study's resolution, classes and recipe)."""
    from scaling_search.results.export import dump_family, write_text_atomic
    from scaling_search.results.family import make_family

    _check_args(args)
    coefficients, base_px, classes, recipe = _subject(args)
    phis, budget = _phis_and_budget(args, coefficients, base_px, classes)
    family = make_family(
        coefficients,
        mode=args.mode,
        phis=phis,
        base_resolution_px=base_px,
        num_classes=classes,
        recipe=recipe,
    )
    # The ONNX member is chosen before anything is printed, so that a wrong --member is one line.
    chosen = _chosen_member(family, args.member) if args.format == "onnx" else None
    if budget is not None:
        _say_budget(budget, family.members[0])
    if chosen is not None:
        return _write_onnx(chosen, args.out)
    text = dump_family(family, args.format)
    if args.out is None:
        sys.stdout.write(text)
    else:
        write_text_atomic(args.out, text)
        print(f"wrote {args.out} ({len(family.members)} members, {args.mode})")
    return 0


def _check_args(args: argparse.Namespace) -> None:
    """What the arguments alone can tell is wrong, before any study is opened."""
    if args.study is None and args.coefficients is None:
        raise StudyError("export needs a study file, --coefficients A,B,G, or both")
    _check_onnx_args(args)
    for flag, value, low, high in (
        ("--base-resolution", args.base_resolution, 1, limits.MAX_RESOLUTION_PX),
        ("--num-classes", args.num_classes, 2, limits.MAX_CLASSES),
    ):
        if value is not None:  # 0 is a value, not "the default"
            limits.check_range(flag, value, low, high)


def _subject(args: argparse.Namespace) -> tuple[Coefficients, int, int, Recipe | None]:
    """The triple to scale, B0's resolution, the classes, and the study's recipe (None without
    a study)."""
    from scaling_search.space import Coefficients

    base_px, classes = args.base_resolution or 224, args.num_classes or 1000
    recipe = None
    if args.coefficients is not None:
        coefficients = Coefficients(*_coefficients(args.coefficients))
    if args.study is not None:
        # With --coefficients too: that triple (another member of the winning class, say) with
        # the study's resolution, classes and training recipe.
        from scaling_search.cli._common import existing_study
        from scaling_search.results.ranking import best_triple

        study, ot_study = existing_study(args)
        if args.coefficients is None:
            coefficients = best_triple(ot_study).coefficients  # the winning class's representative
        base_px = args.base_resolution or study.train.base_resolution_px
        classes = args.num_classes or study_classes(study, ot_study)
        recipe = study_recipe(study)
    return coefficients, base_px, classes, recipe


def _phis_and_budget(
    args: argparse.Namespace, coefficients: Coefficients, base_px: int, classes: int
) -> tuple[list[float] | None, tuple[str, float] | None]:
    """The φ values (None: the default 1..7), and the budget (kind, count) that chose the one φ
    when --target-macs or --target-params gives one."""
    from scaling_search.results.family import phi_for_budget

    phis = None if args.phi is None else _phis(args.phi)
    budget = _budget(args)
    if budget is not None:
        if phis is not None or args.mode != "formula":
            raise StudyError("--target-macs/--target-params choose φ: drop --phi and --mode")
        kind, target = budget
        phis = [
            phi_for_budget(
                coefficients,
                target=target,
                kind=kind,
                base_resolution_px=base_px,
                num_classes=classes,
            )
        ]
    return phis, budget


def _say_budget(budget: tuple[str, float], member: FamilyMember) -> None:
    """On stderr: the φ that the budget chose, and what its member costs."""
    print(
        f"target {budget[1]:,.0f} {budget[0]}: phi={member.phi:g} gives "
        f"{member.macs:,} MACs, {member.params:,} params at {member.resolution_px} px",
        file=sys.stderr,
    )


def _check_onnx_args(args: argparse.Namespace) -> None:
    """--format onnx needs --out and the onnx extra; --member belongs to --format onnx only."""
    if args.format != "onnx":
        if args.member is not None:
            raise StudyError(
                f"--member picks the one model of --format onnx; with --format {args.format} "
                "choose members with --phi"
            )
        return
    if args.out is None:
        raise StudyError("--format onnx writes a binary file: give --out PATH, e.g. --out b3.onnx")
    from scaling_search.network.onnx import require_onnx

    try:
        require_onnx()
    except ImportError as exc:
        raise StudyError(str(exc)) from None


def _chosen_member(family: Family, name: str | None) -> FamilyMember:
    names = [member.name for member in family.members]
    if name is None and len(names) == 1:
        return _buildable(family.members[0])
    if name is None:
        raise StudyError(
            f"--format onnx writes one model: name it with --member ({', '.join(names)})"
        )
    if name not in names:
        raise StudyError(
            f"--member {name!r} is not in this family ({', '.join(names)}); "
            "--phi chooses the members, e.g. --phi 3 for b3"
        )
    return _buildable(family.members[names.index(name)])


def _buildable(member: FamilyMember) -> FamilyMember:
    if member.params > limits.MAX_ONNX_PARAMS:  # building it would allocate every weight
        raise StudyError(
            f"--member {member.name} has {member.params:,} params; --format onnx builds at most "
            f"{limits.MAX_ONNX_PARAMS:,} (4 GB of float32 weights; B7 has 66 M)"
        )
    return member


def _write_onnx(member: FamilyMember, out: Path) -> int:
    """Export `member`, freshly initialised with ONNX_SEED, to `out`."""
    from scaling_search.network.onnx import ONNX_SEED, export_onnx
    from scaling_search.results.export import member_to_dict
    from scaling_search.results.rebuild import build_model

    model = build_model(member, seed=ONNX_SEED)
    metadata = {
        "scaling_search.member": json.dumps(member_to_dict(member)),
        "scaling_search.weights": f"fresh initialisation, seed {ONNX_SEED}",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(model, out, resolution_px=member.resolution_px, metadata=metadata)
    px = member.resolution_px
    print(
        f"wrote {out} ({member.name}: {member.params:,} params, {member.macs:,} MACs; "
        f"image [N, 3, {px}, {px}] -> logits [N, {member.num_classes}]; "
        f"untrained weights, seed {ONNX_SEED})"
    )
    return 0


_SUFFIXES = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def _budget(args: argparse.Namespace) -> tuple[str, float] | None:
    """("macs" | "params", count) from --target-macs / --target-params, e.g. 3.0G, 20M, 5e8."""
    for kind, text, option in (
        ("macs", args.target_macs, "--target-macs"),
        ("params", args.target_params, "--target-params"),
    ):
        if text is None:
            continue
        number, suffix = text.strip(), ""
        if number[-1:].upper() in _SUFFIXES.keys() - {""}:
            number, suffix = number[:-1], number[-1].upper()
        try:
            value = float(number) * _SUFFIXES[suffix]
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value <= 0:
            raise StudyError(
                f"{option} {text!r}: expected a positive count, e.g. 3.0G, 20M, 500K or 5e8"
            )
        return kind, value
    return None


def _coefficients(text: str) -> list[float]:
    values = _floats(text, "--coefficients", count=3)
    for name, value in zip(("alpha", "beta", "gamma"), values, strict=True):
        limits.check_range(f"--coefficients {name}", value, 1, limits.MAX_COEFFICIENT)
    return values


def _phis(text: str) -> list[float]:
    values = _floats(text, "--phi")
    if len(values) > limits.MAX_PHIS:
        raise StudyError(f"--phi gives {len(values)} values; at most {limits.MAX_PHIS} members")
    for value in values:
        limits.check_range("--phi", value, 0, limits.MAX_PHI, note="B7's is 7")
    return values


def _floats(text: str, option: str, count: int | None = None) -> list[float]:
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise StudyError(f"{option} {text!r}: expected comma-separated numbers") from None
    if count is not None and len(values) != count:
        raise StudyError(f"{option} {text!r}: expected {count} numbers, got {len(values)}")
    return values


def study_classes(study: StudyConfig, ot_study: optuna.Study | None = None) -> int:
    """The study's number of classes: as the driver recorded it with ``ot_study``, else from
    the study file (an image folder's from its class folders; no image is decoded)."""
    from scaling_search.data.prepared import source_classes
    from scaling_search.study.record import StudyRecord

    recorded = None if ot_study is None else StudyRecord.of(ot_study).num_classes
    return recorded if recorded is not None else source_classes(study.data)


def study_recipe(study: StudyConfig) -> Recipe:
    """The training settings a study's triple was chosen with, for its family's members."""
    from scaling_search.results.family import Recipe

    train = study.train
    return Recipe(
        dropout=train.dropout,
        stochastic_depth=train.stochastic_depth,
        bn_momentum=train.bn_momentum,
    )
