"""Which weights GaLore/APOLLO project: HF's `optim_target_modules` matching on Flax names.

HF matches `optim_target_modules` against torch module names (`model.layers.0.mlp.up_proj`)
and keeps only `nn.Linear` weights. Here the module name is the leaf's dotted path without
its last key, and "a Linear weight" is a 2-D leaf called `kernel` (flax `nn.Dense`).
Scanned (stacked 3-D) kernels, convolutions and the attention projections jtrain's models keep
head-shaped (`DenseGeneral`, [embed, heads, head_dim]) are therefore never targeted, where HF
projects the attention's Linear weights: a target that selects one of them is named in a warning.
"""
from __future__ import annotations

import functools
import logging
import re
from typing import Any

import jax

from jtrain.optim.paths import map_with_names

LOW_RANK = "low_rank"
FULL = "full"
logger = logging.getLogger(__name__)


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

    skipped = []

    def label(name: str, leaf: Any) -> str:
        module, _, leaf_name = name.rpartition(".")
        if leaf_name != "kernel" or not (every or module_matches(targets, module)):
            return FULL
        if getattr(leaf, "ndim", 0) != 2:
            skipped.append(module)
            return FULL
        return LOW_RANK

    labels = map_with_names(label, params)
    if skipped:
        _warn_full_rank(optimizer, tuple(skipped))
    if LOW_RANK not in _leaf_values(labels):
        raise ValueError(f"No target modules found for {optimizer} ({targets!r}); only 2-D 'kernel' leaves qualify"
                         + (f" (selected but not 2-D: {', '.join(skipped[:4])})" if skipped else ""))
    return labels


@functools.cache
def _warn_full_rank(optimizer: str, modules: tuple[str, ...]) -> None:
    """Once per set (the labels are computed at init and again when the update is traced)."""
    logger.warning("%s: optim_target_modules selects %d kernel(s) that are not 2-D, which get plain Adam instead of "
                   "the low-rank projection (HF projects every selected nn.Linear): %s%s", optimizer, len(modules),
                   ", ".join(modules[:4]), ", ..." if len(modules) > 4 else "")


def _leaf_values(tree: Any) -> set[str]:
    return set(jax.tree.leaves(tree))
