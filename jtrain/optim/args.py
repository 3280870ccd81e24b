"""`optim_args` parsing: HF's "k=v,k2=v2" string or a dict, checked against each optimizer's keys.

HF silently ignores keys an optimizer does not read; here an unknown key is an error that
names it and lists the valid ones, because a misspelt `update_proj_gap` would otherwise
train with the default and nobody would notice.
"""
from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Any

Converter = Callable[[Any], Any]


def parse_bool(value: Any) -> bool:
    """HF's spelling of booleans in optim_args strings."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ValueError(f"expected a boolean, got {value!r}")


def optional_float(value: Any) -> float | None:
    """Float, or None for the strings 'none'/'null' (Adafactor's `beta1`)."""
    if value is None or str(value).strip().lower() in ("none", "null"):
        return None
    return float(value)


def optional_str(value: Any) -> str | None:
    """String, or None for 'none'/'null'."""
    if value is None or str(value).strip().lower() in ("none", "null"):
        return None
    return str(value)


def split_optim_args(optim_args: Mapping[str, Any] | str | None) -> dict[str, Any]:
    """Turn HF's "k=v,k2=v2" (spaces ignored, as in HF) or a mapping into a dict of raw values."""
    if optim_args is None:
        return {}
    if isinstance(optim_args, Mapping):
        return dict(optim_args)
    out: dict[str, Any] = {}
    for item in optim_args.replace(" ", "").split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"optim_args item {item!r} is not of the form key=value")
        out[key] = value
    return out


def resolve_optim_args(
    optimizer: str,
    optim_args: Mapping[str, Any] | str | None,
    spec: Mapping[str, tuple[Any, Converter]],
) -> dict[str, Any]:
    """Defaults from `spec` (key -> (default, converter)) overridden by converted user values."""
    raw = split_optim_args(optim_args)
    for key in raw:
        if key not in spec:
            hint = difflib.get_close_matches(key, list(spec), n=1)
            suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
            valid = ", ".join(sorted(spec)) or "none"
            raise ValueError(
                f"unknown optim_args key {key!r} for optimizer {optimizer!r}{suggestion} "
                f"(valid keys: {valid})"
            )
    resolved = {key: default for key, (default, _) in spec.items()}
    for key, value in raw.items():
        resolved[key] = spec[key][1](value)
    return resolved
