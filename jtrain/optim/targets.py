"""Which weights GaLore/APOLLO project: HF's `optim_target_modules` matching on Flax names.

HF matches `optim_target_modules` against torch module names (`model.layers.0.mlp.up_proj`)
and keeps only `nn.Linear` weights. Here the module name is the leaf's dotted path without
its last key, and "a Linear weight" is a 2-D leaf called `kernel` (flax `nn.Dense`).
Scanned (stacked 3-D) kernels and convolutions are therefore never targeted.
"""
from __future__ import annotations

import re
from typing import Any

import jax

from jtrain.optim.paths import map_with_names

LOW_RANK = "low_rank"
FULL = "full"


def module_matches(targets: list[str] | str, module: str) -> bool:
    """HF's `check_target_module_exists`: a str is a full-match regex; a list matches by
    equality, substring, or full-match regex of any entry."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    if module in targets or any(t in module for t in targets):
        return True
    return any(re.fullmatch(t, module) is not None for t in targets)


def _is_all_linear(targets: list[str] | str) -> bool:
    return isinstance(targets, str) and targets.replace("_", "-") == "all-linear"


def low_rank_labels(params: Any, targets: list[str] | str | None, optimizer: str) -> Any:
    """Tree of LOW_RANK / FULL labels; errors like HF when nothing is (or can be) targeted."""
    if targets is None:
        raise ValueError(f"{optimizer} needs optim_target_modules (names, regexes or 'all-linear')")
    if not isinstance(targets, (str, list, tuple)):
        raise TypeError(f"optim_target_modules must be a str or list of str, got {targets!r}")
    targets = targets if isinstance(targets, str) else list(targets)
    every = _is_all_linear(targets)

    def label(name: str, leaf: Any) -> str:
        module, _, leaf_name = name.rpartition(".")
        linear = leaf_name == "kernel" and getattr(leaf, "ndim", 0) == 2
        return LOW_RANK if linear and (every or module_matches(targets, module)) else FULL

    labels = map_with_names(label, params)
    if LOW_RANK not in _leaf_values(labels):
        raise ValueError(f"No target modules found for {optimizer} ({targets!r}); only 2-D 'kernel' leaves qualify")
    return labels


def _leaf_values(tree: Any) -> set[str]:
    return set(jax.tree.leaves(tree))
