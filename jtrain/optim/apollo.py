"""APOLLO (Zhu et al., 2024): AdamW-like steps with SGD-like memory.

For each targeted (a, b) kernel the gradient G is projected by a random Gaussian matrix
(entries N(0, 1/r), so norms are preserved in expectation) to rank r along the smaller
axis ("std"). Adam moments live only in that r-dimensional space; they are used to ask how
much Adam would rescale each channel: s_c = |Adam(R)_c| / |R_c| per channel c of the kept
axis ("channel"), or one ratio for the whole tensor ("tensor"). The update is the
*full-rank* gradient scaled by s, passed through Fira's norm-growth limiter (the update
norm may grow at most 1.01x per step) and multiplied by sqrt(scale), as the reference
implementation does (APOLLO-Mini uses rank 1, scale_type "tensor", scale 128).

As in apollo_torch, the Adam step is transformers' original one: the scaling reads the uncorrected
m / (sqrt(v) + eps), and the bias corrections sqrt(1 - b2^t) / (1 - b1^t) multiply the limited update.
Kernels are seen as HF's Linear weights (`MatrixView`, one matrix per scanned layer; see `galore`).

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

from jtrain.optim.galore import (ViewOf, as_matrices, batched_zeros, check_proj_type, low_rank_shapes,
                                 projects_left, stacked, unstacked)
from jtrain.optim.paths import map_with_names, named_leaves
from jtrain.optim.targets import PLAIN
from jtrain.optim.transforms import adam_moments, bias_correction

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
    view_of: ViewOf = lambda name: PLAIN,
) -> optax.GradientTransformation:
    """APOLLO direction for targeted kernels (use inside `optax.partition`); `view_of` maps a leaf's
    dotted name to its matrix view."""
    if scale_type not in SCALE_TYPES:
        raise ValueError(f"apollo scale_type must be one of {SCALE_TYPES}, got {scale_type!r}")
    check_proj_type(proj_type)

    def low_shape(a: int, b: int) -> tuple[int, int]:
        return low_rank_shapes(a, b, rank, projects_left(a, b, proj_type))[1]

    def init(params):
        mom = map_with_names(lambda n, p: batched_zeros(p.shape, view_of(n), low_shape), params)
        prev = map_with_names(lambda n, p: batched_zeros(p.shape, view_of(n), lambda a, b: ()), params)
        return ApolloState(jnp.zeros([], jnp.int32), mom, mom, prev)

    def one(mat, m, v, prev, key, first, left):
        p = random_projector(key, low_rank_shapes(*mat.shape, rank, left)[0])
        low = p.T @ mat if left else mat @ p
        m, v = adam_moments(m, v, low, b1, b2)
        u, norm = _limit_growth(mat * _scaling(m / (jnp.sqrt(v) + eps), low, left, scale_type), prev, first)
        return u, m, v, norm

    def leaf(g, view, m, v, prev, key, first, t):
        mats, batch = as_matrices(g.astype(jnp.float32), view)
        left = projects_left(mats.shape[1], mats.shape[2], proj_type)
        n = mats.shape[0]
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n)) if batch else key[None]
        states = (stacked(s, batch, n) for s in (m, v, prev))
        u, m, v, norm = jax.vmap(lambda *xs: one(*xs, first, left))(mats, *states, keys)
        step = math.sqrt(scale) * jnp.sqrt(bias_correction(b2, t)) / bias_correction(b1, t)
        return ((u * step).reshape(g.shape).astype(g.dtype), *(unstacked(s, batch) for s in (m, v, norm)))

    def update(updates, state, params=None):
        del params
        period_key = jax.random.fold_in(jax.random.key(seed), state.count // update_proj_gap)
        first = state.count == 0
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        treedef = jax.tree.structure(updates)
        rest = [treedef.flatten_up_to(s) for s in (state.mu, state.nu, state.prev_norm)]
        outs = [
            leaf(g, view_of(n), m, v, pn, jax.random.fold_in(period_key, i), first, t)
            for i, ((n, g), m, v, pn) in enumerate(zip(named_leaves(updates), *rest))
        ]
        trees = [treedef.unflatten([o[i] for o in outs]) for i in range(4)]
        return trees[0], ApolloState(count, *trees[1:])

    return optax.GradientTransformation(init, update)
