"""GaLore (Zhao et al., 2024): an optimizer (Adam, 8-bit Adam, Adafactor) in a rank-r subspace of each
targeted weight's gradient.

Each targeted kernel is seen as HF's Linear weight, a matrix of its `MatrixView` (one per scanned
layer). Its gradient G is projected onto the top-r singular vectors of the side that is reduced
("std": the input side when out >= in, as galore_torch decides on torch's (out, in) weight; "left"
and "right" name torch's sides), the inner optimizer's state lives in that (r x other) space, and
its update is projected back and multiplied by `scale`. The projector is recomputed by SVD of the
current gradient on steps 0, gap, 2*gap, ... inside `lax.cond`, so the whole update stays one
jitted function and the SVD only runs on refresh steps. The inner state is kept across refreshes,
as in galore_torch (whose AdamW is transformers' original Adam step, `transforms.scale_by_transformers_adam`).

jtrain kernels are (in, out), the transpose of torch's weight: "left" here means the input axis
(the first) is reduced, low = P^T G, which is galore_torch's "right" projection of G^T.

State per targeted matrix: projector (reduced side x r) + the inner optimizer's state of an r x (other side)
matrix (Adam: 2 moments), instead of AdamW's 2 x in x out. Untargeted leaves get the inner optimizer
itself (see builders).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jtrain.optim.paths import named_leaves
from jtrain.optim.targets import PLAIN, MatrixView

PROJ_TYPES = ("std", "reverse_std", "left", "right")
ViewOf = Callable[[str], MatrixView]


class GaloreState(NamedTuple):
    """Step count; per leaf, its matrices' projectors and the inner optimizer's state of each low-rank matrix."""

    count: jax.Array
    proj: Any
    inner: Any


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


def scale_by_galore(rank: int, update_proj_gap: int, scale: float, proj_type: str,
                    inner: optax.GradientTransformation, view_of: ViewOf = lambda name: PLAIN
                    ) -> optax.GradientTransformation:
    """GaLore around `inner`, for targeted kernels (use inside `optax.partition`); `view_of` maps a leaf's
    dotted name to its matrix view.

    `inner` steps each low-rank gradient as galore_torch's optimizer steps the projected gradient of one
    torch weight: it is initialised and updated per matrix (vmapped over a leaf's layers), with zeros as
    that matrix's params (galore_torch's 8-bit AdamW steps a zeroed copy; its Adafactor, as HF builds it,
    reads no param), and in torch's orientation (jtrain's kernels are torch's weights transposed), so that
    a block-wise 8-bit state is cut into the blocks bitsandbytes cuts. Its output, projected back, times
    `scale`, is the update: an inner optimizer that applies the learning rate (Adafactor) gives the final
    update, one that does not (Adam) a direction."""
    check_proj_type(proj_type)

    def leaf_init(name: str, p: jax.Array) -> tuple[jax.Array, Any]:
        batch, a, b = view_of(name).shape(p.shape)
        proj_shape, low_shape = low_rank_shapes(a, b, rank, projects_left(a, b, proj_type))
        n = math.prod(batch)
        state = jax.vmap(inner.init)(jnp.zeros((n,) + low_shape[::-1], jnp.float32))  # torch's orientation
        return jnp.zeros(batch + proj_shape, jnp.float32), jax.tree.map(lambda s: unstacked(s, batch), state)

    def init(params):
        treedef = jax.tree.structure(params)
        outs = [leaf_init(n, p) for n, p in named_leaves(params)]
        proj, state = (treedef.unflatten([o[i] for o in outs]) for i in (0, 1))
        return GaloreState(jnp.zeros([], jnp.int32), proj, state)

    def leaf(g, view, p_old, inner_state, refresh):
        mats, batch = as_matrices(g.astype(jnp.float32), view)
        n, a, b = mats.shape
        left = projects_left(a, b, proj_type)
        p_old = stacked(p_old, batch, n)
        r = p_old.shape[-1]
        p = jax.lax.cond(refresh, lambda: jax.vmap(lambda x: svd_projector(x, r, left))(mats), lambda: p_old)
        low = jax.vmap(lambda x, q: project(x, q, left))(mats, p)
        inner_state = jax.tree.map(lambda s: stacked(s, batch, n), inner_state)
        low = jnp.swapaxes(low, 1, 2)  # torch's orientation (see the docstring)
        u, inner_state = jax.vmap(inner.update)(low, inner_state, jnp.zeros_like(low))
        u = jnp.swapaxes(u.astype(jnp.float32), 1, 2)
        out = scale * jax.vmap(lambda x, q: project_back(x, q, left))(u, p)
        return (out.reshape(g.shape).astype(g.dtype), unstacked(p, batch),
                jax.tree.map(lambda s: unstacked(s, batch), inner_state))

    def update(updates, state, params=None):
        del params
        refresh = state.count % update_proj_gap == 0
        named = named_leaves(updates)
        treedef = jax.tree.structure(updates)
        proj = treedef.flatten_up_to(state.proj)
        inner_states = treedef.flatten_up_to(state.inner)
        outs = [leaf(g, view_of(n), p, s, refresh) for (n, g), p, s in zip(named, proj, inner_states)]
        trees = [treedef.unflatten([o[i] for o in outs]) for i in range(3)]
        return trees[0], GaloreState(optax.safe_increment(state.count), *trees[1:])

    return optax.GradientTransformation(init, update)
