"""XLA flags for speed, set before the JAX backend starts.

XLA reads `XLA_FLAGS` once, when the first backend is created, and aborts the process on a flag
it does not know. So flags are merged into the environment here, before anything touches a
device, and a call after the backend exists is an error rather than a silent no-op. Which flags
help on which machine is measured by `benchmarks/ab.py` and recorded in `benchmarks/TRIED.md`:
none gained on the project's 2-core CPU, so jtrain itself sets none; the benchmark scripts use
this module for the flags they compare (and for fake CPU devices).

Example (the entry point, before the first `jax.devices()`)::

    from jtrain.xla_flags import apply_xla_flags
    apply_xla_flags(["--xla_force_host_platform_device_count=8"])
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable

from jtrain.errors import ConfigError

_FLAG = re.compile(r"^--[a-z][a-z0-9_]*(=.*)?$")


def backend_started() -> bool:
    """True once a JAX backend exists (after which XLA_FLAGS are no longer read)."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge

        return bool(getattr(xla_bridge, "_backends", {}))
    except ImportError:  # a JAX without this private module: assume the worst only if jax is imported
        return True


def merge_flags(current: str, flags: Iterable[str]) -> str:
    """`current` XLA_FLAGS with `flags` added; a flag given again replaces the earlier value."""
    merged: dict[str, str] = {}
    for flag in current.split() + [f.strip() for f in flags if f.strip()]:
        if not _FLAG.match(flag):
            raise ConfigError(f"XLA flag {flag!r} is malformed: write it as --name or --name=value")
        merged[flag.split("=", 1)[0]] = flag
    return " ".join(merged.values())


def apply_xla_flags(flags: Iterable[str], *, env: dict | None = None) -> str:
    """Add `flags` to XLA_FLAGS (in `env`, default `os.environ`); returns the new value.

    Raises ConfigError when the JAX backend already started, since XLA would ignore them.
    """
    flags = list(flags)
    env = os.environ if env is None else env
    if flags and env is os.environ and backend_started():
        raise ConfigError("XLA flags must be set before the JAX backend starts: call "
                          "jtrain.xla_flags.apply_xla_flags(...) before the first jax.devices() or jitted call "
                          f"(flags: {' '.join(flags)})")
    value = merge_flags(env.get("XLA_FLAGS", ""), flags)
    env["XLA_FLAGS"] = value
    return value
