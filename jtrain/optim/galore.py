"""GaLore (Zhao et al., 2024): Adam in a rank-r subspace of each targeted weight's gradient.

For a targeted (a, b) kernel the gradient G is projected onto the top-r singular vectors of
the side that is reduced ("std": the smaller of a, b), Adam moments live in that (r x max)
space, and the Adam direction is projected back and multiplied by `scale`. The projector is
recomputed by SVD of the current gradient on steps 0, gap, 2*gap, ... inside `lax.cond`,
so the whole update stays one jitted function and the SVD only runs on refresh steps.
Moments are kept across refreshes, as in the reference implementation.

State per targeted weight: projector (min(a,b) x r) + 2 moments of r x max(a,b), instead of
AdamW's 2 x a x b. Untargeted leaves get ordinary AdamW (see factory).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

PROJ_TYPES = ("std", "reverse_std", "left", "right")


class GaloreState(NamedTuple):
    """Step count; per-leaf projector and low-rank first/second moments."""

    count: jax.Array
    proj: Any
    mu: Any
    nu: Any


def check_proj_type(proj_type: str) -> None:
    """Fail when the optimizer is built, not at its first update."""
    if proj_type not in PROJ_TYPES:
        raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")


def projects_left(shape: tuple[int, ...], proj_type: str) -> bool:
    """True when the first axis is reduced (low-rank grad = P^T G), as GaLore picks it."""
    a, b = shape
    if proj_type == "std":
        return a < b
    if proj_type == "reverse_std":
        return a >= b
    check_proj_type(proj_type)
    return proj_type == "left"


def low_rank_shapes(shape: tuple[int, ...], rank: int, left: bool) -> tuple[tuple, tuple]:
    """(projector shape, low-rank gradient shape) for a 2-D weight."""
    a, b = shape
    r = min(rank, a, b)
    return ((a, r), (r, b)) if left else ((b, r), (a, r))


def project(g: jax.Array, p: jax.Array, left: bool) -> jax.Array:
    return p.T @ g if left else g @ p


def project_back(low: jax.Array, p: jax.Array, left: bool) -> jax.Array:
    return p @ low if left else low @ p.T


def svd_projector(g: jax.Array, rank: int, left: bool) -> jax.Array:
    """Top-`rank` left (or right) singular vectors of g, as columns."""
    u, _, vh = jnp.linalg.svd(g.astype(jnp.float32), full_matrices=False)
    return u[:, :rank] if left else vh[:rank, :].T


def scale_by_galore(
    rank: int, update_proj_gap: int, scale: float, proj_type: str, b1: float, b2: float, eps: float
) -> optax.GradientTransformation:
    """GaLore-Adam direction for 2-D leaves (use inside `optax.partition` on targeted leaves)."""
    check_proj_type(proj_type)

    def init(params):
        def shapes(p):
            return low_rank_shapes(p.shape, rank, projects_left(p.shape, proj_type))

        proj = jax.tree.map(lambda p: jnp.zeros(shapes(p)[0], jnp.float32), params)
        mom = jax.tree.map(lambda p: jnp.zeros(shapes(p)[1], jnp.float32), params)
        return GaloreState(jnp.zeros([], jnp.int32), proj, mom, mom)

    def leaf(g, p_old, m, v, refresh, t):
        left = projects_left(g.shape, proj_type)
        r = p_old.shape[1]
        g32 = g.astype(jnp.float32)
        p = jax.lax.cond(refresh, lambda: svd_projector(g32, r, left), lambda: p_old)
        low = project(g32, p, left)
        m = b1 * m + (1 - b1) * low
        v = b2 * v + (1 - b2) * low * low
        n = (m / (1 - b1**t)) / (jnp.sqrt(v / (1 - b2**t)) + eps)
        return (scale * project_back(n, p, left)).astype(g.dtype), p, m, v

    def update(updates, state, params=None):
        del params
        refresh = state.count % update_proj_gap == 0
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        leaves, treedef = jax.tree.flatten(updates)
        rest = [treedef.flatten_up_to(s) for s in (state.proj, state.mu, state.nu)]
        outs = [leaf(g, p, m, v, refresh, t) for g, p, m, v in zip(leaves, *rest)]
        trees = [treedef.unflatten([o[i] for o in outs]) for i in range(4)]
        return trees[0], GaloreState(count, *trees[1:])

    return optax.GradientTransformation(init, update)
