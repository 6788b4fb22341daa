"""Module docstrings as ``--help`` text: the reStructuredText markup a terminal would show raw
(````name````, ``:class:`X```, ``text::``) turned into plain text.

The subcommands (sweep, report, export) describe themselves with their module docstring, which
is written for Sphinx-style readers; :func:`plain_text` keeps the words and drops the markup.
"""

from __future__ import annotations

import re

_ROLE = re.compile(r":[a-zA-Z:]+:`(?P<body>[^`]+)`")
_LITERAL = re.compile(r"``(?P<body>.+?)``")
_INTERPRETED = re.compile(r"(?<![`\w])`(?P<body>[^`\n]+)`(?![`\w])")
_LABELLED = re.compile(r"^(?P<label>.+?)\s*<(?P<target>[^<>]+)>$")
_EMPHASIS = re.compile(r"(?<![\w*])\*{1,2}(?P<body>[^*\s](?:[^*\n]*[^*\s])?)\*{1,2}(?![\w*])")


def _role_text(match: re.Match) -> str:
    body = match.group("body")
    labelled = _LABELLED.match(body)
    if labelled:  # :doc:`the guide <guide/index>` -> the guide
        return labelled.group("label")
    if body.startswith("~"):  # :func:`~a.b.c` -> c
        return body[1:].rsplit(".", 1)[-1]
    return body


def plain_text(doc: str | None) -> str:
    """``doc`` without reST markup: roles, ``literals``, `interpreted text`, *emphasis* and
    ``::`` become their plain words (``Example::`` -> ``Example:``; a lone ``::`` line
    disappears)."""
    if not doc:
        return ""
    text = _ROLE.sub(_role_text, doc)
    text = _LITERAL.sub(lambda m: m.group("body"), text)
    text = _INTERPRETED.sub(lambda m: m.group("body"), text)
    text = _EMPHASIS.sub(lambda m: m.group("body"), text)
    lines = []
    for line in text.splitlines():
        stripped = line.rstrip()
        if stripped.strip() == "::":
            continue
        if stripped.endswith("::"):
            stripped = stripped[:-1]
        lines.append(stripped)
    return "\n".join(lines)
