"""Turn loosely typed config values (YAML, JSON, command-line strings) into typed dataclass fields.

Why: PyYAML reads `3e-4` as a string and every command-line value is a string, so the field's
declared type decides how a value is read. A value that cannot be read raises a `ConfigError`
naming the key, the expected type and the value; an unknown key names the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing
from typing import Any, Mapping, TypeVar

import yaml

from jtrain.errors import ConfigError

T = TypeVar("T")
_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


def closest_key_hint(key: str, valid: typing.Iterable[str]) -> str:
    """' (did you mean `x`?)' for the closest valid key, or '' if nothing is close."""
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f" (did you mean `{match[0]}`?)" if match else ""


def _parse_text(value: str) -> Any:
    """Parse a command-line string as YAML so that lists and dicts can be given inline."""
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def _coerce_scalar(value: Any, target: type, key: str) -> Any:
    if target is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif target is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
    elif target is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
    elif target is str:
        if isinstance(value, os.PathLike):  # output_dir=pathlib.Path(...)
            return os.fspath(value)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        return value
    raise ConfigError(f"`{key}`: expected {target.__name__}, got {value!r}")


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Coerce `value` to the type `hint` (a resolved annotation) or raise ConfigError."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            if type(None) in options:
                return None
        lists = [o for o in options if o is list or typing.get_origin(o) in (list, tuple)]
        if isinstance(value, str) and str in options and lists:
            # `str | list[str]` (HF's optim_target_modules): a string is one value (a regex, 'all-linear')
            # unless it is written as a list ("[attn, mlp]"); it is never split at commas
            parsed = _parse_text(value)
            return coerce(parsed, lists[0], key) if isinstance(parsed, list) else value
        errors = []
        # Try the narrowest types first so that "8" becomes an int in `int | float`.
        order = sorted((o for o in options if o is not type(None)), key=_type_rank)
        for option in order:
            try:
                return coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        names = " or ".join(_type_name(o) for o in options)
        raise ConfigError(f"`{key}`: expected {names}, got {value!r}")
    if origin is typing.Literal:
        allowed = typing.get_args(hint)
        if value in allowed:
            return value
        raise ConfigError(f"`{key}`: expected one of {list(allowed)}, got {value!r}")
    if isinstance(value, str) and (origin in (list, tuple, dict) or hint in (list, tuple, dict)):
        value = _parse_text(value)
    if origin in (list, tuple) or hint in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"`{key}`: expected a list, got {value!r}")
        args = typing.get_args(hint)
        item = args[0] if args else Any
        out = [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if (origin is tuple or hint is tuple) else out
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"`{key}`: expected a mapping, got {value!r}")
        return dict(value)
    if isinstance(hint, type):
        return _coerce_scalar(value, hint, key)
    return value


def _type_rank(t: Any) -> int:
    order = {bool: 0, int: 1, float: 2, str: 9}
    return order.get(t, 5)


def _type_name(t: Any) -> str:
    return getattr(t, "__name__", str(t))


def build_dataclass(cls: type[T], values: Mapping[str, Any], section: str = "") -> T:
    """Construct dataclass `cls` from a mapping, coercing each value and refusing unknown keys (with
    the closest valid key); the class's `extra_init_keys` go to its `__init__` as they are."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    prefix = f"{section}." if section else ""
    extra = getattr(cls, "extra_init_keys", frozenset())  # keys the class's own __init__ types and checks
    kwargs = {}
    for key, value in values.items():
        if key in extra:
            kwargs[key] = value
            continue
        if key not in names:
            raise ConfigError(f"unknown key `{prefix}{key}`{closest_key_hint(key, names)}")
        kwargs[key] = coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def dataclass_to_dict(obj: Any) -> dict:
    """JSON-safe dict of a dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(obj), default=str))
