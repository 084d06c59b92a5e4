"""YAML files into dataclasses, with errors that name the file, the line and the field.

A leaf both ``data_prep`` and ``nulls_megatron`` load their configs with (PyYAML only, nothing of
ours), so that data preparation imports nothing of training: a repeated key or an empty file is
refused with ``file:line``, an unknown field gets a "did you mean", a value of the wrong type names
its dotted path, and ``dotted.key=value`` overrides are parsed as YAML. A dataclass with a
``validate(origin)`` method is validated after it is built.
"""
from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from pathlib import Path
from typing import Any, Iterable

import yaml

__all__ = ["ConfigError", "DuplicateKeyError", "StrictLoader", "config_error", "dataclass_from_dict",
           "load_yaml_dataclass", "parse_overrides", "read_yaml"]


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or inconsistent."""


def config_error(origin: str, path: str, message: str) -> typing.NoReturn:
    """Raise :class:`ConfigError` as ``origin: dotted.path: message``."""
    raise ConfigError(f"{origin}: {path}: {message}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, origin: str, path: str) -> Any:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, origin, path)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            config_error(origin, path, f"expected a mapping of {_type_name(tp)} fields, got {value!r}")
        return _build(tp, value, origin, path + ".")
    if tp is bool:
        if not isinstance(value, bool):
            config_error(origin, path, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            config_error(origin, path, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            config_error(origin, path, f"expected a number, got {value!r}")
        return float(value)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            config_error(origin, path, f"expected one of {', '.join(str(v.value) for v in tp)}, got {value!r}")
    if tp is str:
        if not isinstance(value, str):
            config_error(origin, path, f"expected a string, got {value!r}")
        return value
    if typing.get_origin(tp) is list:
        if not isinstance(value, list):
            config_error(origin, path, f"expected a list, got {value!r}")
        return [_coerce(item, args[0], origin, f"{path}[{i}]") for i, item in enumerate(value)]
    raise TypeError(f"unsupported config field type {tp} at {path}")


def _build(cls: type, data: dict, origin: str, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(names)}"
            config_error(origin, f"{prefix}{key}", f"unknown field{hint}")
    kwargs = {k: _coerce(v, hints[k], origin, f"{prefix}{k}") for k, v in data.items()}
    return cls(**kwargs)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {key} is not a section")
    node[keys[-1]] = value


def parse_overrides(overrides: Iterable[str]) -> list[tuple[str, Any]]:
    """``["model.num_layers=4", "nulls.per_layer_sinks=true"]`` -> [(path, value)], values parsed as YAML."""
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.load(raw, Loader=StrictLoader)
        except DuplicateKeyError as err:
            raise ConfigError(f"override {item!r}: duplicate key {err.key!r}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: not valid YAML: {err}") from None
        parsed.append((key.strip(), value))
    return parsed


def dataclass_from_dict(cls: type, data: dict | None, origin: str = "config", overrides: Iterable[str] = ()) -> Any:
    """Build dataclass ``cls`` from a mapping, with dotted overrides and error messages naming
    ``origin`` and the field. Calls ``validate(origin)`` when the dataclass has one."""
    data = dict(data or {})
    for key, value in parse_overrides(overrides):
        _set_dotted(data, key, value)
    obj = _build(cls, data, origin)
    validate = getattr(obj, "validate", None)
    return validate(origin) if callable(validate) else obj


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping names the same key twice; ``line`` and ``first_line`` are 1-based."""

    def __init__(self, key: Any, line: int, first_line: int, node: yaml.Node) -> None:
        super().__init__(None, None, f"duplicate key {key!r} (first at line {first_line})", node.start_mark)
        self.key, self.line, self.first_line = key, line, first_line


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key repeated in one mapping.

    Plain YAML loaders keep the last value of a repeated key without a word, so a config edited in two
    places silently runs with one of them. Keys brought in by a ``<<`` merge may still be overridden:
    that is what a merge is for."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    continue  # the base constructor reports unhashable keys with their position
                line = key_node.start_mark.line + 1
                if key in first:
                    raise DuplicateKeyError(key, line, first[key], key_node)
                first[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> Any:
    """The YAML document of ``path``, read with :class:`StrictLoader`; errors name ``file:line``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=StrictLoader)
    except DuplicateKeyError as err:
        raise ConfigError(f"{path}:{err.line}: duplicate key {err.key!r} (first at line {err.first_line}); "
                          "YAML would keep only the last value, so write the key once") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        if mark is None:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{path}: not valid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}") from err


def load_yaml_dataclass(cls: type, path: str | Path, overrides: Iterable[str] = ()) -> Any:
    """Read a YAML file into dataclass ``cls``, apply ``dotted.key=value`` overrides, validate.

    Refused, naming ``file:line``: a key repeated in one mapping, an empty file (or only comments, or
    ``{}``: an empty config is far more often a wrong or truncated file than a wish for every
    default; write one value to mean it), and a top level that is not a mapping."""
    path = Path(path)
    data = read_yaml(path)
    if data is None or data == {}:
        raise ConfigError(f"{path}:1: the config is empty (no key); a config must set at least one value")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: the top level must be a mapping, got {type(data).__name__}")
    return dataclass_from_dict(cls, data, origin=str(path), overrides=overrides)
