"""Typed dataclass configs: build from dicts, apply dotted overrides, validate, hash, document.

Every config section is a plain ``@dataclass`` whose fields carry an attribute docstring (a string
literal right after the field, litgpt style). ``field_docs`` reads those docstrings back so that
``capfilt config explain`` and the tests can check every field is documented.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import inspect
import json
import textwrap
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A recipe or override is wrong; the message names the offending key."""


def _type_name(tp: Any) -> str:
    if get_origin(tp) is typing.Literal:  # the choices, as the error for a wrong one lists them
        return " | ".join(repr(choice) for choice in get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` checked (and, where lossless, converted) against the annotation ``tp``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        if type(None) in args and isinstance(value, str) and value.lower() in ("none", "null"):
            return None  # `--set filter.keep_fraction=None`: YAML reads only null or ~ as None
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"{key}: expected one of {choices}, got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        kt, vt = get_args(tp) or (Any, Any)
        return {_coerce(k, kt, key): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if value is None:  # a section left empty in YAML (`train:`): its defaults
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(
                f"{key}: expected a mapping for section {_type_name(tp)}, got {value!r}"
            )
        return from_dict(tp, value, prefix=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def unknown_key_error(cls: type, data: dict[str, Any], prefix: str = "") -> ConfigError | None:
    """The error for the first key of ``data``, or of a section within it, that ``cls`` lacks
    (None if every key is known); types are not checked."""
    names = {f.name for f in dataclasses.fields(cls)}
    hints = _hints(cls)
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            known = ", ".join(sorted(names))
            return ConfigError(f"unknown config key '{where}' (known keys here: {known})")
        if isinstance(value, dict) and dataclasses.is_dataclass(hints[key]):
            unknown = unknown_key_error(hints[key], value, where)
            if unknown is not None:
                return unknown
    return None


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ``ConfigError``."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    unknown = unknown_key_error(cls, data, prefix)
    if unknown is not None:
        raise unknown
    hints = _hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            where = f"{prefix}.{f.name}" if prefix else f.name
            value = data[f.name]
            if isinstance(value, dict) and get_origin(hints[f.name]) is dict:
                # a mapping field's entries: those given replace the default's, the others stay
                # (`--set synth.noise_mix.swap=0.9` changes one weight, not the whole mix)
                default = f.default_factory() if callable(f.default_factory) else {}
                value = {**default, **value}
            kwargs[f.name] = _coerce(value, hints[f.name], where)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as err:  # validate() names keys within its section; add the section
            if prefix:
                raise ConfigError(f"{prefix}.{err}") from None
            raise
    return obj


def check(ok: bool, key: str, rule: str, value: Any) -> None:
    """For ``validate()`` methods: raise ``ConfigError("KEY: must be RULE, got VALUE")`` unless ``ok``.

    ``key`` is the field name within its section; the loader adds the section (``train.lr``).
    """
    if not ok:
        raise ConfigError(f"{key}: must be {rule}, got {value!r}")


def to_dict(obj: Any) -> Any:
    """Plain-python (YAML/JSON-safe) view of a config."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def changed_keys(
    old: dict[str, Any], new: dict[str, Any], prefix: str = ""
) -> list[tuple[str, Any, Any]]:
    """The dotted keys whose values differ between two nested config dicts, with (old, new)
    values; a key only one side has gives ``None`` on the other."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_keys(a, b, f"{name}.")
        elif a != b:
            out.append((name, a, b))
    return out


def config_hash(obj: Any) -> str:
    """Stable short hash of a config (or any JSON-able value), for done-markers."""
    blob = json.dumps(to_dict(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into the key path and a YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{key}': value {raw!r} is not valid YAML ({err})") from None
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``dotted.key=value`` override set."""
    out = json.loads(json.dumps(data))
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return out


class _DuplicateKey(yaml.YAMLError):
    pass


class _RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: plain YAML keeps the last
    one, so a second ``train:`` section would silently drop every field of the first."""

    def construct_mapping(self, node, deep=False):
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in first_line:
                raise _DuplicateKey(
                    f"key {key!r} is given twice (lines {first_line[key]} and {line}); YAML "
                    "would keep only the last, so merge them into one"
                )
            first_line[key] = line
        return super().construct_mapping(node, deep)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    try:
        data = yaml.load(path.read_text(), Loader=_RecipeLoader)
    except _DuplicateKey as err:
        raise ConfigError(f"recipe {path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"recipe {path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping at top level")
    return data


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=None, width=100)


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass, read from its source."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    tree = ast.parse(source)
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def explain(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """Rows of (dotted key, type, doc) for every field, recursing into sections."""
    rows = []
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            rows.extend(explain(tp, prefix=f"{key}."))
        else:
            rows.append((key, _type_name(tp), docs.get(f.name, "")))
    return rows
