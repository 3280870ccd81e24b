"""GaLore (Zhao et al., 2024): Adam in a rank-r subspace of each targeted weight's gradient.

Each targeted kernel is seen as HF's Linear weight, a matrix of its `MatrixView` (one per scanned
layer). Its gradient G is projected onto the top-r singular vectors of the side that is reduced
("std": the input side when out >= in, as galore_torch decides on torch's (out, in) weight; "left"
and "right" name torch's sides), Adam moments live in that (r x other) space, and the Adam
direction is projected back and multiplied by `scale`. The projector is recomputed by SVD of the
current gradient on steps 0, gap, 2*gap, ... inside `lax.cond`, so the whole update stays one
jitted function and the SVD only runs on refresh steps. Moments are kept across refreshes and the
Adam step is transformers' original one (`transforms.transformers_adam_direction`), as in galore_torch.

jtrain kernels are (in, out), the transpose of torch's weight: "left" here means the input axis
(the first) is reduced, low = P^T G, which is galore_torch's "right" projection of G^T.

State per targeted matrix: projector (reduced side x r) + 2 moments of r x (other side), instead of
AdamW's 2 x in x out. Untargeted leaves get plain Adam (see builders).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jtrain.optim.paths import map_with_names, named_leaves
from jtrain.optim.targets import PLAIN, MatrixView
from jtrain.optim.transforms import adam_moments, transformers_adam_direction

PROJ_TYPES = ("std", "reverse_std", "left", "right")
ViewOf = Callable[[str], MatrixView]


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


def projects_left(a: int, b: int, proj_type: str) -> bool:
    """True when the input axis (a) of an (in=a, out=b) matrix is reduced (low = P^T G).

    galore_torch decides on torch's (out, in) weight: "std" reduces the input side when out >= in,
    "reverse_std" the output side then; its "right" reduces the input side, its "left" the output side."""
    if proj_type == "std":
        return b >= a
    if proj_type == "reverse_std":
        return b < a
    check_proj_type(proj_type)
    return proj_type == "right"


def low_rank_shapes(a: int, b: int, rank: int, left: bool) -> tuple[tuple[int, int], tuple[int, int]]:
    """(projector shape, low-rank gradient shape) of an (a, b) matrix."""
    r = min(rank, a, b)
    return ((a, r), (r, b)) if left else ((b, r), (a, r))


def project(g: jax.Array, p: jax.Array, left: bool) -> jax.Array:
    return p.T @ g if left else g @ p


def project_back(low: jax.Array, p: jax.Array, left: bool) -> jax.Array:
    return p @ low if left else low @ p.T


def svd_projector(g: jax.Array, rank: int, left: bool) -> jax.Array:
    """Top-`rank` singular vectors of the reduced side of g, as columns, each signed so that its largest
    entry is positive. A singular vector's sign is LAPACK's choice and differs between libraries (torch
    and JAX disagree on wide matrices) and devices; the moments kept across a refresh depend on it, so
    jtrain fixes it, and the same run gives the same projectors on every backend."""
    u, _, vh = jnp.linalg.svd(g.astype(jnp.float32), full_matrices=False)
    return canonical_signs(u[:, :rank] if left else vh[:rank, :].T)


def canonical_signs(p: jax.Array) -> jax.Array:
    """p with each column multiplied by the sign of its largest-magnitude entry."""
    largest = jnp.take_along_axis(p, jnp.argmax(jnp.abs(p), axis=0)[None, :], axis=0)
    return p * jnp.where(largest < 0, -1.0, 1.0)


def as_matrices(x: jax.Array, view: MatrixView) -> tuple[jax.Array, tuple[int, ...]]:
    """x as a stack of (in, out) matrices, and the batch shape to restore (empty for one matrix)."""
    batch, a, b = view.shape(x.shape)
    return x.reshape((-1, a, b)), batch


def stacked(state: jax.Array, batch: tuple[int, ...], n: int) -> jax.Array:
    """A per-matrix state of a leaf with matrix batch shape `batch`, as a stack of `n` (one per matrix)."""
    return state.reshape((n,) + state.shape[len(batch):])


def unstacked(state: jax.Array, batch: tuple[int, ...]) -> jax.Array:
    """`stacked`'s inverse: the stack back under the leaf's matrix batch shape (none for one matrix)."""
    return state.reshape(batch + state.shape[1:])


def batched_zeros(shape: tuple[int, ...], view: MatrixView, inner: Callable[[int, int], tuple[int, ...]]
                  ) -> jax.Array:
    """float32 zeros of `inner(a, b)` per matrix of a leaf of `shape`."""
    batch, a, b = view.shape(shape)
    return jnp.zeros(batch + inner(a, b), jnp.float32)


def scale_by_galore(rank: int, update_proj_gap: int, scale: float, proj_type: str, b1: float, b2: float,
                    eps: float, view_of: ViewOf = lambda name: PLAIN) -> optax.GradientTransformation:
    """GaLore-Adam direction for targeted kernels (use inside `optax.partition`); `view_of` maps a
    leaf's dotted name to its matrix view."""
    check_proj_type(proj_type)

    def shapes(a: int, b: int) -> tuple[tuple[int, int], tuple[int, int]]:
        return low_rank_shapes(a, b, rank, projects_left(a, b, proj_type))

    def init(params):
        proj = map_with_names(lambda n, p: batched_zeros(p.shape, view_of(n), lambda a, b: shapes(a, b)[0]), params)
        mom = map_with_names(lambda n, p: batched_zeros(p.shape, view_of(n), lambda a, b: shapes(a, b)[1]), params)
        return GaloreState(jnp.zeros([], jnp.int32), proj, mom, mom)

    def leaf(g, view, p_old, m, v, refresh, t):
        mats, batch = as_matrices(g.astype(jnp.float32), view)
        left = projects_left(mats.shape[1], mats.shape[2], proj_type)
        p_old, m, v = (stacked(s, batch, mats.shape[0]) for s in (p_old, m, v))
        r = p_old.shape[-1]
        p = jax.lax.cond(refresh, lambda: jax.vmap(lambda x: svd_projector(x, r, left))(mats), lambda: p_old)
        low = jax.vmap(lambda x, q: project(x, q, left))(mats, p)
        m, v = adam_moments(m, v, low, b1, b2)
        n = transformers_adam_direction(m, v, t, b1, b2, eps)
        out = scale * jax.vmap(lambda x, q: project_back(x, q, left))(n, p)
        return (out.reshape(g.shape).astype(g.dtype), *(unstacked(s, batch) for s in (p, m, v)))

    def update(updates, state, params=None):
        del params
        refresh = state.count % update_proj_gap == 0
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        named = named_leaves(updates)
        treedef = jax.tree.structure(updates)
        rest = [treedef.flatten_up_to(s) for s in (state.proj, state.mu, state.nu)]
        outs = [leaf(g, view_of(n), p, m, v, refresh, t) for (n, g), p, m, v in zip(named, *rest)]
        trees = [treedef.unflatten([o[i] for o in outs]) for i in range(4)]
        return trees[0], GaloreState(count, *trees[1:])

    return optax.GradientTransformation(init, update)
