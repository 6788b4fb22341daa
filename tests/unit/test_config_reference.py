"""docs/configuration.md is generated from the dataclasses and must match them."""

import dataclasses
from pathlib import Path

from moe_dist import config_reference
from moe_dist.config import Config

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_reference_is_up_to_date():
    assert DOC.read_text() == config_reference.render(), \
        "docs/configuration.md is stale: run python -m moe_dist.config_reference > docs/configuration.md"


def test_every_field_is_documented():
    import typing

    missing = []
    pending = [(f.name, typing.get_type_hints(Config)[f.name]) for f in dataclasses.fields(Config)]
    while pending:
        name, cls = pending.pop()
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[field.name]):
                pending.append((f"{name}.{field.name}", hints[field.name]))
            elif not config_reference.field_docs(cls).get(field.name):
                missing.append(f"{name}.{field.name}")
    assert not missing, f"config fields without a docstring: {missing}"
