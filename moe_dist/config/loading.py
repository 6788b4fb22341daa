"""Loading: defaults < YAML file (after the files it inherits) < dotted command-line overrides,
strictly typed.

A config file may start from another one with a top-level ``base:`` key, a path relative to the
file (or absolute); the file's own keys are merged into the base's, section by section, a value
(lists included) replacing the base's. Bases may have bases::

    # configs/peer.yaml
    base: tiny.yaml
    model:
      arch: peer
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from moe_dist.config.errors import ConfigError
from moe_dist.config.root import Config

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "tiny.yaml"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults < YAML file < ``section.key=value`` overrides, type-checked and validated."""
    raw = read_config_tree(Path(path) if path is not None else DEFAULT_CONFIG)
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    return from_dict(Config, raw)


def read_config_tree(path: Path, inheriting: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The nested dict of config file ``path`` merged onto its ``base:`` chain (module docstring)."""
    loaded = _read_yaml(path)
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(loaded).__name__}")
    tree = dict(loaded or {})
    if "base" not in tree:
        return tree
    base = tree.pop("base")
    if not isinstance(base, str) or not base:
        raise ConfigError(f"config file {str(path)!r}: base = {base!r} must be the path of the config file it "
                          "starts from, e.g. base: tiny.yaml")
    base_path = Path(base).expanduser()
    base_path = base_path if base_path.is_absolute() else path.parent / base_path
    chain = (*inheriting, path.resolve())
    if base_path.resolve() in chain:
        cycle = " -> ".join(str(p) for p in (*chain, base_path.resolve()))
        raise ConfigError(f"config file {str(path)!r}: base = {base!r} makes a circle ({cycle}); remove one base")
    try:
        parent = read_config_tree(base_path, chain)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (the base of config file {str(path)!r})") from exc
    return merge_config_trees(parent, tree)


def merge_config_trees(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """``child`` merged into ``base``: sections recursively, any other value replacing the base's."""
    merged = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_config_trees(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path) -> Any:
    """The parsed YAML of ``--config``; every way the file can be wrong is a ConfigError."""
    shipped = f"shipped configs: {sorted(p.name for p in CONFIG_DIR.glob('*.yaml'))}"
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a directory; pass a YAML file, e.g. one of the {shipped}")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; {shipped}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not a text file ({exc.reason} at byte {exc.start}); "
                          "pass a YAML file") from exc
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r} cannot be read ({exc.strerror}); "
                          "check its permissions") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {describe_yaml_error(exc)}") from exc


def describe_yaml_error(exc: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: 'expected ..., but found ... (line 2, column 1)'."""
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    if not problem:
        return " ".join(str(exc).split())
    context = getattr(exc, "context", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return f"{context + ', ' if context else ''}{problem}{where}"


def config_from_dict(raw: dict[str, Any]) -> Config:
    return from_dict(Config, raw)


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item or item.startswith("="):
        raise ConfigError(f"override {item!r} must look like section.key=value, e.g. moe.num_experts=16")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def from_dict(cls: type, raw: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and wrong types."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            suggestion = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{prefix}{suggestion[0]}'?" if suggestion else \
                f"; valid keys: {sorted(fields)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - dataclass signature errors are bugs
        raise ConfigError(f"{where}: {exc}") from exc


def _coerce(hint: Any, value: Any, name: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value if value is not None else {}, prefix=f"{name}.")
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint_text = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{name} = {value!r} is not one of {list(choices)}{hint_text}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, name)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{name} = {value!r} has the wrong type")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} = {value!r} must be a list")
        (item_hint, *_) = typing.get_args(hint) or (Any,)
        items = [_coerce(item_hint, v, f"{name}[{i}]") for i, v in enumerate(value)]
        return list(items) if origin is list else tuple(items)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} = {value!r} must be true or false")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{name} = {value!r} must be an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    return float(value)  # YAML reads "3e-4" (no dot) as a string
                except ValueError:
                    pass
            raise ConfigError(f"{name} = {value!r} must be a number")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{name} = {value!r} must be a string")
        return str(value)
    return value
