"""Shared pieces of the benchmark scripts: the machine and versions, child-process runs, tables.

Each measured run happens in a fresh child process so that its peak RSS, thread settings and
compilation caches are its own; the child prints one `RESULT {json}` line that the parent reads.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
from collections.abc import Iterable, Sequence
from typing import Any

RESULT_PREFIX = "RESULT "
VERSIONED = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "torch", "transformers", "accelerate")


def _cpuinfo(field: str) -> str | None:
    """The value of the first `field` line of /proc/cpuinfo (None where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as fh:
            return next((line.split(":", 1)[1].strip() for line in fh if line.startswith(field)), None)
    except OSError:
        return None


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (the platform string elsewhere)."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


# CPU features that decide the CPU ratios: with AMX or AVX512-BF16, torch's bf16 matmul is several
# times faster than XLA:CPU's (benchmarks/TRIED.md, 2026-11-30); without them it is slower than its float32.
MATMUL_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_matmul_features() -> str:
    """Which of MATMUL_FEATURES /proc/cpuinfo lists ("unknown" where it cannot be read)."""
    from jtrain.models.cpu_gemm import cpu_flags  # the reader jtrain's own kernel choice uses

    present = cpu_flags()
    if not present:
        return "unknown"
    return " ".join(f for f in MATMUL_FEATURES if f in present) or "none of " + " ".join(MATMUL_FEATURES)


def cores() -> int:
    """Cores this process may run on (the affinity mask, which containers narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux reports ru_maxrss in KiB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024.0 if sys.platform != "darwin" else rss / 2**20


def emit(result: dict[str, Any]) -> None:
    """The child's answer to its parent: one line, printed last."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_child(argv: Sequence[str], env: dict[str, str] | None = None, timeout: float | None = None) -> dict:
    """Run `python argv...` in a fresh process and return its RESULT dict (stderr is passed on)."""
    cmd = [sys.executable, *argv]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}, check=False,
                          timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stdout.splitlines()[-20:])
        raise RuntimeError(f"benchmark child failed (exit {proc.returncode}): {shlex.join(cmd)}\n{tail}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_section(command: str) -> str:
    """Date, machine, versions and the exact command, as the head of RESULTS.md."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    v = versions()
    ver = ", ".join(f"{k} {v[k]}" for k in v)
    load = "n/a"
    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        pass
    return (f"- date: {now}\n- machine: {cpu_model()}, {cores()} cores available "
            f"({os.cpu_count()} logical CPUs), {platform.system()} {platform.release()}\n"
            f"- CPU matmul features: {cpu_matmul_features()}\n"
            f"- load average at the start (1, 5, 15 min): {load}\n- versions: {ver}\n"
            f"- command: `{command}`\n")


def this_command() -> str:
    return shlex.join(["python", *sys.argv])
