"""``--help`` prints plain text: the subcommands describe themselves with their module docstrings,
whose reStructuredText markup (``name``, :class:`X`, ``Example::``) is removed."""

from __future__ import annotations

import argparse
import re

import pytest

from moe_dist.cli import build_parser
from moe_dist.help_text import plain_text

MARKUP = re.compile(r"``|:[a-z]+:`|`\w[^`\n]*`|::\s*$|(?<![\w*])\*[A-Za-z][^*\n]*\*(?![\w*])", re.MULTILINE)


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", sorted(_subparsers()))
def test_help_shows_no_rest_markup(command):
    text = _subparsers()[command].format_help()
    assert not MARKUP.findall(text), MARKUP.findall(text)


def test_plain_text_keeps_the_words():
    doc = ("Reads ``config.yaml`` (see :class:`RunSummary`, :func:`~moe_dist.metrics.flops.mfu` and\n"
           ":doc:`the guide <guide/index>`); *Active* parameters, `val_loss`, a * C^b, * a bullet.\n"
           "A sweep file (YAML)::\n\n    name: x\n")
    assert plain_text(doc) == ("Reads config.yaml (see RunSummary, mfu and\n"
                               "the guide); Active parameters, val_loss, a * C^b, * a bullet.\n"
                               "A sweep file (YAML):\n\n    name: x")
