"""Block-wise 8-bit storage for optimizer moments (dynamic codebook + per-block absmax).

Each tensor is flattened, split into blocks of `block_size`, every block divided by its
absolute maximum, and each normalised value stored as the uint8 index of the nearest entry
of a fixed 256-entry codebook. The codebook is log-spaced by decade (1e-6..1) with linear
steps inside each decade and most entries in the top decades — the "dynamic tree" idea of
Dettmers et al. (8-bit optimizers, 2022): relative precision stays roughly constant over
six decades, where a linear int8 grid would round every value below absmax/255 to zero.
Storage is 1 byte per element plus 4 bytes per block (absmax, float32).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_DECADES = 7  # magnitudes down to 1e-6 of the block maximum are representable


class QuantizedArray(NamedTuple):
    """uint8 codebook indices (num_blocks, block_size) and float32 absmax per block."""

    codes: jax.Array
    absmax: jax.Array


def _decade_counts(total: int) -> list[int]:
    """Points per decade, top decade first, halving downwards, summing to `total`."""
    counts = [2 ** (_DECADES - 1 - k) for k in range(_DECADES)]
    counts[0] += total - sum(counts)
    return counts


@functools.cache
def codebook(signed: bool) -> np.ndarray:
    """256 sorted code values: 0, then +/- magnitudes in (1e-6, 1] (signed) or [0, 1]."""
    per_sign = 127 if signed else 255
    mags = []
    for k, n in enumerate(_decade_counts(per_sign)):
        steps = (np.arange(n) + 1) / n
        mags.append(10.0**-k * (0.1 + 0.9 * steps))
    pos = np.concatenate(mags)
    values = np.concatenate([-pos, [0.0], pos]) if signed else np.concatenate([[0.0], pos])
    values = np.sort(values)
    if values.size < 256:  # signed book has 255 values; pad with a duplicate of the max
        values = np.concatenate([values, values[-1:]])
    return values.astype(np.float32)


@functools.cache
def _midpoints(signed: bool) -> np.ndarray:
    book = codebook(signed)
    return ((book[1:] + book[:-1]) / 2).astype(np.float32)


def num_blocks(size: int, block_size: int) -> int:
    """Blocks needed for `size` elements (the last block is zero-padded)."""
    return -(-size // block_size)


def quantize(x: jax.Array, block_size: int, signed: bool) -> QuantizedArray:
    """Nearest-codebook-entry quantisation of `x` (any shape) per block of `block_size`."""
    flat = x.astype(jnp.float32).reshape(-1)
    nb = num_blocks(flat.size, block_size)
    blocks = jnp.pad(flat, (0, nb * block_size - flat.size)).reshape(nb, block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    safe = jnp.where(absmax > 0, absmax, 1.0)
    normed = blocks / safe[:, None]
    codes = jnp.searchsorted(jnp.asarray(_midpoints(signed)), normed).astype(jnp.uint8)
    return QuantizedArray(codes, absmax)


def dequantize(q: QuantizedArray, shape: tuple[int, ...], signed: bool) -> jax.Array:
    """float32 array of `shape` from its quantised blocks."""
    values = jnp.asarray(codebook(signed))[q.codes.astype(jnp.int32)] * q.absmax[:, None]
    size = int(np.prod(shape))
    return values.reshape(-1)[:size].reshape(shape)


def zeros_quantized(shape: tuple[int, ...], block_size: int) -> QuantizedArray:
    """Quantised zeros: any codes decode to 0 when the block's absmax is 0."""
    nb = num_blocks(int(np.prod(shape)), block_size)
    return QuantizedArray(jnp.zeros((nb, block_size), jnp.uint8), jnp.zeros((nb,), jnp.float32))
