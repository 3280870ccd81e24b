"""Weight quantisation formats: NF4 (QLoRA), int8 and int4, as pytree nodes.

A quantised weight keeps the leading dims of the float weight and packs along the last axis
only, so the float weight's logical sharding spec applies unchanged to its codes (and to its
scales): an FSDP/tensor-sharded kernel stays sharded when it is stored quantised.

- ``nf4``: the 16 NormalFloat levels of QLoRA (Dettmers et al., 2023), scaled by the absmax
  of each block of ``block_size`` (64) consecutive values along the last axis. With
  ``double_quant`` the float32 absmax values are themselves stored as int8 (block 256 over
  the flattened scales, after subtracting their mean): 4 + 8/64 + 32/16384 ~ 4.127 bits/param
  instead of 4 + 32/64 = 4.5.
- ``int8`` / ``int4``: symmetric linear codes in [-127, 127] / [-7, 7] with a float32 scale
  per output channel (``block_size=None``: max over the kernel's input axes) or per block of
  ``block_size`` along the last axis.

Shape letters are not used here: a weight is ``(..., N)`` with N its last dimension.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jtrain.errors import ConfigError
from jtrain.memory import tree_nbytes

# The 16 NF4 levels published with QLoRA: quantiles of N(0, 1) for 8 positive and 7 negative
# equal-probability bins (offset 0.9677), an exact zero, normalised to [-1, 1].
# tests/test_quant.py re-derives them from the normal quantile function.
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], dtype=np.float32)

FORMATS = ("nf4", "int8", "int4")
_QMAX = {"int8": 127, "int4": 7}
DOUBLE_QUANT_BLOCK = 256


@dataclass(frozen=True)
class QuantFormat:
    """How weights are stored. ``block_size=None`` means per-output-channel scales (int8/int4)."""

    name: str = "nf4"
    block_size: int | None = 64
    double_quant: bool = False

    def __post_init__(self) -> None:
        if self.name not in FORMATS:
            raise ConfigError(f"unknown quantisation format {self.name!r}; valid formats: {list(FORMATS)}")
        if self.name == "nf4" and self.block_size is None:
            raise ConfigError("format 'nf4' needs a `block_size` (block-wise absmax, 64 in QLoRA); "
                              "per-channel scales exist only for int8/int4")
        if self.block_size is not None and (self.block_size < 2 or self.block_size % 2):
            raise ConfigError(f"`block_size` must be an even integer >= 2 (or None for per-channel "
                              f"int8/int4), got {self.block_size}")
        if self.double_quant and self.name != "nf4":
            raise ConfigError("`double_quant` applies to format 'nf4' only")

    @property
    def bits(self) -> int:
        return 8 if self.name == "int8" else 4


def as_format(fmt: str | QuantFormat, **options: Any) -> QuantFormat:
    """A QuantFormat from a name ('nf4', 'int8', 'int4') or an existing format.

    Names default to QLoRA's NF4 block 64 and to per-channel int8/int4 scales."""
    if isinstance(fmt, QuantFormat):
        return fmt
    if not isinstance(fmt, str):
        raise ConfigError(f"quantisation format must be a name {list(FORMATS)} or a QuantFormat, got {fmt!r}")
    if fmt not in FORMATS:
        raise ConfigError(f"unknown quantisation format {fmt!r}; valid formats: {list(FORMATS)}")
    options.setdefault("block_size", 64 if fmt == "nf4" else None)
    return QuantFormat(fmt, **options)


class QuantizedTensor(flax.struct.PyTreeNode):
    """A quantised weight: codes, scales and (double quantisation) the scales' own scales.

    ``codes``: (..., N) int8 for int8; (..., N // 2) uint8 for 4-bit formats, two codes per
    byte (element 2j in the low nibble, 2j+1 in the high one). ``scales``: float32 per block
    (..., N // block_size), per channel (the weight's shape with input axes set to 1), or, with
    double quantisation, int8 codes of (absmax - ``offset``) whose float32 scales ``scales2``
    cover blocks of 256 consecutive entries of the flattened absmax array.
    ``shape`` and ``dtype_name`` are the float weight's. There is deliberately no ``dtype``
    attribute: code that tests ``x.dtype`` for a float array must not take a node for one.
    """

    codes: jax.Array
    scales: jax.Array
    scales2: jax.Array | None = None
    offset: jax.Array | None = None
    fmt: str = flax.struct.field(pytree_node=False, default="nf4")
    block_size: int | None = flax.struct.field(pytree_node=False, default=64)
    shape: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())
    dtype_name: str = flax.struct.field(pytree_node=False, default="float32")

    @property
    def float_dtype(self) -> np.dtype:
        return jnp.dtype(self.dtype_name)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def double_quant(self) -> bool:
        return self.scales2 is not None


