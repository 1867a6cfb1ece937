"""Functions that fit on a screen (issue 15): no function of the package is longer than
MAX_LINES, counted from its ``def`` line to its last line, less its docstring (the signature,
comments and blank lines count; decorators do not). A nested function counts in its own right
and within the function that holds it.

A function that cannot sensibly be split is listed in ALLOWED with its length today and why; it
may not grow, and once it is back within the limit it must leave the list, so the list only
shrinks.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "scaling_search"
MAX_LINES = 40

# "path/in/package.py:Qualified.name" -> (its length today, why it is not split)
ALLOWED: dict[str, tuple[int, str]] = {}


def _length(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from ``def`` to the end, less the docstring's."""
    assert node.end_lineno is not None
    lines = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if ast.get_docstring(node, clean=False) is not None:
        assert first.end_lineno is not None
        lines -= first.end_lineno - first.lineno + 1
    return lines


def _functions(tree: ast.AST, prefix: str = "") -> Iterator[tuple[str, int]]:
    """(qualified name, length) of every function and method in ``tree``, nested ones too."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield prefix + node.name, _length(node)
            yield from _functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")
        else:
            yield from _functions(node, prefix)


def function_lengths() -> dict[str, int]:
    """Every function of the package by "path:qualified.name", with its length."""
    lengths = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for name, length in _functions(tree):
            lengths[f"{path.relative_to(PACKAGE).as_posix()}:{name}"] = length
    return lengths


def test_length_counts_the_signature_and_body_but_not_the_docstring() -> None:
    source = '''
def f(
    a: int,
) -> int:
    """One line.

    Three.
    """
    # a comment

    return a


class C:
    @staticmethod
    def g() -> None:
        def h() -> None:
            pass
'''
    assert dict(_functions(ast.parse(source))) == {"f": 6, "C.g": 3, "C.g.h": 2}


def test_every_function_fits_on_a_screen() -> None:
    lengths = function_lengths()
    too_long = {
        name: length
        for name, length in lengths.items()
        if length > MAX_LINES and name not in ALLOWED
    }
    assert too_long == {}, f"split these into named steps (at most {MAX_LINES} lines each)"


def test_the_allowed_list_only_shrinks() -> None:
    lengths = function_lengths()
    grown = {
        name: (lengths.get(name), allowed)
        for name, (allowed, _) in ALLOWED.items()
        if lengths.get(name, 0) > allowed
    }
    assert grown == {}, "an allowed function grew: split it instead"
    within = sorted(name for name in ALLOWED if lengths.get(name, 0) <= MAX_LINES)
    assert within == [], "within the limit now (or gone): remove from ALLOWED"
