"""Block-wise 8-bit storage for optimizer moments, as bitsandbytes' 8-bit optimizers store them.

Each tensor is flattened, split into blocks of `block_size`, every block divided by its
absolute maximum, and each normalised value stored as the uint8 index of the nearest entry
of bitsandbytes' 256-entry "dynamic" codebook (`create_dynamic_map`; Dettmers et al., 8-bit
optimizers, 2022): seven decades (1e-6..1 of the block maximum), each a linear run of values
whose count doubles with every decade upwards, so relative precision holds over six decades
where a linear int8 grid would round every value below absmax/255 to zero. The signed book
spends half its entries on negatives; the unsigned one (Adam's second moment) all on [0, 1].
Storage is 1 byte per element plus 4 bytes per block (absmax, float32).

The same book as bitsandbytes is what makes `adamw_bnb_8bit` and friends follow HF's runs. The codes'
field is named for it (`dynamic_codes`): a state saved with jtrain's earlier codebook (field `codes`)
fails orbax's structure check instead of being decoded with the wrong map.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_DECADES = 7  # magnitudes down to 1e-6 of the block maximum are representable


class QuantizedArray(NamedTuple):
    """uint8 indices into the dynamic codebook (num_blocks, block_size) and float32 absmax per block."""

    dynamic_codes: jax.Array
    absmax: jax.Array


@functools.cache
def codebook(signed: bool) -> np.ndarray:
    """bitsandbytes' dynamic map, sorted: decade k (scale 10^(k-6)) holds the midpoints of n_k equal
    steps over [0.1, 1], n_k = 2^k (signed, mirrored to the negatives) or 2^(k+1) (unsigned); then 0
    and 1. 2 x 127 + 2 = 254 + 2 = 256 entries either way."""
    values = [0.0, 1.0]
    for k in range(_DECADES):
        n = 2 ** (k if signed else k + 1)
        mids = 10.0 ** (k - (_DECADES - 1)) * (0.1 + 0.9 * (np.arange(n) + 0.5) / n)
        values += list(mids) + (list(-mids) if signed else [])
    book = np.sort(np.asarray(values, np.float64)).astype(np.float32)
    assert book.size == 256
    return book


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
    values = jnp.asarray(codebook(signed))[q.dynamic_codes.astype(jnp.int32)] * q.absmax[:, None]
    size = int(np.prod(shape))
    return values.reshape(-1)[:size].reshape(shape)


def zeros_quantized(shape: tuple[int, ...], block_size: int) -> QuantizedArray:
    """Quantised zeros: any codes decode to 0 when the block's absmax is 0."""
    nb = num_blocks(int(np.prod(shape)), block_size)
    return QuantizedArray(jnp.zeros((nb, block_size), jnp.uint8), jnp.zeros((nb,), jnp.float32))
