"""Reading the JSON files users and checkpoints hand jtrain, with errors that name the file.

Every reader (model config.json, PEFT adapter_config.json, HF-style argument files, checkpoint
metadata) needs the same three refusals: a file that cannot be opened, text that is not JSON, and
JSON that is not an object. Each caller picks the error class its users catch (a bad config is a
`ConfigError`, a damaged checkpoint a `CheckpointError`).
"""

from __future__ import annotations

import json
from typing import Any

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
