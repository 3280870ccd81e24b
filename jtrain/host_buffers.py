"""Keeps XLA:CPU's large host buffers mapped from one execution of a step to the next.

Why: XLA:CPU allocates each execution's scratch buffer (every intermediate of the step: 412 MiB for
the benchmark's 7M-parameter model, about 2 GiB for its 58M one) with glibc's posix_memalign, which maps
anything above 32 MiB fresh from the kernel and unmaps it when freed. Every training step then
faults in its intermediates page by page (about 105,000 minor faults and 0.2 s of kernel time per
tiny step on the project's 2-core machine), and the products writing those pages run at half the
speed they reach on warm memory. glibc has no setting that keeps such blocks without also keeping
everything else in one heap that fragments (measured: 1.7-2.6x the peak memory), and XLA has no
allocator hook. So `host_buffers.cc` redirects the allocation entries of XLA's own library
(`libjax_common.so`) to a small cache of mapped blocks, reused by the next request of about the
same size: the next step's identical scratch buffer (benchmarks/TRIED.md has the numbers).

What it keeps: blocks of at least `JTRAIN_CPU_BUFFER_CACHE_MIN_MB` (default 32, glibc's own mmap
ceiling, so smaller blocks stay with glibc's heap) that were freed less than 30 seconds ago, never
more bytes than were live in such blocks at their peak. Everything else, and every block XLA got
before the cache was installed, goes to glibc unchanged.

Cost: the Trainer dispatches step N+1 while step N still runs, so two scratch buffers are live at
once and both stay resident: peak memory grows by one scratch buffer (measured on the benchmark:
1.06 -> 1.5 GB tiny, 3.0 -> 4.8 GB large, for 1.2x and 1.17x faster float32 steps).

When: `install()` runs when a jtrain step is compiled for CPU devices (`jtrain.compiled`), once per
process. `JTRAIN_CPU_BUFFER_CACHE=off` leaves glibc alone; the default `auto` installs it on Linux
(x86_64 or aarch64, glibc), where it was measured, and logs why not elsewhere. It needs `g++`, like
`jtrain.models.cpu_gemm`; without one, `auto` logs that and runs without the cache.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
from pathlib import Path

from jtrain import native
from jtrain.errors import ConfigError

logger = logging.getLogger(__name__)

ENV_MODE = "JTRAIN_CPU_BUFFER_CACHE"
ENV_MIN_MB = "JTRAIN_CPU_BUFFER_CACHE_MIN_MB"
IDLE_SECONDS = 30.0
# Where XLA lives in the jaxlib wheels this runs on (the first one loaded is patched).
XLA_LIBRARIES = ("libjax_common.so", "xla_extension.so")
_SOURCE = Path(__file__).with_name("host_buffers.cc")
_STATS = ("reused", "mapped", "unmapped", "live_bytes", "cached_bytes", "peak_live_bytes")


def mode() -> str:
    """The `JTRAIN_CPU_BUFFER_CACHE` setting, checked: "auto" (default) or "off"."""
    return native.env_setting(ENV_MODE, ("auto", "off"))


def _min_bytes() -> int:
    text = os.environ.get(ENV_MIN_MB, "32").strip()
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value < 0:
        raise ConfigError(f"{ENV_MIN_MB}={text!r} must be a non-negative number of MiB (default 32)")
    return int(value * 2**20)


def _unsupported() -> str | None:
    """Why this platform is left alone, or None."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "aarch64"):
        return f"it was written for Linux on x86_64 or aarch64, not {platform.system()} on {platform.machine()}"
    if platform.libc_ver()[0] != "glibc":
        return "the C library is not glibc"
    return None


@functools.cache
def _extension() -> ctypes.CDLL:
    ext = ctypes.CDLL(str(native.build_library(_SOURCE, "jtrain_host_buffers",
                                               without_compiler=f"set {ENV_MODE}=off")))
    ext.jtrain_host_buffers_install.restype = ctypes.c_char_p
    ext.jtrain_host_buffers_install.argtypes = [ctypes.c_char_p, ctypes.c_uint64, ctypes.c_double]
    return ext


@functools.cache
def install() -> bool:
    """Install the cache into XLA's library (once per process); True if it is in place."""
    if mode() == "off":
        return False
    reason = _unsupported()
    if reason is None:
        try:
            ext = _extension()
        except (ConfigError, OSError) as err:
            reason = str(err)
    if reason is None:
        errors, min_bytes = [], _min_bytes()
        for name in XLA_LIBRARIES:
            error = ext.jtrain_host_buffers_install(name.encode(), min_bytes, IDLE_SECONDS)
            if error is None:
                logger.debug("host buffer cache installed into %s", name)
                return True
            errors.append(f"{name}: {error.decode()}")
        reason = "; ".join(errors)
    logger.info("XLA:CPU's large buffers are left to glibc (%s=auto): %s", ENV_MODE, reason)
    return False


def stats() -> dict[str, int]:
    """The cache's counters (all zero before `install`): blocks reused, mapped, unmapped; bytes live,
    cached, and the peak live."""
    if not install.cache_info().currsize or not install():
        return dict.fromkeys(_STATS, 0)
    out = (ctypes.c_uint64 * len(_STATS))()
    _extension().jtrain_host_buffers_stats(out)
    return dict(zip(_STATS, (int(v) for v in out)))
