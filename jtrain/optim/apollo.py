"""APOLLO (Zhu et al., 2024): AdamW-like steps with SGD-like memory.

For each targeted (a, b) kernel the gradient G is projected by a random Gaussian matrix
(entries N(0, 1/r), so norms are preserved in expectation) to rank r along the smaller
axis ("std"). Adam moments live only in that r-dimensional space; they are used to ask how
much Adam would rescale each channel: s_c = |Adam(R)_c| / |R_c| per channel c of the kept
axis ("channel"), or one ratio for the whole tensor ("tensor"). The update is the
*full-rank* gradient scaled by s, passed through Fira's norm-growth limiter (the update
norm may grow at most 1.01x per step) and multiplied by sqrt(scale), as the reference
implementation does (APOLLO-Mini uses rank 1, scale_type "tensor", scale 128).

The projection is redrawn every `update_proj_gap` steps. Rather than storing it, it is
regenerated each step from a key folded with `step // update_proj_gap`: the same matrices
as a stored projector, no projector memory, and trivially jit-compatible.
Moments are kept across redraws, as in the reference implementation.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jtrain.optim.galore import check_proj_type, low_rank_shapes, projects_left

SCALE_TYPES = ("channel", "tensor")
_TINY = 1e-8  # the reference implementation's guard against dividing by a zero norm


class ApolloState(NamedTuple):
    """Step count; per-leaf low-rank moments and the previous update norm (limiter)."""

    count: jax.Array
    mu: Any
    nu: Any
    prev_norm: Any


def random_projector(key: jax.Array, shape: tuple[int, int]) -> jax.Array:
    """Gaussian (reduced_dim, r) matrix with entry variance 1/r (norm-preserving on average)."""
    return jax.random.normal(key, shape, jnp.float32) / math.sqrt(shape[1])


def _scaling(n: jax.Array, low: jax.Array, left: bool, scale_type: str) -> jax.Array:
    """Adam's per-channel (or per-tensor) rescaling of the low-rank gradient."""
    if scale_type == "tensor":
        return jnp.linalg.norm(n) / (jnp.linalg.norm(low) + _TINY)
    axis = 0 if left else 1  # reduce over the rank axis
    s = jnp.linalg.norm(n, axis=axis) / (jnp.linalg.norm(low, axis=axis) + _TINY)
    return s[None, :] if left else s[:, None]


def _limit_growth(u: jax.Array, prev: jax.Array, first: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Fira's norm-growth limiter: divide by max(|u| / |u_prev|, 1.01) / 1.01 after step 1."""
    norm = jnp.linalg.norm(u)
    limiter = jnp.where(first, 1.0, jnp.maximum(norm / (prev + _TINY), 1.01) / 1.01)
    return u / limiter, norm / limiter


def scale_by_apollo(
    rank: int,
    update_proj_gap: int,
    scale: float,
    scale_type: str,
    proj_type: str,
    b1: float,
    b2: float,
    eps: float,
    seed: int = 0,
) -> optax.GradientTransformation:
    """APOLLO direction for 2-D leaves (use inside `optax.partition` on targeted leaves)."""
    if scale_type not in SCALE_TYPES:
        raise ValueError(f"apollo scale_type must be one of {SCALE_TYPES}, got {scale_type!r}")
    check_proj_type(proj_type)

    def init(params):
        def low(p):
            shape = low_rank_shapes(p.shape, rank, projects_left(p.shape, proj_type))[1]
            return jnp.zeros(shape, jnp.float32)

        mom = jax.tree.map(low, params)
        prev = jax.tree.map(lambda _: jnp.zeros([], jnp.float32), params)
        return ApolloState(jnp.zeros([], jnp.int32), mom, mom, prev)

    def leaf(g, m, v, prev, key, first, t):
        left = projects_left(g.shape, proj_type)
        p_shape = low_rank_shapes(g.shape, rank, left)[0]
        p = random_projector(key, p_shape)
        g32 = g.astype(jnp.float32)
        low = p.T @ g32 if left else g32 @ p
        m = b1 * m + (1 - b1) * low
        v = b2 * v + (1 - b2) * low * low
        n = (m / (1 - b1**t)) / (jnp.sqrt(v / (1 - b2**t)) + eps)
        u, norm = _limit_growth(g32 * _scaling(n, low, left, scale_type), prev, first)
        return (u * math.sqrt(scale)).astype(g.dtype), m, v, norm

    def update(updates, state, params=None):
        del params
        period_key = jax.random.fold_in(jax.random.key(seed), state.count // update_proj_gap)
        first = state.count == 0
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        leaves, treedef = jax.tree.flatten(updates)
        rest = [treedef.flatten_up_to(s) for s in (state.mu, state.nu, state.prev_norm)]
        outs = [
            leaf(g, m, v, pn, jax.random.fold_in(period_key, i), first, t)
            for i, (g, m, v, pn) in enumerate(zip(leaves, *rest))
        ]
        trees = [treedef.unflatten([o[i] for o in outs]) for i in range(4)]
        return trees[0], ApolloState(count, *trees[1:])

    return optax.GradientTransformation(init, update)
