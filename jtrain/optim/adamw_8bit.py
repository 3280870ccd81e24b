"""Adam, AdEMAMix, Lion and RMSprop with moments stored block-wise in 8 bits (see `quantize.py`).

Per step the stored moments are dequantised to float32, updated, used for the update in
float32, and re-quantised for storage: the scheme of bitsandbytes' 8-bit optimizers, which HF's
`adamw_bnb_8bit`, `lion_8bit`, `ademamix_8bit` and `rmsprop_bnb_8bit` build, with their maps:
signed moments (Adam's and AdEMAMix's EMAs, Lion's momentum) in the signed dynamic map, second
moments v in the unsigned one, and RMSprop's v, as bitsandbytes' one-state optimizers store their
state, in the signed map. Only the stored state is low precision, never the arithmetic.

Tensors smaller than `min_8bit_size` stay float32, as in bitsandbytes (default 4096):
their state is negligible and they are often sensitive (norm scales, biases).

Rounding: jtrain stores each value as its nearest code. bitsandbytes' kernels search the map
approximately (its CPU and CUDA searches even differ from each other), so small entries of a block
can land one or more codes away; tests/test_optim_torch_parity.py measures what that leaves.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jtrain.optim.quantize import QuantizedArray, dequantize, quantize, zeros_quantized


class Adam8bitState(NamedTuple):
    """Step count, first and second moments (arrays or QuantizedArray)."""

    count: jax.Array
    mu: Any
    nu: Any


class Lion8bitState(NamedTuple):
    """Lion's single momentum (array or QuantizedArray)."""

    mu: Any


def _zeros(p: jax.Array, block_size: int, min_8bit_size: int) -> Any:
    if p.size >= min_8bit_size:
        return zeros_quantized(p.shape, block_size)
    return jnp.zeros(p.shape, jnp.float32)


def _load(stored: Any, shape: tuple[int, ...], signed: bool) -> jax.Array:
    if isinstance(stored, QuantizedArray):
        return dequantize(stored, shape, signed)
    return stored


def _store(x: jax.Array, like: Any, block_size: int, signed: bool) -> Any:
    if isinstance(like, QuantizedArray):
        return quantize(x, block_size, signed)
    return x


def _split(updates: Any, *states: Any) -> tuple[Any, list[jax.Array], list[list[Any]]]:
    """Flatten updates and align each state tree's (possibly quantised) leaves with them."""
    leaves, treedef = jax.tree.flatten(updates)
    return treedef, leaves, [treedef.flatten_up_to(s) for s in states]