def input_axes(ndim: int, n_in: int = 1, stacked: bool = False) -> tuple[int, ...]:
    """Axes reduced by per-channel scales: the kernel's input axes (after a stacked layer axis)."""
    first = 1 if stacked else 0
    return tuple(range(first, min(first + n_in, ndim - 1) if ndim > 1 else 1))


def check_quantizable(shape: Sequence[int], fmt: QuantFormat, name: str = "weight") -> None:
    """ConfigError naming `name` and its shape when `fmt` cannot store it along the last axis."""
    if not shape:
        raise ConfigError(f"cannot quantise scalar parameter `{name}`")
    last = shape[-1]
    if fmt.block_size is not None and last % fmt.block_size:
        raise ConfigError(f"`{name}` of shape {tuple(shape)}: block_size {fmt.block_size} does not divide its "
                          f"last dimension {last}; choose a block_size that divides {last}, or exclude the "
                          "module from the quantisation targets")
    if fmt.bits == 4 and last % 2:
        raise ConfigError(f"`{name}` of shape {tuple(shape)}: 4-bit codes are packed two per byte along the "
                          f"last dimension, which must be even (got {last})")


def _pack(nibbles: jax.Array) -> jax.Array:
    pairs = nibbles.astype(jnp.uint8).reshape(*nibbles.shape[:-1], nibbles.shape[-1] // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def _unpack(packed: jax.Array) -> jax.Array:
    both = jnp.stack([packed & 0xF, packed >> 4], axis=-1)
    return both.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def _blocks(x: jax.Array, block: int) -> jax.Array:
    return x.reshape(*x.shape[:-1], x.shape[-1] // block, block)


def _absmax(w: jax.Array, fmt: QuantFormat, reduce_axes: tuple[int, ...]) -> jax.Array:
    """Per-block (..., N // B) or per-channel (keepdims over `reduce_axes`) max of |w|."""
    if fmt.block_size is None:
        return jnp.max(jnp.abs(w), axis=reduce_axes, keepdims=True)
    return jnp.max(jnp.abs(_blocks(w, fmt.block_size)), axis=-1)


def _expand(scale: jax.Array, fmt_block: int | None, like: jax.Array) -> jax.Array:
    """Scales broadcast to the weight's shape."""
    if fmt_block is None:
        return scale
    return jnp.repeat(scale, fmt_block, axis=-1, total_repeat_length=like.shape[-1])


def _double_quantize(absmax: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """int8 codes of absmax - mean, with one float32 scale per 256 flattened entries."""
    offset = jnp.mean(absmax)
    centred = (absmax - offset).reshape(-1)
    n_blocks = -(-centred.size // DOUBLE_QUANT_BLOCK)
    padded = jnp.pad(centred, (0, n_blocks * DOUBLE_QUANT_BLOCK - centred.size)).reshape(n_blocks, -1)
    scales2 = jnp.max(jnp.abs(padded), axis=1) / 127.0
    safe = jnp.where(scales2 > 0, scales2, 1.0)
    codes = jnp.clip(jnp.round(padded / safe[:, None]), -127, 127).astype(jnp.int8)
    return codes.reshape(-1)[: centred.size].reshape(absmax.shape), scales2, offset


def _double_dequantize(q: QuantizedTensor) -> jax.Array:
    """The float32 absmax back from its int8 codes; elementwise, so sharded codes stay sharded."""
    flat_index = jax.lax.broadcasted_iota(jnp.int32, q.scales.shape, 0)
    for axis in range(1, q.scales.ndim):
        flat_index = flat_index * q.scales.shape[axis] + jax.lax.broadcasted_iota(jnp.int32, q.scales.shape, axis)
    block_scale = jnp.take(q.scales2, flat_index // DOUBLE_QUANT_BLOCK)
    return q.scales.astype(jnp.float32) * block_scale + q.offset


def quantize(w: jax.Array, fmt: str | QuantFormat = "nf4", *, reduce_axes: Sequence[int] | None = None,
             name: str = "weight") -> QuantizedTensor:
    """Quantise one float weight.

    `reduce_axes` are the input axes that per-channel scales (``block_size=None``) reduce over;
    default: every axis but the last. Block-wise formats use blocks along the last axis.

    Example::

        q = quantize(kernel, "nf4")          # block 64, 4.5 bits/param
        w = dequantize(q, jnp.bfloat16)
    """
    fmt = as_format(fmt)
    shape = tuple(w.shape)
    check_quantizable(shape, fmt, name)
    axes = tuple(range(len(shape) - 1)) if reduce_axes is None else tuple(reduce_axes)
    if fmt.block_size is None and (not axes or any(not 0 <= a < len(shape) - 1 for a in axes)):
        raise ConfigError(f"`{name}` of shape {shape}: per-channel scales need input axes among the "
                          f"leading ones, got {axes}; use a block_size for 1-D weights")
    x = w.astype(jnp.float32)
    absmax = _absmax(x, fmt, axes)
    if fmt.name == "nf4":
        safe = jnp.where(absmax > 0, absmax, 1.0)
        normed = x / _expand(safe, fmt.block_size, x)
        mids = jnp.asarray((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2)
        codes = _pack(jnp.searchsorted(mids, normed))
        scales = absmax
    else:
        qmax = _QMAX[fmt.name]
        scales = absmax / qmax
        safe = jnp.where(scales > 0, scales, 1.0)
        ints = jnp.clip(jnp.round(x / _expand(safe, fmt.block_size, x)), -qmax, qmax)
        codes = ints.astype(jnp.int8) if fmt.name == "int8" else _pack(ints + 8)
    scales2 = offset = None
    if fmt.double_quant:
        scales, scales2, offset = _double_quantize(scales)
    return QuantizedTensor(codes=codes, scales=scales, scales2=scales2, offset=offset, fmt=fmt.name,
                           block_size=fmt.block_size, shape=shape, dtype_name=jnp.dtype(w.dtype).name)


def dequantize(q: QuantizedTensor, dtype: Any = None) -> jax.Array:
    """The float weight a QuantizedTensor stands for, in `dtype` (default: the original dtype)."""
    scales = _double_dequantize(q) if q.double_quant else q.scales.astype(jnp.float32)
    if q.fmt == "nf4":
        values = jnp.asarray(NF4_LEVELS)[_unpack(q.codes).astype(jnp.int32)]
    elif q.fmt == "int4":
        values = _unpack(q.codes).astype(jnp.float32) - 8.0
    else:
        values = q.codes.astype(jnp.float32)
    w = values * _expand(scales, q.block_size, values)
    return w.astype(q.float_dtype if dtype is None else dtype)


def storage_bits_per_param(q: QuantizedTensor) -> float:
    """Stored bits per weight element, scales included (NF4 block 64: 4.5; with double quant ~4.127)."""
    return 8.0 * tree_nbytes(q) / q.size


def quantized_spec(q: QuantizedTensor, spec: Any) -> QuantizedTensor:
    """PartitionSpecs for `q`'s arrays derived from the float weight's logical `spec`.

    Codes keep every axis name (their last axis is the packed last axis). Scales keep a name
    only where they are not of size 1 (per-channel scales collapse the input axes); the small
    double-quantisation arrays are replicated."""
    from jax.sharding import PartitionSpec as P

    names = tuple(spec) + (None,) * (len(q.shape) - len(tuple(spec)))
    scale_names = tuple(n if d != 1 else None for n, d in zip(names, q.scales.shape))
    return q.replace(codes=P(*names), scales=P(*scale_names),
                     scales2=None if q.scales2 is None else P(None),
                     offset=None if q.offset is None else P())
