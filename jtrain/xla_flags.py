"""XLA flags (and the other choices JAX reads once), set before the JAX backend starts.

XLA reads `XLA_FLAGS` once, when the first backend is created, and aborts the process on a flag
it does not know. So flags are merged into the environment here, before anything touches a
device, and a call after the backend exists is an error rather than a silent no-op. Which flags
help on which machine is measured by `benchmarks/ab.py` and recorded in `benchmarks/TRIED.md`:
none gained on the project's 2-core CPU, so jtrain sets none for speed; the benchmark scripts use
this module for the flags they compare (and for fake CPU devices). HF's `use_cpu` and
`full_determinism` are backend choices too (`apply_backend_choices`).

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


DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"


def apply_backend_choices(use_cpu: bool, full_determinism: bool) -> None:
    """HF's `use_cpu` and `full_determinism`, which JAX can only honour before its backend starts.

    `use_cpu` restricts JAX to its CPU platform; `full_determinism` asks XLA:GPU for deterministic
    reductions and scatters (XLA:CPU and TPU are deterministic for a given program already, and
    jtrain's randomness is all seeded PRNG keys). After the backend started, a choice that is
    already true is accepted and one that is not is refused with the way to get it.
    """
    import jax

    if not backend_started():
        if use_cpu:
            jax.config.update("jax_platforms", "cpu")
        if full_determinism and not use_cpu:
            apply_xla_flags([DETERMINISTIC_FLAG])
        return
    backend = jax.default_backend()
    if use_cpu and backend != "cpu":
        raise ConfigError(f"`use_cpu` is set but JAX already started on {backend}: build the TrainingArguments and "
                          "Trainer before any JAX computation, or run with JAX_PLATFORMS=cpu")
    if full_determinism and backend == "gpu" and DETERMINISTIC_FLAG not in os.environ.get("XLA_FLAGS", "").split():
        raise ConfigError("`full_determinism` needs XLA_FLAGS=" + DETERMINISTIC_FLAG + " before JAX starts, and JAX "
                          "already started on gpu: build the Trainer before any JAX computation, or set the flag in "
                          "the environment")
