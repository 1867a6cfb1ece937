"""A family as a document other projects build from: versioned JSON, YAML or a Python module of
plain literals (schema_version 2; version 1 documents, which had no stochastic_depth and
bn_momentum, still read, with the values build_model then used).

``family_to_dict`` / ``family_from_dict`` are exact inverses; ``dump_family`` renders a document.
"""

from __future__ import annotations

import json
import os
import pprint
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, fields
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar, cast

import yaml

from scaling_search.network import StageShape
from scaling_search.results.family import _DECIMALS, FAMILY_MODES, Family, FamilyMember

__all__ = [
    "DUMP_FORMATS",
    "SCHEMA_VERSION",
    "dump_family",
    "family_from_dict",
    "family_schema",
    "family_to_dict",
    "member_from_dict",
    "member_to_dict",
    "write_text_atomic",
]

SCHEMA_VERSION = 2
_READS = (1, 2)  # schema versions family_from_dict reads
DUMP_FORMATS = ("json", "yaml", "python")
_KIND = "efficientnet-family"
_MEMBER_FLOATS = ("phi", "width", "depth", "dropout", "stochastic_depth", "bn_momentum")
# Version 1 members state no training recipe; build_model then used these.
_V1_DEFAULTS = {"stochastic_depth": 0.2, "bn_momentum": 0.01}
_MEMBER_INTS = (
    "resolution_px",
    "num_classes",
    "params",
    "macs",
    "stem_channels",
    "head_channels",
)
_T = TypeVar("_T")


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` so a reader sees the old file or the new one, never half of one.

    The text goes to a uniquely named file beside ``path`` that is then renamed over it: two
    processes writing the same path at once (two drivers on one study) each replace it whole,
    and the later one wins.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(name, 0o644)
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return path


def family_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the family document, shipped in the package as
    ``scaling_search/family.schema.json`` for other projects to validate against."""
    text = resources.files("scaling_search").joinpath("family.schema.json").read_text("utf-8")
    return cast(dict[str, Any], json.loads(text))


def member_to_dict(member: FamilyMember) -> dict[str, object]:
    """One member as its entry in the family document (the inverse of `member_from_dict`)."""
    document = {field.name: getattr(member, field.name) for field in fields(FamilyMember)}
    document.update({name: round(getattr(member, name), _DECIMALS) for name in _MEMBER_FLOATS})
    document["stages"] = [asdict(stage) for stage in member.stages]
    return document


def family_to_dict(family: Family) -> dict[str, object]:
    """The family as a versioned, JSON- and YAML-ready document (schema_version 2).

    Args:
        family: The family.

    Returns:
        Plain dicts, lists, strings and numbers; derived floats to 6 decimals.
    """
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": _KIND,
        "coefficients": {"alpha": family.alpha, "beta": family.beta, "gamma": family.gamma},
        "mode": family.mode,
        "base_resolution_px": family.base_resolution_px,
        "num_classes": family.num_classes,
        "members": [member_to_dict(member) for member in family.members],
    }


def _field(data: object, key: str, where: str, kind: type[_T]) -> _T:
    """data[key], checked to be a `kind` (an int passes as a float; a bool never passes)."""
    if not isinstance(data, dict):
        raise ValueError(f"family document: {where} must be a mapping, got {data!r}")
    if key not in data:
        raise ValueError(f"family document: {where} has no {key!r}")
    value = data[key]
    allowed = (int, float) if kind is float else kind
    if isinstance(value, bool) or not isinstance(value, allowed):
        raise ValueError(
            f"family document: {where}.{key} must be of type {kind.__name__}, got {value!r}"
        )
    return cast(_T, float(cast(float, value)) if kind is float else value)


def _member_from_dict(data: object, where: str, *, version: int | None) -> FamilyMember:
    """A member; ``version`` 1 (or None: an entry on its own, version unknown) fills in the
    recipe version 1 did not state; version 2 must state it."""
    values: dict[str, Any] = {"name": _field(data, "name", where, str)}
    if isinstance(data, dict) and version != SCHEMA_VERSION:
        data = {**_V1_DEFAULTS, **data}
    values.update({name: _field(data, name, where, float) for name in _MEMBER_FLOATS})
    values.update({name: _field(data, name, where, int) for name in _MEMBER_INTS})
    stages = []
    for index, stage in enumerate(_field(data, "stages", where, list)):
        at = f"{where}.stages[{index}]"
        stages.append(
            StageShape(**{f.name: _field(stage, f.name, at, int) for f in fields(StageShape)})
        )
    return FamilyMember(**values, stages=tuple(stages))


def member_from_dict(data: Mapping[str, object]) -> FamilyMember:
    """Rebuild one member from its entry in a family document, e.g. ``FAMILY["members"][i]``.

    Only types are checked here; `scaling_search.build_model` also checks that the stated
    shapes and counts follow from width, depth and num_classes.

    Args:
        data: The member's mapping.

    Returns:
        The member.

    Raises:
        ValueError: If a field is missing or has the wrong type.
    """
    name = data.get("name") if isinstance(data, Mapping) else None
    where = f"member {name!r}" if isinstance(name, str) else "member"
    return _member_from_dict(dict(data) if isinstance(data, Mapping) else data, where, version=None)


def family_from_dict(data: Mapping[str, object]) -> Family:
    """Rebuild a family from `family_to_dict`'s document (e.g. a parsed JSON or YAML file).

    Args:
        data: The document.

    Returns:
        The family.

    Raises:
        ValueError: If the schema version (1 or 2) or kind is not this module's, the mode is
            unknown, a field is missing or has the wrong type, or a member's num_classes is not the
            family's.
    """
    top = "the document"
    data = dict(data) if isinstance(data, Mapping) else data
    version = _field(data, "schema_version", top, int)
    if version not in _READS:
        raise ValueError(
            f"family document: schema_version must be one of {list(_READS)}, got "
            f"{data['schema_version']!r}"
        )
    if _field(data, "kind", top, str) != _KIND:
        raise ValueError(f"family document: kind must be {_KIND!r}, got {data['kind']!r}")
    mode = _field(data, "mode", top, str)
    if mode not in FAMILY_MODES:
        raise ValueError(f"family document: mode must be one of {FAMILY_MODES}, got {mode!r}")
    coefficients = _field(data, "coefficients", top, dict)
    num_classes = _field(data, "num_classes", top, int)
    members = tuple(
        _member_from_dict(m, f"members[{i}]", version=version)
        for i, m in enumerate(_field(data, "members", top, list))
    )
    for index, member in enumerate(members):
        if member.num_classes != num_classes:
            raise ValueError(
                f"family document: members[{index}].num_classes is {member.num_classes} but the "
                f"family's num_classes is {num_classes}"
            )
    return Family(
        alpha=_field(coefficients, "alpha", "coefficients", float),
        beta=_field(coefficients, "beta", "coefficients", float),
        gamma=_field(coefficients, "gamma", "coefficients", float),
        mode=mode,
        base_resolution_px=_field(data, "base_resolution_px", top, int),
        num_classes=num_classes,
        members=members,
    )


def dump_family(family: Family, fmt: str) -> str:
    """Serialise a family as JSON (indent 2, trailing newline), YAML (keys in schema order) or
    a Python module that assigns the same document, as plain literals, to ``FAMILY``.

    The Python module imports nothing and calls nothing, so a project can vendor it and
    ``import`` it (or read it with ``ast.literal_eval``) without this package installed.

    Args:
        family: The family.
        fmt: One of DUMP_FORMATS: "json", "yaml" or "python".

    Returns:
        The document as text.

    Raises:
        ValueError: If fmt is not one of DUMP_FORMATS.
    """
    if fmt not in DUMP_FORMATS:
        raise ValueError(f"fmt must be one of {DUMP_FORMATS}, got {fmt!r}")
    document = family_to_dict(family)
    if fmt == "json":
        return json.dumps(document, indent=2) + "\n"
    if fmt == "python":
        return _python_module(family, document)
    return yaml.safe_dump(document, sort_keys=False)


def _python_module(family: Family, document: dict[str, object]) -> str:
    names = ", ".join(member.name for member in family.members)
    header = (
        f'"""EfficientNet family {names} for alpha={family.alpha:g}, beta={family.beta:g}, '
        f"gamma={family.gamma:g} ({family.mode} mode).\n\n"
        f"Written by scaling-search (schema_version {SCHEMA_VERSION}): plain literals only, the "
        "same document as\nits JSON export. FAMILY['members'][i]['stages'] lists each stage's "
        "expand ratio, kernel,\nstride, input and output channels and repeats.\n"
        '"""\n\n'
    )
    body = pprint.pformat(document, indent=1, width=100, sort_dicts=False)
    return f"{header}SCHEMA_VERSION = {SCHEMA_VERSION}\nFAMILY = {body}\n"
