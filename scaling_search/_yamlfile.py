"""Reading study YAML: PyYAML's safe loader, without its two silent ways to lose what was written.

A mapping that names a key twice keeps the later value in PyYAML (and in most YAML loaders),
so ``seed: 1`` … ``seed: 2`` would run with 2 and say nothing. :func:`load_yaml` refuses it,
naming the key and both lines. Aliases are shared objects after loading, so a few lines can
expand to billions of values once validation walks them ("billion laughs");
:func:`check_expansion` refuses those. Both raise :class:`YAMLInputError`, one line for the
user, which ``scaling_search.config`` prefixes with the study file's name.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

__all__ = ["MAX_DEPTH", "MAX_VALUES", "YAMLInputError", "check_expansion", "load_yaml"]

# A real study holds under 200 values, 3 levels deep; these limits only stop YAML built to hurt.
MAX_VALUES = 100_000  # values (keys, items, scalars) once YAML aliases are expanded
MAX_DEPTH = 32  # levels of nested mappings and lists
_MERGE_TAG = "tag:yaml.org,2002:merge"  # "<<: *defaults": keys given after it override its


class YAMLInputError(ValueError):
    """YAML that loads, but not as written: a key given twice, or aliases that expand too far."""


def load_yaml(text: str, *, path: tuple[str, ...] = ()) -> Any:
    """``yaml.safe_load(text)``, refusing a mapping that names one key twice.

    ``path``: the dotted key the text is the value of (a ``--set`` override), for messages.

    Raises:
        YAMLInputError: a duplicate key, named by its dotted path with both lines.
        yaml.YAMLError: text that is not YAML.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicate_keys(loader, node, path)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _refuse_duplicate_keys(loader: yaml.SafeLoader, root: Node, path: tuple[str, ...]) -> None:
    """Walk the composed nodes once each (aliases share nodes; a cycle is visited once)."""
    pending: list[tuple[Node, tuple[str, ...]]] = [(root, path)]
    visited: set[int] = set()
    while pending:
        node, path = pending.pop()
        if id(node) in visited:
            continue
        visited.add(id(node))
        if isinstance(node, SequenceNode):
            pending.extend((item, (*path, str(i))) for i, item in enumerate(node.value))
        elif isinstance(node, MappingNode):
            pending.extend(_mapping_children(loader, node, path))


def _mapping_children(
    loader: yaml.SafeLoader, node: MappingNode, path: tuple[str, ...]
) -> list[tuple[Node, tuple[str, ...]]]:
    first_at: dict[Any, tuple[int, int]] = {}
    children: list[tuple[Node, tuple[str, ...]]] = []
    for key_node, value_node in node.value:
        if key_node.tag == _MERGE_TAG or not isinstance(key_node, ScalarNode):
            children.append((value_node, path))
            continue
        key = loader.construct_object(key_node)
        at = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
        if key in first_at:
            dotted = ".".join((*path, str(key)))
            raise YAMLInputError(
                f"key {dotted!r} is given twice ({_where(first_at[key], at)}); each key may "
                "appear once in a mapping"
            )
        first_at[key] = at
        children.append((value_node, (*path, str(key))))
    return children


def _where(first: tuple[int, int], second: tuple[int, int]) -> str:
    if first[0] != second[0]:
        return f"lines {first[0]} and {second[0]}"
    return f"line {first[0]}, columns {first[1]} and {second[1]}"


def check_expansion(raw: Any) -> None:
    """Refuse YAML alias bombs ("billion laughs"), recursive aliases and absurd nesting.

    ``yaml.safe_load`` gives an anchor and all its aliases one shared object, so loading is cheap;
    validation (and any error message that shows a value) walks the expanded tree, which can be
    exponentially large. Each object is counted once (memoised by id), so this check is linear in
    the size of the file.

    Raises:
        YAMLInputError: naming where (a dotted key) and the limit.
    """
    _expanded_size(raw, {}, set(), path=())


def _expanded_size(
    node: Any, sizes: dict[int, int], open_ids: set[int], *, path: tuple[str, ...]
) -> int:
    """Values in ``node`` (keys, items, scalars) with each shared object counted every time."""
    if not isinstance(node, (dict, list)):
        return 1
    if id(node) in sizes:
        return sizes[id(node)]
    where = ".".join(path) or "the study"
    if id(node) in open_ids:
        raise YAMLInputError(f"{where}: a YAML alias refers to a value that contains it (a cycle)")
    if len(path) > MAX_DEPTH:
        raise YAMLInputError(
            f"{path[0]}: nested more than {MAX_DEPTH} levels deep; at most {MAX_DEPTH} are allowed"
        )
    open_ids.add(id(node))
    keys = len(node) if isinstance(node, dict) else 0
    items = node.items() if isinstance(node, dict) else enumerate(node)
    size = 1 + keys
    size += sum(_expanded_size(child, sizes, open_ids, path=(*path, str(k))) for k, child in items)
    if size > MAX_VALUES:
        raise YAMLInputError(
            f"{where}: {size} values once YAML aliases are expanded; at most {MAX_VALUES} are "
            "allowed in a study (a real one holds a few dozen)"
        )
    open_ids.discard(id(node))
    sizes[id(node)] = size
    return size
