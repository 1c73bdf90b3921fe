"""Masking secrets wherever text may hold one: settings printed at start-up, health details,
log lines, error messages.

A URL's secrets are its userinfo's password (``redis://user:***@host``; a userinfo without a
``:`` is masked whole, it may be a token) and the values of its query parameters whose names
look secret (``?password=***``, ``token``, ``secret``, ``key``, ``auth``, ``cred``).
"""

from __future__ import annotations

import re

MASK = "***"
_SECRET_PARAMETER = re.compile(r"pass|pwd|secret|token|key|auth|cred", re.IGNORECASE)
# A URL inside free text: scheme://, then anything up to white space or a quote.
_URL_IN_TEXT = re.compile(r"[A-Za-z][\w+.-]*://[^\s'\"<>]+")


def _mask_query(query: str) -> str:
    parts = []
    for item in re.split(r"([&;])", query):
        name, equals, _ = item.partition("=")
        parts.append(f"{name}={MASK}" if equals and _SECRET_PARAMETER.search(name) else item)
    return "".join(parts)


def mask_url(url: str) -> str:
    """``url`` with its password and secret query values masked; other text as it was."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        return url
    # The userinfo runs to the LAST '@' (an unescaped '@' inside a password must not leak its
    # tail); a '@' inside the query makes more of the URL look like userinfo: masked too.
    userinfo, at, location = rest.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        rest = f"{user}:{MASK}@{location}" if colon else f"{MASK}@{location}"
    before, question, query = rest.partition("?")
    return f"{scheme}://{before}{question}{_mask_query(query)}" if question \
        else f"{scheme}://{rest}"


def mask_urls(text: str) -> str:
    """Every URL inside ``text`` masked (``mask_url``)."""
    if "://" not in text:
        return text
    return _URL_IN_TEXT.sub(lambda match: mask_url(match.group()), text)
