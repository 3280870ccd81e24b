"""Labelled text every Python install carries: docstrings of the standard library, found with `ast`.

Why docstrings: they are real English prose written by many people, and the package a docstring
comes from (asyncio, email, tkinter, ...) is a label that needs the words to be read, so the
classification, masked-LM and SFT examples need no download and still measure something real.

Held-out data must be really held out: examples are split **by file** (all docstrings of one file
go to the same side), each group of files (one package, or the whole corpus) keeps about
`validation_percent` of its docstrings for evaluation, and a validation text that also occurs in
the training split is dropped.
"""

from __future__ import annotations

import ast
import hashlib
import os
import sysconfig
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Sequence

from jtrain.data.corpus import stdlib_source_files
from jtrain.errors import DataError

DEFAULT_CLASSES = ("asyncio", "email", "importlib", "logging", "multiprocessing", "tkinter", "unittest", "xml")
"""Packages with several files and distinctive vocabularies; each is one class."""


@dataclass(frozen=True)
class Docstring:
    """One docstring and where it comes from."""

    package: str  # top-level package or module name: "asyncio", "json", "os"
    file: str  # path relative to the standard library root
    name: str  # function, class or module name
    signature: str | None  # "def name(args):" for functions, None otherwise
    text: str


@dataclass(frozen=True)
class DocSplits:
    train: list[Docstring]
    validation: list[Docstring]


def top_package(rel_path: str) -> str:
    """`asyncio/events.py` -> `asyncio`; `json.py` -> `json`."""
    return rel_path.split(os.sep)[0].removesuffix(".py")


def _signature(node: ast.AST) -> str | None:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
        return f"{prefix} {node.name}({ast.unparse(node.args)}):"
    return None


def file_docstrings(source: str, package: str, rel_path: str, min_words: int = 3) -> list[Docstring]:
    """Docstrings of the module, its classes and functions (methods included), in source order.

    Docstrings of fewer than `min_words` words ("Return self.") say nothing about their package.
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        text = ast.get_docstring(node)
        if text and len(text.split()) >= min_words:
            name = getattr(node, "name", top_package(rel_path))
            out.append(Docstring(package, rel_path, name, _signature(node), text.strip()))
    return out


def stdlib_docstrings(packages: Sequence[str] | None = None, max_files: int | None = None) -> list[Docstring]:
    """Docstrings of the standard library (only `packages`, when given), in a fixed file order."""
    root = sysconfig.get_paths()["stdlib"]
    wanted = set(packages) if packages else None
    docs: list[Docstring] = []
    files = 0
    for path in stdlib_source_files():
        rel = os.path.relpath(path, root)
        package = top_package(rel)
        if wanted is not None and package not in wanted:
            continue
        if max_files is not None and files >= max_files:
            break
        files += 1
        with open(path, encoding="utf-8", errors="replace") as fh:
            docs.extend(file_docstrings(fh.read(), package, rel))
    if wanted:
        absent = sorted(wanted - {d.package for d in docs})
        if absent:
            raise DataError(f"no docstrings found in the standard library for {absent}; pick packages or modules "
                            f"that exist in {root} (e.g. {', '.join(DEFAULT_CLASSES[:4])})")
    return docs


def _file_hash(rel_path: str) -> int:
    return int(hashlib.sha1(rel_path.encode()).hexdigest()[:8], 16)


def validation_files(weights: dict[str, int], percent: float) -> set[str]:
    """Files whose docstrings are held out: about `percent` of the group's weight, never every file.

    Files are visited in a stable hash order; a file that would overshoot the target by half is
    skipped, so one big file (tkinter/__init__.py) cannot take most of a class.
    """
    if len(weights) < 2:
        return set()
    target = sum(weights.values()) * percent / 100.0
    chosen: set[str] = set()
    held = 0
    for rel in sorted(weights, key=_file_hash):
        if held >= target:
            break
        if held + weights[rel] <= 1.5 * target:
            chosen.add(rel)
            held += weights[rel]
    if not chosen:
        chosen.add(min(weights, key=lambda r: (weights[r], _file_hash(r))))
    return chosen


def split_by_file(docs: Iterable[Docstring], percent: float, per_package: bool) -> DocSplits:
    """Train/validation by file, per package (classification: every class is held out) or overall."""
    groups: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    docs = list(docs)
    for d in docs:
        groups[d.package if per_package else ""][d.file] += 1
    held = set().union(*(validation_files(dict(w), percent) for w in groups.values())) if groups else set()
    train = _unique(d for d in docs if d.file not in held)
    seen = {d.text for d in train}
    validation = [d for d in _unique(d for d in docs if d.file in held) if d.text not in seen]
    return DocSplits(train, validation)


def _unique(docs: Iterable[Docstring]) -> list[Docstring]:
    """First occurrence of each text (copies would count twice, or leak across labels)."""
    seen: set[str] = set()
    out = []
    for d in docs:
        if d.text not in seen:
            seen.add(d.text)
            out.append(d)
    return out


def sft_pair(doc: Docstring) -> tuple[str, str]:
    """(prompt, completion) of the stdlib SFT task: a function's docstring -> its signature."""
    summary = doc.text.split("\n\n")[0].strip()
    return f'"""{summary}"""\n', str(doc.signature)


def stdlib_source_splits(packages: Sequence[str] | None, max_files: int | None,
                         percent: float) -> tuple[list[str], list[str]]:
    """(train, validation) source texts of `packages` (whole files), held out by file as above."""
    root = sysconfig.get_paths()["stdlib"]
    texts: dict[str, str] = {}
    for path in stdlib_source_files():
        rel = os.path.relpath(path, root)
        if top_package(rel) in set(packages or ()):
            with open(path, encoding="utf-8", errors="replace") as fh:
                texts[rel] = fh.read()
    texts = {rel: text for rel, text in list(texts.items())[:max_files] if text.strip()}
    if not texts:
        raise DataError(f"no standard-library source files in {list(packages or ())}")
    held = validation_files({rel: len(text) for rel, text in texts.items()}, percent)
    return [t for r, t in texts.items() if r not in held], [t for r, t in texts.items() if r in held]
