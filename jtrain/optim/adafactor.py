"""Adafactor exactly as `transformers.optimization.Adafactor` computes it.

optax.adafactor differs from HF's in several details (it only factors dims >= 128, places
epsilons differently, and applies momentum before the lr), so a recipe tuned with HF's
`optim="adafactor"` would not transfer. This mirrors HF step for step: factored second
moment for tensors with ndim >= 2, beta2_t = 1 - t^decay_rate, update clipping by RMS,
lr (optionally relative-step and parameter-scaled) applied *before* the optional first
moment, and decoupled decay `p -= wd * lr * p` using that same lr.

HF factors each torch tensor as stored: a Linear weight is one (out, in) matrix per layer, a norm
scale or a multi-head bias one vector. jtrain's head-shaped kernels ([embed, heads, head_dim]), flat
biases kept per head ([heads, head_dim]) and scanned stacks ([layers, ...]) are therefore reshaped to
HF's tensors (`shape_of`, from the model's layout) and factored, RMS-clipped and parameter-scaled per
tensor; the factoring is symmetric, so (in, out) against torch's (out, in) changes nothing.

With `relative_step=True` HF computes its own lr and the given `learning_rate` is ignored
(HF raises if both are given; the Trainer never enables it). HF's Trainer sets
`scale_parameter=False, relative_step=False`, which are therefore the defaults here.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jtrain.optim.paths import map_with_names, named_leaves
from jtrain.optim.transforms import learning_rate_at

# (dotted name, shape) -> (the shape to factor: stacked axes then one HF tensor, how many stacked axes lead)
ShapeOf = Callable[[str, tuple[int, ...]], tuple[tuple[int, ...], int]]


class AdafactorState(NamedTuple):
    """Step count and per-leaf dicts with `row`/`col` (factored) or `v`, plus `m` (beta1)."""

    count: jax.Array
    leaves: Any


def _rms(x: jax.Array, lead: int = 0) -> jax.Array:
    """Root mean square of x, or of each of its tensors when `lead` axes stack them."""
    if lead:
        return jnp.sqrt(jnp.mean(jnp.square(x), axis=tuple(range(lead, x.ndim)), keepdims=True))
    return jnp.sqrt(jnp.mean(jnp.square(x)))


def _own_shape(name: str, shape: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    return tuple(shape), 0


def _init_leaf(p: jax.Array, use_first_moment: bool, shape: tuple[int, ...], lead: int) -> dict[str, jax.Array]:
    st: dict[str, jax.Array] = {}
    if len(shape) - lead >= 2:
        st["row"] = jnp.zeros(shape[:-1], jnp.float32)
        st["col"] = jnp.zeros(shape[:-2] + shape[-1:], jnp.float32)
    else:
        st["v"] = jnp.zeros(shape, jnp.float32)
    if use_first_moment:
        st["m"] = jnp.zeros(p.shape, jnp.float32)
    return st


def _second_moment(g: jax.Array, st: dict, beta2t: jax.Array, eps1: float) -> tuple[jax.Array, dict]:
    """Preconditioned gradient g / sqrt(V_hat) and the new second-moment state."""
    sq = g * g + eps1
    new = dict(st)
    if "row" in st:
        new["row"] = beta2t * st["row"] + (1 - beta2t) * jnp.mean(sq, axis=-1)
        new["col"] = beta2t * st["col"] + (1 - beta2t) * jnp.mean(sq, axis=-2)
        r = jax.lax.rsqrt(new["row"] / jnp.mean(new["row"], axis=-1, keepdims=True))
        c = jax.lax.rsqrt(new["col"])
        return r[..., None] * c[..., None, :] * g, new
    new["v"] = beta2t * st["v"] + (1 - beta2t) * sq
    return jax.lax.rsqrt(new["v"]) * g, new


def hf_adafactor(
    learning_rate: float | optax.Schedule,
    *,
    weight_decay: float = 0.0,
    mask: Any = None,
    eps: tuple[float, float] = (1e-30, 1e-3),
    clip_threshold: float = 1.0,
    decay_rate: float = -0.8,
    beta1: float | None = None,
    scale_parameter: bool = False,
    relative_step: bool = False,
    warmup_init: bool = False,
    shape_of: ShapeOf = _own_shape,
) -> optax.GradientTransformation:
    """HF Adafactor as a full optax optimizer (lr and masked decay included); `shape_of` gives a leaf's
    shape as HF's tensors (default: the leaf's own, one tensor).

    Example:
        >>> opt = hf_adafactor(1e-3, weight_decay=0.01, mask=decay_mask)
    """
    if warmup_init and not relative_step:
        raise ValueError("adafactor: warmup_init=True requires relative_step=True (as in HF)")

    def init(params):
        leaves = map_with_names(lambda n, p: _init_leaf(p, beta1 is not None, *shape_of(n, p.shape)), params)
        return AdafactorState(jnp.zeros([], jnp.int32), leaves)

    def base_lr(count: jax.Array) -> jax.Array:
        step = (count + 1).astype(jnp.float32)
        if relative_step:
            min_step = 1e-6 * step if warmup_init else 1e-2
            return jnp.minimum(min_step, jax.lax.rsqrt(step))
        return learning_rate_at(learning_rate, count)

    def leaf(g, p, st, decays, hf_shape, rel_lr, beta2t):
        shape, lead = hf_shape  # HF: each layer's (or expert's) tensor is a tensor of its own
        g, p32 = g.astype(jnp.float32).reshape(shape), p.astype(jnp.float32).reshape(shape)
        lr = jnp.maximum(eps[1], _rms(p32, lead)) * rel_lr if scale_parameter else rel_lr
        u, st = _second_moment(g, st, beta2t, eps[0])
        u = u / jnp.maximum(_rms(u, lead) / clip_threshold, 1.0) * lr
        if beta1 is not None:
            st["m"] = beta1 * st["m"] + (1 - beta1) * u.reshape(p.shape)
            u = st["m"].reshape(shape)
        out = -u - weight_decay * lr * p32 if (decays and weight_decay) else -u
        return out.reshape(p.shape).astype(p.dtype), st

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("adafactor needs params (for decay and parameter scaling)")
        rel_lr = base_lr(state.count)
        beta2t = 1.0 - ((state.count + 1).astype(jnp.float32) ** decay_rate)
        g_leaves, treedef = jax.tree.flatten(updates)
        p_leaves = treedef.flatten_up_to(params)
        st_leaves = treedef.flatten_up_to(state.leaves)
        masks = treedef.flatten_up_to(_resolve_mask(mask, params))
        shapes = [shape_of(name, g.shape) for name, g in named_leaves(updates)]
        outs = [leaf(*args, rel_lr, beta2t) for args in zip(g_leaves, p_leaves, st_leaves, masks, shapes)]
        new_state = AdafactorState(optax.safe_increment(state.count), treedef.unflatten([o[1] for o in outs]))
        return treedef.unflatten([o[0] for o in outs]), new_state

    return optax.GradientTransformation(init, update)


def _resolve_mask(mask: Any, params: Any) -> Any:
    if mask is None:
        return jax.tree.map(lambda _: True, params)
    return mask(params) if callable(mask) else mask
