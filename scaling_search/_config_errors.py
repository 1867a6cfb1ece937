"""A pydantic ValidationError of a study file, said as one line: 'section.key: problem (got value)'.

Private to ``scaling_search.config``. Values are shown with any password masked: a storage URL
given under the wrong key, or as a list, is echoed as ``scheme://user:***@host``.
"""

from __future__ import annotations

import math
import re
from typing import Any

from pydantic import BaseModel, ValidationError

from scaling_search._redact import mask_value, redact

__all__ = ["describe"]


def describe(exc: ValidationError, root: type[BaseModel]) -> str:
    """The most useful error of ``exc`` (raised validating ``root``), naming the full dotted key
    (``data.seed``), the bad value and what is allowed."""
    return redact(_describe(exc, root))


def _describe(exc: ValidationError, root: type[BaseModel]) -> str:
    errors = exc.errors(include_url=False)
    error = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = ".".join(str(part) for part in error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(root, error["loc"][:-1])
        return f"unknown key {loc!r}; allowed here: {', '.join(allowed)}"
    if kind == "missing":
        return f"{loc}: required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    if kind == "value_error":  # our own validators name the key themselves
        if re.match(r"^[a-z_]+: ", message):  # a key of this section
            return f"{loc}.{message}" if loc else message
        if not loc or message.startswith(loc.split(".")[0]):  # the study's own: names its keys
            return message
        return f"{loc}: {message}"
    shown = _show(error.get("input"))
    return f"{loc}: {message}" + (f" (got {shown})" if shown else "")


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return ""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    text = repr(_masked(value))  # masked before it is cut, so no part of a password shows
    return text if len(text) <= 60 else text[:57] + "..."


def _masked(value: Any) -> Any:
    """``value`` with every string that may hold a password masked (see ``mask_value``)."""
    if isinstance(value, str):
        return mask_value(value)
    if isinstance(value, (list, tuple)):
        return [_masked(item) for item in value]
    return value


def _allowed_keys(root: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    model = root
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)
