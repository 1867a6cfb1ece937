"""Hiding passwords in storage URLs and in any message that may quote one.

A leaf module (no imports from the package, nothing heavy), so that the study-file loader and the
CLI can mask a URL without importing SQLAlchemy. ``scaling_search.study.storage`` re-exports
:func:`mask_url`.
"""

from __future__ import annotations

import re

__all__ = ["MASK", "mask_url", "mask_value", "redact", "url_password"]

MASK = "***"
# A query or key=value parameter whose name holds "pass" (password, sslpassword, passwd…). In a
# URL its value runs to the next '&' or to the end, whatever characters it holds; in free text,
# to the end of the word.
_PARAMETER = r"(?i)((?:^|[?&;\s])[\w.-]*pass[\w.-]*\s*=)"
_SECRET_PARAMETER = re.compile(_PARAMETER + r"[^&]*")
_SECRET_PARAMETER_IN_TEXT = re.compile(_PARAMETER + r"[^&\s'\"]*")
# In free text: 'scheme://user:' followed by anything up to the last '@' of the same word.
_URL_IN_TEXT = re.compile(r"(://[^\s:/@'\"]*:)\S*@")


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, whatever the URL holds.

    Works on the text, never on a parse, so that a URL SQLAlchemy cannot read is masked too: any
    scheme (``mysql+mysql_connector://``), a password holding '@', ':', '/', '%', spaces or
    control characters (everything from the first ':' after the user to the last '@'), a user
    and "port" with no host after it (``postgresql://user:secret``), a password in the query
    (``?password=…``) and a libpq key=value string (``host=h password=…``).

    >>> mask_url("mysql+mysql_connector://bob:p@ss:w@rd@db:3306/x")
    'mysql+mysql_connector://bob:***@db:3306/x'
    >>> mask_url("postgresql://alice@db:5432/studies")
    'postgresql://alice@db:5432/studies'
    """
    scheme, rest, span = _split(url)
    if span is not None:
        rest = f"{rest[: span[0]]}{MASK}{rest[span[1] :]}"
    return _SECRET_PARAMETER.sub(rf"\1{MASK}", scheme + rest)


def mask_value(text: str) -> str:
    """``text`` as :func:`mask_url` shows it if it may hold a password (it has '@', '://' or
    'pass' in it: a URL given where it does not belong), else unchanged."""
    maybe_secret = any(mark in text.lower() for mark in ("@", "://", "pass"))
    return mask_url(text) if maybe_secret else text


def url_password(url: str) -> str | None:
    """The password as written in ``url`` (still %-encoded, if it was), or None: the text that
    :func:`mask_url` hides between the user and the host."""
    _, rest, span = _split(url)
    return None if span is None else rest[span[0] : span[1]]


def _split(url: str) -> tuple[str, str, tuple[int, int] | None]:
    """(scheme with '://', the rest, where the password lies in the rest or None)."""
    text = url.strip()
    scheme, separator, rest = text.partition("://")
    if not separator:
        scheme, rest = "", text
    at = rest.rfind("@")
    if at >= 0:
        colon = rest.find(":", 0, at)
        return scheme + separator, rest, None if colon < 0 else (colon + 1, at)
    return scheme + separator, rest, _port_that_is_not_one(rest)


def _port_that_is_not_one(rest: str) -> tuple[int, int] | None:
    """``user:secret`` with no '@host' after it: a port is digits, anything else may be the
    password of a URL whose host was left out."""
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority = rest[:end]
    if authority.startswith("["):  # an IPv6 host: its colons are not a password's
        return None
    colon = authority.find(":")
    if colon < 0 or authority[colon + 1 :].isdigit() or colon + 1 == end:
        return None
    return colon + 1, end


def redact(text: str, *secrets: str | None) -> str:
    """``text`` (an error message) with each of ``secrets`` and any URL's password hidden.

    For messages a library wrote about a URL (SQLAlchemy's, psycopg's): besides the userinfo of
    any ``scheme://user:password@`` in the text, the password itself is replaced wherever it
    appears, as given and as each line of it (a message cut at a line break still hides it).
    """
    for secret in secrets:
        if not secret:
            continue
        for part in sorted({secret, *secret.splitlines()}, key=len, reverse=True):
            if len(part) >= 3:  # a shorter fragment would mask ordinary words
                text = text.replace(part, MASK)
    text = _URL_IN_TEXT.sub(rf"\1{MASK}@", text)
    return _SECRET_PARAMETER_IN_TEXT.sub(rf"\1{MASK}", text)
