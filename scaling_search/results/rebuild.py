"""Rebuild one family member's network from the member alone, checking that it says what it builds.

A member (a `FamilyMember`, or its entry in a JSON, YAML or Python family document) states its
width, depth and num_classes, and also the shapes and counts those give. A hand-edited document
can disagree with itself; `build_model` refuses it, naming the field, rather than build a network
that is not the one the document describes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import TYPE_CHECKING

from scaling_search.network import Architecture, StageShape, architecture, count_macs, count_params
from scaling_search.network.modules import build_model as _build_network
from scaling_search.results.export import member_from_dict
from scaling_search.results.family import FamilyMember

if TYPE_CHECKING:
    from scaling_search.network.modules import EfficientNet

__all__ = ["build_model", "member_architecture"]


def _as_member(member: FamilyMember | Mapping[str, object]) -> FamilyMember:
    if isinstance(member, FamilyMember):
        return member
    if isinstance(member, Mapping):
        return member_from_dict(member)
    raise TypeError(
        f"member must be a FamilyMember or a mapping from a family document, "
        f"got {type(member).__name__}"
    )


def _disagreements(member: FamilyMember, arch: Architecture) -> list[tuple[str, object, object]]:
    """(field, stated, rebuilt) for every stated shape or count that `arch` does not have."""
    pairs: list[tuple[str, object, object]] = [
        ("stem_channels", member.stem_channels, arch.stem_channels),
        ("head_channels", member.head_channels, arch.head_channels),
    ]
    if len(member.stages) != len(arch.stages):
        pairs.append(("len(stages)", len(member.stages), len(arch.stages)))
    else:
        for index, (stated, rebuilt) in enumerate(zip(member.stages, arch.stages, strict=True)):
            pairs += [
                (f"stages[{index}].{f.name}", getattr(stated, f.name), getattr(rebuilt, f.name))
                for f in fields(StageShape)
            ]
    pairs += [
        ("params", member.params, count_params(arch)),
        ("macs", member.macs, count_macs(arch, resolution_px=member.resolution_px)),
    ]
    return [(name, stated, rebuilt) for name, stated, rebuilt in pairs if stated != rebuilt]


def member_architecture(member: FamilyMember | Mapping[str, object]) -> Architecture:
    """The architecture of a member, checked against every shape and count the member states.

    Needs no torch: a consumer can check a document before building anything.

    Args:
        member: A `FamilyMember`, or one entry of a family document's "members" list.

    Returns:
        ``model.architecture(width=..., depth=..., num_classes=...)`` of the member.

    Raises:
        ValueError: If a field is missing or mistyped, or a stated value (stem_channels,
            head_channels, a stage field, params, or macs at resolution_px) is not what width,
            depth and num_classes give; the message names the first such field.
        TypeError: If `member` is neither a FamilyMember nor a mapping.
    """
    parsed = _as_member(member)
    arch = architecture(width=parsed.width, depth=parsed.depth, num_classes=parsed.num_classes)
    wrong = _disagreements(parsed, arch)
    if wrong:
        name, stated, rebuilt = wrong[0]
        at = f" at resolution_px={parsed.resolution_px}" if name == "macs" else ""
        more = f" ({len(wrong) - 1} more fields disagree)" if len(wrong) > 1 else ""
        raise ValueError(
            f"member {parsed.name!r}: {name} is {stated!r} but width={parsed.width:g}, "
            f"depth={parsed.depth:g}, num_classes={parsed.num_classes}{at} give {rebuilt!r}"
            f"{more}; was the document edited by hand?"
        )
    return arch


def build_model(
    member: FamilyMember | Mapping[str, object], *, seed: int | None = None
) -> EfficientNet:
    """Build the network of one family member, freshly initialised, in eval mode.

    The member alone is enough: width, depth and num_classes give the architecture; the
    member's dropout (before the classifier), stochastic depth (training mode only) and BN
    momentum are those it states: for a family exported from a study, what the search trained
    with. The module is returned in **eval mode**, ready
    for export, inference or benchmarking at ``member.resolution_px``; call ``.train()`` to
    train it. Like every torch module it is built on the default device (or inside a
    ``torch.device(...)`` context); move it with ``.to(device, dtype)``.

    Args:
        member: A `FamilyMember`, or one entry of a family document's "members" list, e.g.
            ``json.load(f)["members"][i]`` or the Python export's ``FAMILY["members"][i]``.
        seed: Seed of the weight initialisation; the same seed gives the same weights, and the
            global random state is left as it was. None draws from the global state.

    Returns:
        The `EfficientNet` module, in eval mode.

    Raises:
        ValueError: If the member is malformed or disagrees with itself (see
            `member_architecture`), or seed is not an integer >= 0.
        TypeError: If `member` is neither a FamilyMember nor a mapping.
    """
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed must be an integer >= 0 or None, got {seed!r}")
    parsed = _as_member(member)
    arch = member_architecture(parsed)
    settings = {
        "dropout": parsed.dropout,
        "stochastic_depth": parsed.stochastic_depth,
        "bn_momentum": parsed.bn_momentum,
    }
    if seed is None:
        return _build_network(arch, **settings).eval()
    import torch

    # Only the CPU generator is forked: a module built under a CUDA device context draws from
    # the CUDA generator, which manual_seed also seeds but fork_rng(devices=[]) does not restore.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build_network(arch, **settings).eval()
