"""Functions a study names as "package.module:function" (its objective and network key):
imported with one-line errors."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from scaling_search.config import StudyError
from scaling_search.space import Coefficients, compound_scale

__all__ = ["ObjectiveError", "first_line", "hook_point", "load_function", "show"]


class ObjectiveError(StudyError):
    """An objective (or its network key) that cannot be loaded or broke its contract; one line
    for the user."""


def hook_point(coefficients: Coefficients, *, base_resolution_px: int) -> dict[str, Any]:
    """What an objective and its network key are told of a candidate: α, β, γ and the φ = 1
    resolution in pixels (by the one rounding rule, so it is the px the family states)."""
    return {
        "alpha": coefficients.alpha,
        "beta": coefficients.beta,
        "gamma": coefficients.gamma,
        "resolution_px": compound_scale(coefficients, 1, base_resolution_px=base_resolution_px)[2],
    }


def load_function(spec: str, *, what: str) -> Callable[..., Any]:
    """The function that ``spec`` ("package.module:function") names.

    Args:
        spec: "package.module:function".
        what: The study key that names it, for messages ("objective" or "network_key").

    Raises:
        ObjectiveError: the module does not import, or has no such callable.
    """
    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ObjectiveError(
            f"{what} {spec!r}: no module named {exc.name or module_name!r} "
            "(is it installed, or on PYTHONPATH?)"
        ) from None
    except Exception as exc:
        raise ObjectiveError(
            f"{what} {spec!r}: importing {module_name!r} failed: {first_line(exc)}"
        ) from None
    function = getattr(module, name, None)
    if function is None:
        raise ObjectiveError(f"{what} {spec!r}: module {module_name!r} has no {name!r}")
    if not callable(function):
        raise ObjectiveError(f"{what} {spec!r}: {name!r} is not callable (it is {show(function)})")
    return function


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."
