"""A text corpus every Python install carries: the standard library's own source files.

Used by the quickstart and the tests so that nothing is downloaded. Documents are whole files,
in a fixed order, split into train and validation by a hash of the file name (stable across
machines and Python patch releases as long as the file exists).
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass


@dataclass(frozen=True)
class CorpusSplit:
    train: list[str]
    validation: list[str]


def stdlib_source_files(max_files: int | None = None, max_bytes_per_file: int = 200_000) -> list[str]:
    """Sorted paths of the standard library's top-level and package .py files (no tests)."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("test", "tests", "idlelib", "site-packages",
                                                             "lib2to3", "__pycache__", "ensurepip"))
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if name.endswith(".py") and os.path.getsize(path) <= max_bytes_per_file:
                paths.append(path)
    paths.sort(key=lambda p: os.path.relpath(p, root))
    return paths[:max_files] if max_files else paths


def _is_validation(rel_path: str, validation_percent: float) -> bool:
    bucket = int(hashlib.sha1(rel_path.encode()).hexdigest()[:8], 16) % 10_000
    return bucket < validation_percent * 100


def stdlib_corpus(max_files: int | None = None, validation_percent: float = 5.0) -> CorpusSplit:
    """Source texts of the standard library, split into train and validation by file."""
    root = sysconfig.get_paths()["stdlib"]
    train, val = [], []
    for path in stdlib_source_files(max_files):
        with open(path, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
        if not text.strip():
            continue
        (val if _is_validation(os.path.relpath(path, root), validation_percent) else train).append(text)
    return CorpusSplit(train=train, validation=val)
