"""Attention masks kept as their parts, and built one block of (query rows x keys) at a time.

A dense boolean [B, 1, L, S] mask costs O(L^2) memory: 128 MB per device at 32k tokens even with
the rows split over 8 devices, and it hides from a fused kernel that a batch is purely causal (so
cuDNN's flash attention would get an additive bias and compute the masked half). `AttentionMask`
keeps what the mask is made of instead (causal or not, a sliding window, HF's `attention_mask`
marking real keys, packed documents' segment ids) and each attention path asks for what it needs:
the blocked CPU path and ring attention build only the block they are about to score, from global
positions; the fused call gets `is_causal`/`local_window_size` and no mask at all when nothing
else constrains the batch, and key-value sequence lengths when the only padding is on the right.
`DenseMask` wraps any explicit boolean array behind the same methods.

Shape letters as in `jtrain.models.attention`; True = may attend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Index = Union[int, jax.Array]  # a block's first row or key: a Python int, or traced (ring attention)


def _take(x: jax.Array, start: Index, size: int, axis: int) -> jax.Array:
    """`size` entries of `x` from `start` along `axis` (a static slice when `start` is an int)."""
    if isinstance(start, (int, np.integer)):
        return lax.slice_in_dim(x, int(start), int(start) + size, axis=axis)
    return lax.dynamic_slice_in_dim(x, start, size, axis=axis)


@jax.tree_util.register_pytree_node_class
@dataclass(frozen=True)
class AttentionMask:
    """Causal/window terms from positions, padding and documents from per-row arrays.

    `key_valid_BS` is HF's `attention_mask` (True = a real token a query may look at);
    `segment_ids_BL` gives packed rows' documents (a query sees keys of its own id only);
    `window` (Mistral, Gemma 2) lets query i see keys j with i - j < window. A Python int window
    is static (a fused kernel can take it); an array window is traced (Gemma 2's per-layer choice
    under `scan_layers`) and travels as a pytree leaf.
    """

    causal: bool
    key_valid_BS: jax.Array | None = None
    segment_ids_BL: jax.Array | None = None
    window: Any = None

    def _static_window(self) -> bool:
        """The window is absent or a Python int (aux data), not a traced array (a pytree leaf)."""
        return self.window is None or isinstance(self.window, (int, np.integer))

    def tree_flatten(self) -> tuple[tuple, tuple]:
        static_window = self._static_window()
        children = (self.key_valid_BS, self.segment_ids_BL, None if static_window else self.window)
        return children, (self.causal, self.window if static_window else None, static_window)

    @classmethod
    def tree_unflatten(cls, aux: tuple, children: tuple) -> AttentionMask:
        causal, window, static_window = aux
        key_valid, segments, traced_window = children
        return cls(causal, key_valid, segments, window if static_window else traced_window)

    @property
    def batch(self) -> int:
        """Rows the mask distinguishes: B with padding or documents, else 1 (one mask for every row)."""
        for x in (self.key_valid_BS, self.segment_ids_BL):
            if x is not None:
                return x.shape[0]
        return 1

    def with_window(self, window: Any) -> AttentionMask:
        return AttentionMask(self.causal, self.key_valid_BS, self.segment_ids_BL, window)

    def block(self, q0: Index, rows: int, k0: Index, keys: int) -> jax.Array:
        """Boolean [B|1, 1, rows, keys] for query positions q0.. and key positions k0.. (global)."""
        qi = q0 + jnp.arange(rows)[:, None]
        kj = k0 + jnp.arange(keys)[None, :]
        m = jnp.ones((rows, keys), bool)
        if self.causal:
            m = m & (qi >= kj)
        if self.window is not None:
            m = m & (qi - kj < self.window)
        m = m[None, None]
        if self.segment_ids_BL is not None:
            q_seg = _take(self.segment_ids_BL, q0, rows, 1)
            k_seg = _take(self.segment_ids_BL, k0, keys, 1)
            m = m & (q_seg[:, None, :, None] == k_seg[:, None, None, :])
        if self.key_valid_BS is not None:
            m = m & _take(self.key_valid_BS, k0, keys, 1)[:, None, None, :]
        return m

    def dense(self, rows: int, keys: int) -> jax.Array:
        """The whole [B|1, 1, L, S] mask: for the paths that need one (reference einsum, fallbacks)."""
        return self.block(0, rows, 0, keys)

    def _kernel_terms(self, rows: int, keys: int) -> dict[str, Any] | None:
        """`is_causal`/`local_window_size` for the positional terms, or None when a kernel cannot
        express them (a traced window, a bidirectional window, queries and keys of other lengths)."""
        if not self._static_window() or rows != keys or not (self.causal or self.window is None):
            return None
        return {"is_causal": self.causal, "local_window_size": None if self.window is None
                else (int(self.window) - 1, 0)}

    def fused_kwargs(self, rows: int, keys: int) -> dict[str, Any] | None:
        """Arguments for `jax.nn.dot_product_attention` that express the whole mask without an array
        (only causal and static-window terms: cuDNN's causal flash path), else None."""
        if self.key_valid_BS is not None or self.segment_ids_BL is not None:
            return None
        return self._kernel_terms(rows, keys)

    def padded_kwargs(self, rows: int, keys: int) -> tuple[jax.Array, dict[str, Any]] | None:
        """For a mask whose only per-row term is key padding: (whether every row is right-padded with at
        least one real key, the kernel arguments with `key_value_seq_lengths` that then express it).

        Right padding (the HF collators' default) and no padding at all (an all-ones `attention_mask`)
        are the common cases; the fused call can take them as sequence lengths instead of a dense mask.
        None when the mask has documents or terms a kernel cannot express."""
        terms = self._kernel_terms(rows, keys)
        if self.key_valid_BS is None or self.segment_ids_BL is not None or terms is None:
            return None
        lengths = jnp.sum(self.key_valid_BS, axis=-1, dtype=jnp.int32)
        prefix = jnp.arange(self.key_valid_BS.shape[-1])[None, :] < lengths[:, None]
        right_padded = jnp.all(prefix == self.key_valid_BS) & jnp.all(lengths > 0)
        return right_padded, {**terms, "key_value_seq_lengths": lengths}

    def ring_specs(self, batch: Any, length: Any) -> AttentionMask:
        """PartitionSpecs of the leaves inside ring attention's shard_map: the per-row arrays are
        O(L) integers, so every device holds the whole length (gathered) and cuts its own blocks."""
        spec = jax.sharding.PartitionSpec
        return AttentionMask(self.causal, None if self.key_valid_BS is None else spec(batch, None),
                             None if self.segment_ids_BL is None else spec(batch, None),
                             self.window if self._static_window() else spec())

    def ring_block(self, i: jax.Array, j: jax.Array, rows: int, keys: int) -> jax.Array:
        """Row block i against key block j (global indices in units of `rows` and `keys`), inside the
        shard_map: any block of the whole length, so the ring may hold its rows in any order."""
        return self.block(i * rows, rows, j * keys, keys)

    @property
    def any_row_order(self) -> bool:
        """`ring_block` builds a block for any global rows (from positions), not only local ones."""
        return True


@jax.tree_util.register_pytree_node_class
@dataclass(frozen=True)
class DenseMask:
    """An explicit boolean [B|1, 1, L, S] mask behind `AttentionMask`'s methods (any pattern)."""

    mask: jax.Array

    def tree_flatten(self) -> tuple[tuple, None]:
        return (self.mask,), None

    @classmethod
    def tree_unflatten(cls, aux: None, children: tuple) -> DenseMask:
        return cls(*children)

    @property
    def batch(self) -> int:
        return self.mask.shape[0]

    def block(self, q0: Index, rows: int, k0: Index, keys: int) -> jax.Array:
        return _take(_take(self.mask, q0, rows, 2), k0, keys, 3)

    def dense(self, rows: int, keys: int) -> jax.Array:
        return jnp.broadcast_to(self.mask, (self.mask.shape[0], 1, rows, keys))

    def fused_kwargs(self, rows: int, keys: int) -> None:
        return None  # any pattern: only the array itself expresses it

    def padded_kwargs(self, rows: int, keys: int) -> None:
        return None

    def ring_specs(self, batch: Any, length: Any) -> DenseMask:
        """Rows split like the queries, every key column on each device."""
        return DenseMask(jax.sharding.PartitionSpec(batch if self.mask.shape[0] > 1 else None, None, length, None))

    def ring_block(self, i: jax.Array, j: jax.Array, rows: int, keys: int) -> jax.Array:
        """This device's own rows (already local) against key block j."""
        return _take(self.mask, j * keys, keys, 3)

    @property
    def any_row_order(self) -> bool:
        """The rows arrive split contiguously with the queries: the ring must keep that order."""
        return False


Mask = Union[AttentionMask, DenseMask]


def as_mask(mask: Mask | jax.Array) -> Mask:
    """An `AttentionMask`/`DenseMask` as given; a boolean array wrapped as a `DenseMask`."""
    return mask if isinstance(mask, (AttentionMask, DenseMask)) else DenseMask(jnp.asarray(mask))


def make_attention_mask(attention_mask_BL: jax.Array | None, segment_ids_BL: jax.Array | None, *, causal: bool,
                        sliding_window: int | None = None) -> AttentionMask:
    """The mask of a batch from HF's inputs: causal or not, padding (`attention_mask`, 1 = real
    token), packed documents (segment ids 1, 2, ... per document, 0 = padding: a token attends
    only within its own document, so packing never leaks across documents) and a sliding window."""
    valid = None if attention_mask_BL is None else jnp.asarray(attention_mask_BL).astype(bool)
    return AttentionMask(causal, valid, segment_ids_BL, sliding_window)
