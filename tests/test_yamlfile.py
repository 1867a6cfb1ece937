"""Tests for scaling_search._yamlfile: a key given twice is refused, naming it and both places.

PyYAML (like most YAML loaders) keeps the later of two equal keys without a word, so a study
that says ``seed: 1`` and, further down, ``seed: 2`` would run with 2.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from scaling_search._yamlfile import YAMLInputError, load_yaml
from scaling_search.config import StudyError, apply_overrides, load_study


def _duplicate(text: str) -> str:
    with pytest.raises(YAMLInputError) as info:
        load_yaml(text)
    return str(info.value)


@pytest.mark.parametrize(
    ("text", "key", "where"),
    [
        ("name: a\nname: b\n", "'name'", "lines 1 and 2"),
        ("data:\n  seed: 1\n  kind: synthetic\n  seed: 2\n", "'data.seed'", "lines 2 and 4"),
        ("space: {alpha: {low: 1, low: 1.1}}\n", "'space.alpha.low'", "line 1, columns 17 and 25"),
        ("items:\n  - {a: 1}\n  - {b: 1, b: 2}\n", "'items.1.b'", "line 3, columns 6 and 12"),
        ("'seed': 1\nseed: 2\n", "'seed'", "lines 1 and 2"),  # quoted or not, one key
        ("1: a\n1.0: b\n", "'1.0'", "lines 1 and 2"),  # equal once read: 1 == 1.0
    ],
)
def test_a_key_given_twice_is_named_with_both_places(text: str, key: str, where: str) -> None:
    message = _duplicate(text)
    assert f"key {key} is given twice ({where})" in message
    assert "each key may appear once" in message


def test_a_key_after_a_merge_overrides_it() -> None:
    # YAML's merge ('<<') supplies defaults; a key given after it is not a duplicate.
    text = "base: &b {low: 1.0, high: 1.3}\nbeta:\n  <<: *b\n  high: 1.15\n"
    assert load_yaml(text)["beta"] == {"low": 1.0, "high": 1.15}


def test_a_mapping_shared_by_aliases_is_checked_once() -> None:
    text = "a: &shared {x: 1, y: 2}\nb: *shared\nc: [*shared, *shared]\n"
    assert load_yaml(text)["c"] == [{"x": 1, "y": 2}] * 2


def test_a_recursive_alias_does_not_loop() -> None:
    loaded = load_yaml("a: &a [1, *a]\n")
    assert loaded["a"][1] is loaded["a"]


def test_everything_else_loads_as_the_safe_loader_does() -> None:
    text = "name: x\nspace: {alpha: [1.0, 1.3]}\nitems: [1, two, 3.5, null, true]\n"
    assert load_yaml(text) == yaml.safe_load(text)
    assert load_yaml("") is None and load_yaml("# only a comment\n") is None
    with pytest.raises(yaml.YAMLError):
        load_yaml("a: [1, 2")


def test_a_study_file_with_a_key_twice_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "study.yaml"
    path.write_text("name: x\ntrain:\n  epochs: 3\n  epochs: 30\n", encoding="utf-8")
    with pytest.raises(StudyError) as info:
        load_study(path)
    assert str(info.value) == (
        f"{path}: key 'train.epochs' is given twice (lines 3 and 4); each key may appear once "
        "in a mapping"
    )


def test_an_override_with_a_key_twice_names_its_full_key() -> None:
    with pytest.raises(StudyError) as info:
        apply_overrides({"name": "x"}, ["train={epochs: 3, epochs: 30}"])
    assert "--set 'train={epochs: 3, epochs: 30}': key 'train.epochs' is given twice" in str(
        info.value
    )
