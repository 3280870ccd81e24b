"""Dotted path names for pytree leaves, the common currency of the name-based rules.

HF's rules (weight-decay exclusion, GaLore/APOLLO target modules) are written against
torch's dotted parameter names, so every rule here first turns a JAX key path into
`model.layers_0.self_attn.q_proj.kernel` and then applies the HF pattern unchanged.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax


def key_to_str(key: Any) -> str:
    """One path entry as text; dict keys, sequence indices and attributes all look alike."""
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_to_name(path: tuple[Any, ...]) -> str:
    """Join a JAX key path with '.', the separator HF's regexes expect."""
    return ".".join(key_to_str(k) for k in path)


def map_with_names(fn: Callable[[str, Any], Any], tree: Any) -> Any:
    """`jax.tree.map` whose function also receives the leaf's dotted name."""
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_to_name(p), x), tree)


def named_leaves(tree: Any) -> list[tuple[str, Any]]:
    """(dotted name, leaf) pairs in flattening order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(path_to_name(p), x) for p, x in flat]