def scale_by_adam_8bit(
    b1: float, b2: float, eps: float, block_size: int = 256, min_8bit_size: int = 4096
) -> optax.GradientTransformation:
    """Bias-corrected Adam direction m_hat / (sqrt(v_hat) + eps) with 8-bit moment storage."""

    def init(params):
        zeros = jax.tree.map(lambda p: _zeros(p, block_size, min_8bit_size), params)
        return Adam8bitState(jnp.zeros([], jnp.int32), zeros, zeros)

    def leaf(g, mu_s, nu_s, t):
        g = g.astype(jnp.float32)
        m = b1 * _load(mu_s, g.shape, True) + (1 - b1) * g
        v = b2 * _load(nu_s, g.shape, False) + (1 - b2) * g * g
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        u = m_hat / (jnp.sqrt(v_hat) + eps)
        return u, _store(m, mu_s, block_size, True), _store(v, nu_s, block_size, False)

    def update(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        treedef, grads, (mus, nus) = _split(updates, state.mu, state.nu)
        outs = [leaf(g, m, v, t) for g, m, v in zip(grads, mus, nus)]
        new_u = [o[0].astype(g.dtype) for o, g in zip(outs, grads)]
        unflat = lambda i: treedef.unflatten([o[i] for o in outs])  # noqa: E731
        return treedef.unflatten(new_u), Adam8bitState(count, unflat(1), unflat(2))

    return optax.GradientTransformation(init, update)


def scale_by_lion_8bit(
    b1: float, b2: float, block_size: int = 256, min_8bit_size: int = 4096
) -> optax.GradientTransformation:
    """Lion direction sign(b1*m + (1-b1)*g), momentum m stored in 8 bits."""

    def leaf(g, mu_s):
        g = g.astype(jnp.float32)
        m = _load(mu_s, g.shape, True)
        u = jnp.sign(b1 * m + (1 - b1) * g)
        return u, _store(b2 * m + (1 - b2) * g, mu_s, block_size, True)

    return _one_moment(leaf, Lion8bitState, block_size, min_8bit_size)


def _one_moment(leaf: Any, make_state: Any, block_size: int, min_8bit_size: int) -> optax.GradientTransformation:
    """A transformation whose state is one (possibly quantised) moment per parameter, `make_state(tree)`;
    `leaf(g, stored)` gives a parameter's update and its new stored moment."""

    def init(params):
        return make_state(jax.tree.map(lambda p: _zeros(p, block_size, min_8bit_size), params))

    def update(updates, state, params=None):
        del params
        treedef, grads, (stored,) = _split(updates, state[0])
        outs = [leaf(g, s) for g, s in zip(grads, stored)]
        new_u = treedef.unflatten([o[0].astype(g.dtype) for o, g in zip(outs, grads)])
        return new_u, make_state(treedef.unflatten([o[1] for o in outs]))

    return optax.GradientTransformation(init, update)


class AdEMAMix8bitState(NamedTuple):
    """Step count, fast and slow EMAs and second moments (arrays or QuantizedArray)."""

    count: jax.Array
    m1: Any
    m2: Any
    nu: Any


def scale_by_ademamix_8bit(b1: float, b2: float, b3: float, alpha: float, eps: float, block_size: int = 256,
                           min_8bit_size: int = 4096) -> optax.GradientTransformation:
    """AdEMAMix's direction (m1_hat + alpha * m2) / (sqrt(v_hat) + eps), its three moments stored in
    8 bits as bitsandbytes' AdEMAMix8bit stores them (the EMAs in the signed map, v in the unsigned)."""

    def init(params):
        zeros = jax.tree.map(lambda p: _zeros(p, block_size, min_8bit_size), params)
        return AdEMAMix8bitState(jnp.zeros([], jnp.int32), zeros, zeros, zeros)

    def leaf(g, m1_s, m2_s, nu_s, t):
        g = g.astype(jnp.float32)
        m1 = b1 * _load(m1_s, g.shape, True) + (1 - b1) * g
        m2 = b3 * _load(m2_s, g.shape, True) + (1 - b3) * g
        v = b2 * _load(nu_s, g.shape, False) + (1 - b2) * g * g
        u = (m1 / (1 - b1**t) + alpha * m2) / (jnp.sqrt(v / (1 - b2**t)) + eps)
        return (u, _store(m1, m1_s, block_size, True), _store(m2, m2_s, block_size, True),
                _store(v, nu_s, block_size, False))

    def update(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        treedef, grads, (m1s, m2s, nus) = _split(updates, state.m1, state.m2, state.nu)
        outs = [leaf(g, a, b, v, t) for g, a, b, v in zip(grads, m1s, m2s, nus)]
        new_u = [o[0].astype(g.dtype) for o, g in zip(outs, grads)]
        unflat = lambda i: treedef.unflatten([o[i] for o in outs])  # noqa: E731
        return treedef.unflatten(new_u), AdEMAMix8bitState(count, unflat(1), unflat(2), unflat(3))

    return optax.GradientTransformation(init, update)


class RMSprop8bitState(NamedTuple):
    """RMSprop's running average of squared gradients (array or QuantizedArray)."""

    nu: Any


def scale_by_rmsprop_8bit(alpha: float, eps: float, block_size: int = 256,
                          min_8bit_size: int = 4096) -> optax.GradientTransformation:
    """RMSprop's direction g / (sqrt(v) + eps), v stored in 8 bits in the signed map, as bitsandbytes'
    RMSprop8bit (a one-state optimizer) stores it."""

    def leaf(g, nu_s):
        g = g.astype(jnp.float32)
        v = alpha * _load(nu_s, g.shape, True) + (1 - alpha) * g * g
        return g / (jnp.sqrt(v) + eps), _store(v, nu_s, block_size, True)

    return _one_moment(leaf, RMSprop8bitState, block_size, min_8bit_size)
