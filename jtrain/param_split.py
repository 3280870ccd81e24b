"""Trainable and frozen parts of one params tree.

LoRA, QLoRA and frozen layers all train a subset of the params. jtrain keeps that subset in
`TrainState.params` (differentiated, optimised) and the rest in `TrainState.frozen` (passed to
the step, never differentiated, never given optimizer state). Both are pruned copies of the
same nested-dict tree; `combine` puts them back together without copying arrays.
"""

from __future__ import annotations

from typing import Any, Callable

Path = tuple[str, ...]
Predicate = Callable[[Path], bool]


def split_params(params: Any, trainable: Predicate) -> tuple[dict, dict]:
    """(trainable part, frozen part): nested dicts holding only the leaves each side owns.

    A leaf is any non-dict value (arrays, or a quantised weight's own pytree node), so frozen
    leaves may be stored in a different form than the trainable ones.
    """

    def walk(node: Any, path: Path) -> tuple[Any, Any]:
        if not isinstance(node, dict):
            return (node, None) if trainable(path) else (None, node)
        train_part, frozen_part = {}, {}
        for key, child in node.items():
            t, f = walk(child, path + (str(key),))
            if t is not None:
                train_part[key] = t
            if f is not None:
                frozen_part[key] = f
        return (train_part or None), (frozen_part or None)

    t, f = walk(dict(params), ())
    return t or {}, f or {}


def combine(trainable: Any, frozen: Any) -> Any:
    """The full tree from its two disjoint parts (either may be None or empty)."""
    if not frozen:
        return trainable
    if not trainable:
        return frozen
    if not (isinstance(trainable, dict) and isinstance(frozen, dict)):
        raise ValueError("a parameter is both trainable and frozen")
    out = dict(frozen)
    for key, child in trainable.items():
        out[key] = combine(child, frozen[key]) if key in frozen else child
    return out


def leaf_paths(tree: Any, prefix: Path = ()) -> list[Path]:
    """Every leaf's path in a nested dict (for messages and selection)."""
    if not isinstance(tree, dict):
        return [prefix]
    return [p for key, child in tree.items() for p in leaf_paths(child, prefix + (str(key),))]
