"""Local data files through `datasets.load_dataset`, with errors that name the file and line.

`datasets` reports a broken file as "An error occurred while generating the dataset" (the
cause, deep in pyarrow, names neither file nor line). When a load fails, the file is scanned
here for the first line that is not UTF-8 (every format) or not JSON (json/jsonl), and the
`DataError` names it: `data/train.jsonl line 7: not valid JSON (Expecting ',' ...)`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from jtrain.errors import DataError

FORMATS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def file_format(path: str) -> str:
    fmt = FORMATS.get(os.path.splitext(path)[1].lower())
    if fmt is None:
        raise DataError(f"{path!r}: unknown extension; use one of {sorted(FORMATS)} (or pass the format)")
    return fmt


def locate_bad_line(path: str, fmt: str) -> str | None:
    """'<path> line N: <problem>' for the first line that is not UTF-8 (or not JSON); None if none is."""
    if fmt == "parquet" or not os.path.isfile(path):
        return None
    with open(path, "rb") as fh:
        raw = fh.read()
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as err:
            return f"{path} line {lineno}: not valid UTF-8 (byte 0x{line[err.start]:02x} at column {err.start + 1})"
    if fmt != "json":
        return None
    text = raw.decode("utf-8")
    try:
        json.loads(text)
        return None  # one valid JSON document
    except json.JSONDecodeError as whole:
        if text.lstrip().startswith("["):
            return f"{path} line {whole.lineno}: not valid JSON ({whole.msg}, column {whole.colno})"
    for lineno, line in enumerate(text.split("\n"), start=1):  # JSON Lines: one object per line
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as err:
                return f"{path} line {lineno}: not valid JSON ({err.msg}, column {err.colno})"
    return None


def load_local_dataset(data_files: str | Sequence[str] | dict, fmt: str | None = None, split: str | None = "train",
                       **kwargs: Any) -> Any:
    """`datasets.load_dataset(fmt, data_files=..., split=...)` for local files, quietly, with
    errors naming the file and line. `fmt` defaults to the extension's format.

    >>> ds = load_local_dataset("train.jsonl")            # doctest: +SKIP
    >>> splits = load_local_dataset({"train": "a.csv", "test": "b.csv"}, split=None)  # doctest: +SKIP
    """
    import datasets
    from datasets.utils import logging as ds_logging

    files = _file_list(data_files)
    for path in files:
        if not os.path.isfile(path):
            raise DataError(f"data file {path!r} not found")
    fmt = fmt or file_format(files[0])
    bars = ds_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(fmt, data_files=data_files, split=split, **kwargs)
    except Exception as err:  # datasets wraps parse errors deeply: find the line ourselves
        for path in files:
            where = locate_bad_line(path, fmt)
            if where:
                raise DataError(f"cannot read {where}: fix or remove that line") from err
        cause = err.__cause__ or err
        raise DataError(f"cannot read {', '.join(map(repr, files))} as {fmt}: {str(cause).splitlines()[0]}") from err
    finally:
        if bars:
            datasets.enable_progress_bars()


def _file_list(data_files: Any) -> list[str]:
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, dict):
        return [p for v in data_files.values() for p in _file_list(v)]
    return [str(p) for p in data_files]
