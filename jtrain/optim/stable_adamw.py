"""StableAdamW (Wortsman et al., 2023) as torch-optimi's `StableAdamW`, which HF's `stable_adamw` builds.

AdamW whose moments use debiased betas (so they need no bias correction afterwards) and whose rate is
divided, per tensor, by max(1, RMS(g^2 / max(v, eps^2))): Adafactor's update clipping, which keeps a
tensor from taking a large step when its gradient jumps past what its second moment has seen. The
decoupled weight decay uses that same per-tensor rate (or rate / max_lr with `decouple_lr`). A scanned
stack ([layers, ...]) holds one torch tensor per layer, each with its own RMS (`lead_of`, from the
model's layout, says how many leading axes stack them).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jtrain.optim.paths import map_with_names


class StableAdamWState(NamedTuple):
    count: jax.Array
    mu: Any
    nu: Any


def _debiased(beta: float, t: jax.Array) -> jax.Array:
    """optimi's `debias_beta`: beta * (1 - beta^(t-1)) / (1 - beta^t), written as it computes it."""
    return (beta ** t - beta) / (beta ** t - 1)


def stable_adamw(learning_rate: float | optax.Schedule, *, b1: float, b2: float, eps: float, weight_decay: float,
                 mask: Any, decouple_lr: bool = False, max_lr: float | None = None,
                 lead_of: Callable[[str], int] = lambda name: 0) -> optax.GradientTransformation:
    """The whole update (decay included, times the rate), since both depend on each tensor's RMS; `lead_of`
    gives a leaf's number of stacking axes (by dotted name)."""

    def init(params):
        return StableAdamWState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.zeros_like, params),
                                jax.tree.map(jnp.zeros_like, params))

    def update(grads, state, params):
        t = (state.count + 1).astype(jnp.float32)
        c1, c2 = 1.0 - _debiased(b1, t), 1.0 - _debiased(b2, t)
        mu = jax.tree.map(lambda m, g: m + c1 * (g - m), state.mu, grads)
        nu = jax.tree.map(lambda v, g: (1.0 - c2) * v + c2 * g * g, state.nu, grads)
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        decays = mask(params) if callable(mask) else jax.tree.map(lambda _: True, params)

        def leaf(g, m, v, p, decays_here, lead):
            ratio = jnp.mean(g * g / jnp.maximum(v, eps * eps), axis=tuple(range(lead, g.ndim)), keepdims=True)
            rate = lr / jnp.maximum(1.0, jnp.sqrt(ratio))
            decay = (rate / max_lr if decouple_lr else rate) * weight_decay if decays_here else 0.0
            return -decay * p - rate * m / (jnp.sqrt(v) + eps)

        leads = map_with_names(lambda name, g: lead_of(name), grads)
        updates = jax.tree.map(leaf, grads, mu, nu, params, decays, leads)
        return updates, StableAdamWState(optax.safe_increment(state.count), mu, nu)

    return optax.GradientTransformation(init, update)
