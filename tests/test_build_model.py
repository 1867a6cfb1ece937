"""Tests for scaling_search.build_model: a family member, alone, rebuilds exactly its network.

Parameters and multiply-adds are measured on the built module, independently of the analytic
counters in model.py: parameters by summing ``numel()``, MACs by running one forward pass on the
``meta`` device under ``torch.utils.flop_counter.FlopCounterMode`` (which counts 2 flops per
multiply-add of convolutions and matrix products, and nothing for element-wise ops, biases
included: the same convention as ``model.count_macs``).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
import yaml
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import scaling_search
from scaling_search.network import EfficientNet, round_channels, scale_depth
from scaling_search.results.export import dump_family, family_to_dict, member_from_dict
from scaling_search.results.family import Family, FamilyMember, make_family
from scaling_search.results.rebuild import member_architecture
from scaling_search.space import Coefficients

PAPER = Coefficients(1.2, 1.1, 1.15)  # Tan & Le 2019, §4.2
# A depth-heavy triple on the same constraint (1.4 · 1.05² · 1.15² ≈ 2.04), so that the
# flops-matched members sit at other φ, widths and resolutions than the paper's.
DEEP = Coefficients(1.4, 1.05, 1.15)

FAMILIES: dict[str, Callable[[], Family]] = {
    "formula-paper-1000": lambda: make_family(PAPER),
    "formula-paper-10": lambda: make_family(PAPER, num_classes=10),
    "matched-paper-1000": lambda: make_family(PAPER, mode="flops-matched"),
    "matched-paper-10": lambda: make_family(PAPER, mode="flops-matched", num_classes=10),
    "matched-deep-1000": lambda: make_family(DEEP, mode="flops-matched"),
    "matched-deep-10": lambda: make_family(DEEP, mode="flops-matched", num_classes=10),
}


def _measured(model: nn.Module, resolution_px: int) -> tuple[int, int, tuple[int, ...]]:
    """(parameters, MACs of one image, output shape) of a module built on the meta device."""
    params = sum(p.numel() for p in model.parameters())
    image = torch.empty(1, 3, resolution_px, resolution_px, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        logits = model(image)
    flops = counter.get_total_flops()
    assert flops % 2 == 0
    return params, flops // 2, tuple(logits.shape)


def _build_on_meta(member: FamilyMember | dict[str, Any]) -> EfficientNet:
    with torch.device("meta"):
        return scaling_search.build_model(member)


@pytest.mark.parametrize("case", list(FAMILIES))
def test_every_member_has_exactly_its_params_and_macs(case: str) -> None:
    family = FAMILIES[case]()
    assert [m.name for m in family.members] == [f"b{k}" for k in range(1, 8)]
    for member in family.members:
        model = _build_on_meta(member)
        params, macs, shape = _measured(model, member.resolution_px)
        assert (params, macs) == (member.params, member.macs), member.name
        assert shape == (1, family.num_classes), member.name
        assert model.dropout.p == member.dropout


def test_the_module_is_in_eval_mode() -> None:
    member = make_family(PAPER, phis=[0], num_classes=10).members[0]
    model = _build_on_meta(member)
    assert not any(module.training for module in model.modules())


def test_seed_gives_the_same_weights_and_leaves_the_global_state() -> None:
    member = make_family(PAPER, phis=[0], num_classes=10).members[0]
    state = torch.get_rng_state()
    first = scaling_search.build_model(member, seed=3).state_dict()
    second = scaling_search.build_model(member, seed=3).state_dict()
    other = scaling_search.build_model(member, seed=4).state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(first[key], second[key]) for key in first)
    weight = "stem.0.weight"
    assert not torch.equal(first[weight], other[weight])


# --- members read back from every text format ----------------------------------------------------


def _members_from_text(family: Family, fmt: str) -> list[dict[str, Any]]:
    text = dump_family(family, fmt)
    if fmt == "json":
        return list(json.loads(text)["members"])
    if fmt == "yaml":
        return list(yaml.safe_load(text)["members"])
    namespace: dict[str, Any] = {}
    exec(compile(text, "family_export.py", "exec"), namespace)  # the module a consumer imports
    return list(namespace["FAMILY"]["members"])


@pytest.mark.parametrize("fmt", ["json", "yaml", "python"])
def test_members_from_every_format_rebuild_the_same_network(fmt: str) -> None:
    family = make_family(PAPER, mode="flops-matched", phis=[0, 1, 4], num_classes=10)
    documents = _members_from_text(family, fmt)
    assert len(documents) == len(family.members)
    for document, member in zip(documents, family.members, strict=True):
        assert document["num_classes"] == 10
        assert member_from_dict(document) == member
        params, macs, _ = _measured(_build_on_meta(document), document["resolution_px"])
        assert (params, macs) == (member.params, member.macs), member.name


def test_a_mapping_and_its_member_build_the_same_weights() -> None:
    family = make_family(PAPER, phis=[0], num_classes=10)
    members = family_to_dict(family)["members"]
    assert isinstance(members, list)
    [document] = members
    from_member = scaling_search.build_model(family.members[0], seed=0).state_dict()
    from_mapping = scaling_search.build_model(document, seed=0).state_dict()
    assert all(torch.equal(from_member[key], from_mapping[key]) for key in from_member)


# --- documents that disagree with themselves -----------------------------------------------------


def _b3() -> dict[str, Any]:
    """Member b3 of the paper's formula family, as its JSON export reads back."""
    text = dump_family(make_family(PAPER, phis=[3]), "json")
    return dict(json.loads(text)["members"][0])


