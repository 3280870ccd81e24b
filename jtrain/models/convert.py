"""jtrain params <-> HF state-dict tensors: names and layouts, no I/O.

Naming rule: path components are joined with '.', a numbered layer `layers_3` becomes `layers.3`,
and the leaf `kernel`/`scale`/`embedding` becomes `weight` (`bias` stays). Flax modules are
named after HF's, so the rule needs no per-model table.

Layout rule: a Flax kernel is (in..., out...) while torch's `nn.Linear.weight` is (out, in), so
kernels are flattened to 2-D and transposed; GPT-2's `Conv1D` already stores (in, out), so only
the flattening applies. Biases of multi-head projections are flattened. Input axes of a kernel
are its first axis, or its first two when it starts with `heads` (output projections).
A scanned leaf (leading `layers` axis) maps to one HF tensor per layer. A stacked-experts leaf
(logical axis `expert` first, e.g. Mixtral's `block_sparse_moe/experts/w1` [E, D, F]) maps to one
linear weight per expert, `block_sparse_moe.experts.{e}.w1.weight` [F, D], as Mixtral checkpoints
store them (and transformers 5 still writes them).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from flax import traverse_util

# Layer containers made by `layers.run_layers` ("layers_3" -> "layers.3"); GPT-2's `ln_1` is not one.
_NUMBERED = re.compile(r"^(layers|layer|h)_(\d+)$")
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
# HF keys that are buffers or tied aliases, never weights of their own: dropped without a warning.
IGNORED_HF_KEYS = (
    r"\.rotary_emb\.inv_freq$", r"embeddings\.position_ids$", r"\.attn\.(bias|masked_bias)$",
    r"^lm_head\.weight$", r"\.decoder\.(weight|bias)$",
)


@dataclass(frozen=True)
class LeafMap:
    """How one jtrain leaf corresponds to HF tensors."""

    path: tuple[str, ...]
    shape: tuple[int, ...]
    hf_names: tuple[str, ...]  # one name, or one per layer for a stacked (scanned) leaf
    hf_shape: tuple[int, ...]  # shape of each HF tensor
    kind: str  # "linear" (transpose), "conv1d" (reshape only) or "plain"
    n_in: int  # number of leading kernel axes that are inputs
    stacked: bool
    experts: int = 0  # size of a stacked-experts axis (after `layers`), 0 if none

    @property
    def layer_shape(self) -> tuple[int, ...]:
        """Shape of the part of the leaf that one HF tensor holds (stacked axes removed)."""
        return self.shape[int(self.stacked) + int(self.experts > 0):]

    @property
    def jtrain_name(self) -> str:
        return "/".join(self.path)


def flatten(tree: Any) -> dict[tuple[str, ...], Any]:
    return traverse_util.flatten_dict(tree)


def unflatten(flat: dict[tuple[str, ...], Any]) -> Any:
    return traverse_util.unflatten_dict(flat)


def hf_name(path: Sequence[str]) -> str:
    """`("model", "layers_0", "mlp", "up_proj", "kernel")` -> `model.layers.0.mlp.up_proj.weight`."""
    *modules, leaf = path
    parts = [_NUMBERED.sub(r"\1.\2", m) for m in modules]
    return ".".join(parts + [_LEAF_NAMES.get(leaf, leaf)])


def layer_paths(path: tuple[str, ...], num_layers: int) -> list[tuple[str, ...]]:
    """Unscanned paths of a scanned leaf: `.../layers/layer/...` -> `.../layers_{i}/...`."""
    j = max(i for i in range(len(path) - 1) if path[i + 1] == "layer")
    return [path[:j] + (f"{path[j]}_{i}",) + path[j + 2:] for i in range(num_layers)]


def leaf_maps(abstract_params: Any, logical_specs: Any, conv1d_pattern: str | None) -> list[LeafMap]:
    """One LeafMap per parameter of a model (from its abstract params and logical axes)."""
    specs = flatten(logical_specs)
    maps = []
    for path, leaf in flatten(abstract_params).items():
        spec = tuple(specs[path])
        stacked = bool(spec) and spec[0] == "layers"
        shape = tuple(leaf.shape)
        layer_shape, layer_spec = (shape[1:], spec[1:]) if stacked else (shape, spec)
        paths = layer_paths(path, shape[0]) if stacked else [path]
        experts = layer_shape[0] if layer_spec and layer_spec[0] == "expert" else 0
        if experts:
            layer_shape, layer_spec = layer_shape[1:], layer_spec[1:]
            paths = [p[:-1] + (str(e), p[-1], "kernel") for p in paths for e in range(experts)]
        names = tuple(hf_name(p) for p in paths)
        n_in = 2 if layer_spec and layer_spec[0] == "heads" else 1
        if path[-1] == "kernel" or experts:
            kind = "conv1d" if conv1d_pattern and re.match(conv1d_pattern, names[0]) else "linear"
            fan_in, fan_out = math.prod(layer_shape[:n_in]), math.prod(layer_shape[n_in:])
            hf_shape = (fan_in, fan_out) if kind == "conv1d" else (fan_out, fan_in)
        else:
            kind = "plain"
            hf_shape = (math.prod(layer_shape),) if path[-1] == "bias" else layer_shape
        maps.append(LeafMap(path, shape, names, hf_shape, kind, n_in, stacked, experts))
    return maps


def to_leaf(m: LeafMap, tensors: Sequence[np.ndarray]) -> np.ndarray:
    """Build the jtrain leaf from its HF tensor(s) (shapes already validated)."""
    layers = []
    for t in tensors:
        if m.kind == "linear":
            t = np.asarray(t).T
        layers.append(np.asarray(t).reshape(m.layer_shape))
    return np.stack(layers).reshape(m.shape) if len(layers) > 1 or m.shape != m.layer_shape else layers[0]


def from_leaf(m: LeafMap, leaf: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """HF (name, tensor) pairs of one jtrain leaf."""
    slices = list(np.reshape(leaf, (-1, *m.layer_shape))) if m.shape != m.layer_shape else [leaf]
    out = []
    for name, x in zip(m.hf_names, slices):
        if m.kind == "plain":
            out.append((name, x.reshape(m.hf_shape)))
            continue
        fan_in = math.prod(m.layer_shape[:m.n_in])
        mat = x.reshape(fan_in, -1)
        out.append((name, np.ascontiguousarray(mat.T if m.kind == "linear" else mat)))
    return out


def canonical_keys(keys: Sequence[str], base_prefix: str) -> dict[str, str]:
    """Canonical HF name -> name stored in the checkpoint.

    Handles two older conventions: checkpoints saved from a bare body (`BertModel`, no `bert.`
    prefix) and TF-era LayerNorm names `gamma`/`beta`.
    """
    add_prefix = not any(k.startswith(base_prefix + ".") for k in keys)
    out = {}
    for k in keys:
        name = re.sub(r"(LayerNorm|layer_norm)\.gamma$", r"\1.weight", k)
        name = re.sub(r"(LayerNorm|layer_norm)\.beta$", r"\1.bias", name)
        out[f"{base_prefix}.{name}" if add_prefix else name] = k
    return out


def is_ignored(name: str) -> bool:
    return any(re.search(p, name) for p in IGNORED_HF_KEYS)
