"""Adafactor exactly as `transformers.optimization.Adafactor` computes it.

optax.adafactor differs from HF's in several details (it only factors dims >= 128, places
epsilons differently, and applies momentum before the lr), so a recipe tuned with HF's
`optim="adafactor"` would not transfer. This mirrors HF step for step: factored second
moment for tensors with ndim >= 2, beta2_t = 1 - t^decay_rate, update clipping by RMS,
lr (optionally relative-step and parameter-scaled) applied *before* the optional first
moment, and decoupled decay `p -= wd * lr * p` using that same lr.

With `relative_step=True` HF computes its own lr and the given `learning_rate` is ignored
(HF raises if both are given; the Trainer never enables it). HF's Trainer sets
`scale_parameter=False, relative_step=False`, which are therefore the defaults here.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jtrain.optim.transforms import learning_rate_at


class AdafactorState(NamedTuple):
    """Step count and per-leaf dicts with `row`/`col` (factored) or `v`, plus `m` (beta1)."""

    count: jax.Array
    leaves: Any


def _rms(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.mean(jnp.square(x)))


def _init_leaf(p: jax.Array, use_first_moment: bool) -> dict[str, jax.Array]:
    st: dict[str, jax.Array] = {}
    if p.ndim >= 2:
        st["row"] = jnp.zeros(p.shape[:-1], jnp.float32)
        st["col"] = jnp.zeros(p.shape[:-2] + p.shape[-1:], jnp.float32)
    else:
        st["v"] = jnp.zeros(p.shape, jnp.float32)
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
) -> optax.GradientTransformation:
    """HF Adafactor as a full optax optimizer (lr and masked decay included).

    Example:
        >>> opt = hf_adafactor(1e-3, weight_decay=0.01, mask=decay_mask)
    """
    if warmup_init and not relative_step:
        raise ValueError("adafactor: warmup_init=True requires relative_step=True (as in HF)")

    def init(params):
        leaves = jax.tree.map(lambda p: _init_leaf(p, beta1 is not None), params)
        return AdafactorState(jnp.zeros([], jnp.int32), leaves)

    def base_lr(count: jax.Array) -> jax.Array:
        step = (count + 1).astype(jnp.float32)
        if relative_step:
            min_step = 1e-6 * step if warmup_init else 1e-2
            return jnp.minimum(min_step, jax.lax.rsqrt(step))
        return learning_rate_at(learning_rate, count)

    def leaf(g, p, st, decays, rel_lr, beta2t):
        g, p32 = g.astype(jnp.float32), p.astype(jnp.float32)
        lr = jnp.maximum(eps[1], _rms(p32)) * rel_lr if scale_parameter else rel_lr
        u, st = _second_moment(g, st, beta2t, eps[0])
        u = u / jnp.maximum(_rms(u) / clip_threshold, 1.0) * lr
        if beta1 is not None:
            st["m"] = beta1 * st["m"] + (1 - beta1) * u
            u = st["m"]
        out = -u - weight_decay * lr * p32 if (decays and weight_decay) else -u
        return out.astype(p.dtype), st

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("adafactor needs params (for decay and parameter scaling)")
        rel_lr = base_lr(state.count)
        beta2t = 1.0 - ((state.count + 1).astype(jnp.float32) ** decay_rate)
        g_leaves, treedef = jax.tree.flatten(updates)
        p_leaves = treedef.flatten_up_to(params)
        st_leaves = treedef.flatten_up_to(state.leaves)
        masks = treedef.flatten_up_to(_resolve_mask(mask, params))
        outs = [leaf(*args, rel_lr, beta2t) for args in zip(g_leaves, p_leaves, st_leaves, masks)]
        new_state = AdafactorState(optax.safe_increment(state.count), treedef.unflatten([o[1] for o in outs]))
        return treedef.unflatten([o[0] for o in outs]), new_state

    return optax.GradientTransformation(init, update)


def _resolve_mask(mask: Any, params: Any) -> Any:
    if mask is None:
        return jax.tree.map(lambda _: True, params)
    return mask(params) if callable(mask) else mask