def _one_line_error(document: object) -> str:
    with pytest.raises(ValueError) as info:
        scaling_search.build_model(document)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message
    return message


def test_an_edited_width_names_the_first_disagreeing_field() -> None:
    document = _b3()
    document["width"] = 1.5
    message = _one_line_error(document)
    # B0's stem is 32 channels; round_channels gives what width 1.5 makes of it.
    assert message.startswith(
        f"member 'b3': stem_channels is {document['stem_channels']} but width=1.5, "
        f"depth={document['depth']:g}, num_classes=1000 give {round_channels(32, 1.5)}"
    )
    assert "more fields disagree" in message


@pytest.mark.parametrize(
    ("field", "edit", "expected"),
    [
        ("stages[3].repeats", lambda d: d["stages"][3].update(repeats=99), "99 but"),
        ("head_channels", lambda d: d.update(head_channels=8), "8 but"),
        ("params", lambda d: d.update(params=d["params"] + 1), "but width="),
        ("macs", lambda d: d.update(resolution_px=d["resolution_px"] + 64), "at resolution_px="),
        ("params", lambda d: d.update(num_classes=7), "num_classes=7 give"),
        ("len(stages)", lambda d: d["stages"].pop(), "is 6 but"),
    ],
)
def test_an_inconsistent_document_names_the_field(
    field: str, edit: Callable[[dict[str, Any]], object], expected: str
) -> None:
    document = _b3()
    edit(document)
    message = _one_line_error(document)
    assert message.startswith(f"member 'b3': {field} is "), message
    assert expected in message
    # The torch-free check says the same before anything is built.
    with pytest.raises(ValueError, match=f"^member 'b3': {re.escape(field)} is "):
        member_architecture(document)


def test_the_repeats_check_uses_the_depth_rule() -> None:
    # B0's fourth stage repeats 3 times (Tan & Le 2019, table 1); b3's depth scales that.
    document = _b3()
    rebuilt = scale_depth(3, document["depth"])
    document["stages"][3]["repeats"] = rebuilt + 1
    assert f"stages[3].repeats is {rebuilt + 1} but" in _one_line_error(document)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda d: d.pop("num_classes"), "member 'b3' has no 'num_classes'"),
        (lambda d: d.update(width="wide"), "member 'b3'.width must be of type float"),
        (lambda d: d.update(dropout=1.5), "dropout must be a number in [0, 1)"),
    ],
)
def test_a_malformed_member_is_one_line(
    edit: Callable[[dict[str, Any]], object], expected: str
) -> None:
    document = _b3()
    edit(document)
    assert expected in _one_line_error(document)


def test_a_bad_seed_or_member_type_is_refused() -> None:
    with pytest.raises(ValueError, match="seed must be an integer >= 0 or None, got -1"):
        scaling_search.build_model(_b3(), seed=-1)
    with pytest.raises(TypeError, match="FamilyMember or a mapping"):
        scaling_search.build_model([1, 2])  # type: ignore[arg-type]


def test_import_scaling_search_imports_no_torch() -> None:
    script = (
        "import sys, scaling_search\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert 'scaling_search.results.rebuild' not in sys.modules\n"
        "from scaling_search import build_model\n"
        "import scaling_search.results.rebuild as rebuild\n"
        "assert build_model is rebuild.build_model\n"
        "assert 'build_model' in scaling_search.__all__\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
