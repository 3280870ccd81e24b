"""Builds jtrain's small C++ extensions once per machine and caches them, and reads the
environment settings that choose them.

Two pieces of jtrain are C++ compiled at first use with the system's `g++` (no wheel to ship per
platform): the CPU matmul custom call (`jtrain.models.cpu_gemm`) and the host buffer cache
(`jtrain.host_buffers`). Each build is cached under `JTRAIN_CACHE_DIR` (default `~/.cache/jtrain`)
as `lib<name>-<hash>.so`, the hash covering the source, the compile flags and the jaxlib version;
processes that build at once each write a temporary file and rename it into place atomically.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from jtrain.errors import ConfigError


def env_setting(env: str, allowed: Sequence[str]) -> str:
    """The environment setting `env` (default `allowed[0]`), lower-cased and checked against `allowed`."""
    value = os.environ.get(env, allowed[0]).strip().lower() or allowed[0]
    if value not in allowed:
        raise ConfigError(f"{env}={value!r} is not one of {', '.join(allowed)}")
    return value


def cache_dir() -> Path:
    return Path(os.environ.get("JTRAIN_CACHE_DIR") or Path.home() / ".cache" / "jtrain")


def build_library(source: Path, name: str, flags: Sequence[str] = (), *, without_compiler: str) -> Path:
    """Compile `source` into a shared library (cached); `without_compiler` says how to do without one."""
    import jaxlib

    flags = ["-O3", "-std=c++17", "-shared", "-fPIC", *flags]
    key = hashlib.sha256(source.read_bytes() + " ".join(flags).encode() + jaxlib.__version__.encode())
    target = cache_dir() / f"lib{name}-{key.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise ConfigError(f"no C++ compiler (g++) was found to build {source.name}; install g++ or {without_compiler}")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    cmd = [compiler, *flags, str(source), "-o", tmp]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        os.unlink(tmp)
        raise ConfigError(f"building {source.name} failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
    os.replace(tmp, target)
    return target
