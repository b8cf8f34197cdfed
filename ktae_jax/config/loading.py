"""Reading a `TrainConfig`: YAML files (each after its `include:` list), then dotted `section.key=value`
overrides, every value coerced to its field's type; the result is validated (`TrainConfig.validate`).

Each error is a `ConfigError` naming the file and key: an unknown section or key, a value of the
wrong type, a missing or cyclic include, a malformed override.
"""

from __future__ import annotations

import dataclasses
import pathlib
import types
import typing
from typing import Any, Literal

import yaml

from ktae_jax.config.sections import SECTIONS, ConfigError, TrainConfig

def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """`value` as the field's type, or ConfigError naming `key`."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        if value not in typing.get_args(annotation):
            raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(annotation))}")
        return value
    if origin in (types.UnionType, typing.Union):
        for option in typing.get_args(annotation):
            try:
                return _coerce(key, value, option)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} does not have the type {annotation}")
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_type, *_rest) = typing.get_args(annotation)
        return tuple(_coerce(f"{key}[{i}]", v, item_type) for i, v in enumerate(value))
    if annotation is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null, got {value!r}")
        return None
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {annotation}")


def _build_section(name: str, values: dict[str, Any]) -> Any:
    cls = SECTIONS[name]
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise ConfigError(f"unknown config key {name}.{key} (known: {', '.join(sorted(known))})")
    kwargs = {key: _coerce(f"{name}.{key}", value, hints[key]) for key, value in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(f"{name}: {err}") from None


def _merge(tree: dict[str, dict[str, Any]], values: Any, source: str) -> None:
    if values is None:
        return
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    for section, body in values.items():
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown config section {section!r} (known: {', '.join(SECTIONS)})")
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping")
        tree.setdefault(section, {}).update(body)


def parse_override(text: str) -> tuple[str, str, Any]:
    """`section.key=value` -> (section, key, value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or parts[0] not in SECTIONS:
        raise ConfigError(f"override {text!r}: the key must be section.key with a section in {list(SECTIONS)}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: cannot parse the value: {err}") from None
    return parts[0], parts[1], value


INCLUDE_KEY = "include"  # a file's list of files (relative to it) merged before its own values


def _merge_file(tree: dict[str, dict[str, Any]], path: pathlib.Path, chain: tuple[pathlib.Path, ...] = ()) -> None:
    """`path`'s included files in order, then its own sections, merged into `tree`."""
    if not path.is_file():
        where = f" (included by {chain[-1]})" if chain else ""
        raise ConfigError(f"config file {path} does not exist{where}")
    if path.resolve() in (p.resolve() for p in chain):
        raise ConfigError(f"{path}: included in a cycle ({' -> '.join(map(str, (*chain, path)))})")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if isinstance(values, dict) and INCLUDE_KEY in values:
        values = dict(values)
        included = values.pop(INCLUDE_KEY)
        if isinstance(included, str):
            included = [included]
        if not isinstance(included, list) or not all(isinstance(x, str) for x in included):
            raise ConfigError(f"{path}: '{INCLUDE_KEY}' must be a file name or a list of them, got {included!r}")
        for name in included:
            _merge_file(tree, path.parent / name, (*chain, path))
    _merge(tree, values, str(path))


def load_config(files: typing.Sequence[str | pathlib.Path] = (), overrides: typing.Sequence[str] = ()) -> TrainConfig:
    """Merge YAML `files` in order (each after its includes), then `section.key=value` overrides; validate."""
    tree: dict[str, dict[str, Any]] = {}
    for path in files:
        _merge_file(tree, pathlib.Path(path))
    for text in overrides:
        section, key, value = parse_override(text)
        tree.setdefault(section, {})[key] = value
    sections = {name: _build_section(name, tree.get(name, {})) for name in SECTIONS}
    return TrainConfig(**sections).validate()

