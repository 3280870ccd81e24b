"""Reading the JSON files users and checkpoints hand jtrain, with errors that name the file, and
writing JSON files so that a crash never leaves half of one.

Every reader (model config.json, PEFT adapter_config.json, HF-style argument files, checkpoint
metadata) needs the same three refusals: a file that cannot be opened, text that is not JSON, and
JSON that is not an object. Each caller picks the error class its users catch (a bad config is a
`ConfigError`, a damaged checkpoint a `CheckpointError`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from jtrain.errors import ConfigError


def read_json_object(path: str, *, what: str = "a JSON file", error: type[Exception] = ConfigError) -> dict[str, Any]:
    """The JSON object stored at `path`; `error` naming the file when it is unreadable, not JSON, or
    not an object. Example: `read_json_object("out/adapter_config.json", what="a PEFT adapter config")`."""
    try:
        with open(path, encoding="utf-8") as fh:
            values = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise error(f"{path}: cannot read {what} ({err})") from err
    if not isinstance(values, dict):
        raise error(f"{path}: {what} must hold a JSON object, got {type(values).__name__}")
    return values


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """`write(tmp)` to a temporary file, flush it to disk, then rename: a reader (or a resume after
    a crash, even of the machine) sees the old file or the whole new one, never a prefix."""
    tmp = path + ".tmp"
    write(tmp)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_json(path: str, value: Any, *, indent: int = 2, default: Callable[[Any], Any] | None = None) -> None:
    """`value` as sorted-key JSON with a trailing newline, written atomically (`atomic_write`)."""

    def dump(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(value, fh, indent=indent, sort_keys=True, default=default)
            fh.write("\n")

    atomic_write(path, dump)
