"""Which kernels a quantisation (or fake-quantisation) applies to, with PEFT's matching rules.

A kernel's module name is its HF dotted path without the leaf (`model.layers.0.mlp.up_proj`,
see `jtrain.models.convert.hf_name`). As in PEFT's `target_modules`: a list of names matches
a module whose name equals an entry or ends with `.` + entry (so `up_proj` or `mlp.up_proj`);
a string is a regular expression that must match the whole module name. `None` selects every
kernel except the output heads, which bitsandbytes also leaves in float by default.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from flax import traverse_util

from jtrain.errors import ConfigError
from jtrain.models.convert import hf_name

Path = tuple[str, ...]
Targets = Sequence[str] | str | None
# Task heads kept in float when no targets are given (HF's `llm_int8_skip_modules` default idea).
HEAD_MODULES = ("lm_head", "score", "classifier", "qa_outputs")


def module_name(path: Path) -> str:
    """`("model", "layers_0", "mlp", "up_proj", "kernel")` -> `model.layers.0.mlp.up_proj`."""
    return hf_name(path).rsplit(".", 1)[0]


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def select_kernels(abstract_params: Any, targets: Targets, *, what: str = "quantisation") -> list[Path]:
    """Paths of the kernels `targets` selects; ConfigError when a pattern selects nothing."""
    kernels = [p for p in traverse_util.flatten_dict(abstract_params) if p[-1] == "kernel"]
    names = {p: module_name(p) for p in kernels}
    available = sorted({n.rsplit(".", 1)[-1] for n in names.values()})
    if targets is None:
        chosen = [p for p in kernels if not any(_matches(names[p], h) or names[p].startswith(h + ".")
                                                for h in HEAD_MODULES)]
    elif isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise ConfigError(f"{what} `targets` regex {targets!r} does not compile: {e}") from e
        chosen = [p for p in kernels if pattern.fullmatch(names[p])]
        if not chosen:
            raise ConfigError(f"{what} `targets` regex {targets!r} matches no module (it must match the whole "
                              f"dotted name, e.g. {next(iter(names.values()), '?')!r}); module names: {available}")
    else:
        targets = list(targets)
        missing = [t for t in targets if not any(_matches(n, t) for n in names.values())]
        if missing:
            raise ConfigError(f"{what} `targets` {missing} match no module with a kernel; "
                              f"module names in this model: {available}")
        chosen = [p for p in kernels if any(_matches(names[p], t) for t in targets)]
    if not chosen:
        raise ConfigError(f"{what} selects no kernel in this model; pass `targets` from {available}")
    return chosen
