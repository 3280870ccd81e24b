"""The math of one adapted dense layer, on top of the base layer's output: LoRA's low-rank
update and DoRA's rescaling of each output feature (`jtrain.peft.lora` decides where they apply).

Shapes follow Flax kernels: A is [*in, R], B is [R, *out], the kernel [*in, *out]; `axes` are the
input's dims the layer contracts.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

MAGNITUDE = "lora_magnitude_vector"  # DoRA's trained magnitude per output feature (PEFT's name)


def contract(x: jax.Array, w: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """x contracted over `axes` with the leading dims of `w` (a kernel or A), as DenseGeneral does."""
    return jax.lax.dot_general(x, w.astype(x.dtype), ((axes, tuple(range(len(axes)))), ((), ())))


def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """x A B: the dims DenseGeneral produces (unscaled)."""
    return jnp.tensordot(contract(x, a, axes), b.astype(x.dtype), axes=1)


def weight_norm(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """DoRA's ||W + scale * A B|| over the input dims of one layer's kernel [*in, *out] -> [*out], in
    float32 (PEFT's `get_weight_norm`: the norm of each output feature's weights)."""
    n_in = a.ndim - 1
    w = kernel.astype(jnp.float32) + scale * jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1)
    return jnp.sqrt(jnp.sum(w * w, axis=tuple(range(n_in))))


def dora_output(y: jax.Array, x: jax.Array, mod: nn.Module, axes: tuple[int, ...], a: jax.Array, b: jax.Array,
                magnitude: jax.Array, scale: float, dropped: bool) -> jax.Array:
    """PEFT's DoRA forward on top of the base output `y`: (m / n) (W x + scale B A x) + bias, with the
    norm n treated as a constant (DoRA section 4.3). With dropout, x is the dropped input and W x is
    recomputed from it, as PEFT does; otherwise W x is y without its bias."""
    kernel = mod.get_variable("params", "kernel")
    norm = jax.lax.stop_gradient(weight_norm(kernel, a, b, scale))
    factor = (magnitude.astype(jnp.float32) / norm).astype(y.dtype)
    if dropped:
        base = contract(x, kernel, axes)
    else:
        bias = mod.get_variable("params", "bias") if getattr(mod, "use_bias", False) else None
        base = y if bias is None else y - bias.astype(y.dtype)
    lora = (scale * lora_delta(x, a, b, axes)).astype(y.dtype)
    return y + (factor - 1) * base.astype(y.dtype) + factor * lora
