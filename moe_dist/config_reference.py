"""Generate docs/configuration.md from the config dataclasses, so the reference cannot drift.

The text of each key is the docstring written under its field in the ``moe_dist/config/`` package.
Regenerate with ``python -m moe_dist.config_reference > docs/configuration.md``; a test fails
when the committed file differs from what this prints.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import textwrap
import typing

from moe_dist.config import Config

HEADER = """# Configuration reference

Generated from the dataclasses in `moe_dist/config/` by `python -m moe_dist.config_reference`; do not edit by hand.

A config is YAML with one mapping per section (see `configs/`). Any key can be overridden on the
command line as `section.key=value` (nested: `moe.router.top_k=1`); precedence is command line >
YAML file > the defaults below. Unknown keys and wrong types are errors that name the key.
"""


def field_docs(cls: type) -> dict[str, str]:
    """Docstrings written as string literals right after each field of a dataclass."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant) \
                and isinstance(following.value.value, str):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _type_name(hint: typing.Any) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return " \\| ".join(repr(choice) for choice in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint))


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        return repr(field.default)
    return "(section)"


def section_rows(cls: type, prefix: str) -> tuple[list[str], list[tuple[str, type]]]:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    rows, subsections = [], []
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):
            subsections.append((f"{prefix}{field.name}", hint))
            continue
        doc = docs.get(field.name, "").replace("|", "\\|")
        rows.append(f"| `{prefix}{field.name}` | {_type_name(hint)} | `{_default(field)}` | {doc} |")
    return rows, subsections


def render() -> str:
    lines = [HEADER]
    pending = [(field.name, typing.get_type_hints(Config)[field.name]) for field in dataclasses.fields(Config)]
    while pending:
        name, cls = pending.pop(0)
        rows, subsections = section_rows(cls, f"{name}.")
        lines += [f"## `{name}`", "", "| key | type | default | meaning |", "|---|---|---|---|", *rows, ""]
        pending = subsections + pending
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(render())
