"""Adam with moments stored in a low-precision float dtype (bfloat16 by default).

Plain round-to-nearest storage of an EMA in bfloat16 stalls: with beta2 = 0.999 the
per-step change (0.1%) is below half a bfloat16 ulp (0.2-0.4%), so a decaying second
moment never decays. Stochastic rounding keeps the stored EMA unbiased in expectation,
which is what makes bf16 optimizer state train like float32 state (as AnyPrecisionAdamW's
Kahan buffers or torchao's bf16 stochastic rounding do for the same reason).
Arithmetic is float32; only storage is low precision.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax


class AdamLowPrecisionState(NamedTuple):
    """Step count and first/second moments in their storage dtypes."""

    count: jax.Array
    mu: Any
    nu: Any


def stochastic_round_to_bf16(x: jax.Array, noise: jax.Array) -> jax.Array:
    """float32 -> bfloat16, rounding up with probability equal to the dropped fraction.

    `noise` holds uniform random uint32 of x's shape (only its low 16 bits are used).
    """
    x = x.astype(jnp.float32)
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    low = noise & jnp.uint32(0xFFFF)
    rounded = lax.bitcast_convert_type((bits + low) & jnp.uint32(0xFFFF0000), jnp.float32)
    # Non-finite values would carry into the sign bit; round those the ordinary way.
    return jnp.where(jnp.isfinite(x), rounded, x).astype(jnp.bfloat16)


def _cast(x: jax.Array, dtype: Any, noise: jax.Array | None) -> jax.Array:
    if noise is not None and jnp.dtype(dtype) == jnp.bfloat16:
        return stochastic_round_to_bf16(x, noise)
    return x.astype(dtype)


def _noise_slices(key: jax.Array, shapes: list[tuple[int, ...]]) -> list[jax.Array]:
    """One random draw for all leaves, sliced per leaf: a single threefry call compiles
    several times faster than one per leaf."""
    sizes = [int(np.prod(s)) for s in shapes]
    flat = jax.random.bits(key, (max(1, sum(sizes)),), jnp.uint32)
    offsets = np.cumsum([0] + sizes)
    return [flat[o : o + n].reshape(s) for o, n, s in zip(offsets, sizes, shapes)]


def scale_by_adam_low_precision(
    b1: float,
    b2: float,
    eps: float,
    mu_dtype: Any = jnp.bfloat16,
    nu_dtype: Any = jnp.bfloat16,
    stochastic_rounding: bool = True,
    seed: int = 0,
) -> optax.GradientTransformation:
    """torch-AdamW direction with moments stored in `mu_dtype` / `nu_dtype`."""

    def init(params):
        mu = jax.tree.map(lambda p: jnp.zeros(p.shape, mu_dtype), params)
        nu = jax.tree.map(lambda p: jnp.zeros(p.shape, nu_dtype), params)
        return AdamLowPrecisionState(jnp.zeros([], jnp.int32), mu, nu)

    def update(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        leaves, treedef = jax.tree.flatten(updates)
        mus, nus = treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)
        noise = [None] * (2 * len(leaves))
        if stochastic_rounding:
            key = jax.random.fold_in(jax.random.key(seed), count)
            noise = _noise_slices(key, [g.shape for g in leaves] * 2)
        out_u, out_m, out_v = [], [], []
        for i, (g, m, v) in enumerate(zip(leaves, mus, nus)):
            g32 = g.astype(jnp.float32)
            m32 = b1 * m.astype(jnp.float32) + (1 - b1) * g32
            v32 = b2 * v.astype(jnp.float32) + (1 - b2) * g32 * g32
            u = (m32 / (1 - b1**t)) / (jnp.sqrt(v32 / (1 - b2**t)) + eps)
            out_u.append(u.astype(g.dtype))
            out_m.append(_cast(m32, mu_dtype, noise[i]))
            out_v.append(_cast(v32, nu_dtype, noise[len(leaves) + i]))
        new_state = AdamLowPrecisionState(count, treedef.unflatten(out_m), treedef.unflatten(out_v))
        return treedef.unflatten(out_u), new_state

    return optax.GradientTransformation(init, update)
