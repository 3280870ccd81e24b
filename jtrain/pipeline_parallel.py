"""Pipeline parallelism: consecutive blocks of layers on the devices of the mesh's `stage` axis.

The schedule is GPipe's, written as plain array code inside the one compiled step. The scanned
layer stack [L, ...] (sharded over `stage` on its leading dimension by the `layers` rule, so
stage s holds layers s*L/S .. (s+1)*L/S - 1) is viewed as [S, L/S, ...]. A buffer [S, b, ...]
holds each stage's current input. Each of the M + S - 1 ticks runs every stage on its own
input at once (`jax.vmap` over the stage dimension, which GSPMD partitions over `stage`), then
shifts the buffer one stage on (`jnp.roll`, lowered to a collective-permute) and feeds the next
micro-batch into stage 0; stage S-1's output at tick t is micro-batch t - (S - 1). Autodiff
through the loop gives the backward schedule (all backward passes after all forwards, in reverse).
A stage is idle (computes on zeros that nothing reads) in S - 1 of its M + S - 1 ticks: the
bubble fraction (S - 1) / (M + S - 1).

Shape letters: S stages, M micro-batches, b rows per micro-batch, T = M + S - 1 ticks.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jtrain.errors import ConfigError
from jtrain.flop_count import useful_iterations

logger = logging.getLogger(__name__)

# stage_fn(stage_params, h_b..., row_args_b, stage_index, micro_index) -> h_b...
StageFn = Callable[[Any, jax.Array, Any, jax.Array, jax.Array], jax.Array]
Constrain = Callable[[jax.Array, tuple], jax.Array]


def bubble_fraction(stages: int, microbatches: int) -> float:
    """Share of each stage's ticks spent idle in a GPipe schedule: (S - 1) / (M + S - 1)."""
    return (stages - 1) / (microbatches + stages - 1)


def microbatch_count(stages: int, microbatches: int | None) -> int:
    """The configured M, or 2 x stages (bubble (S - 1) / (3S - 1): 1/5 for 2 stages)."""
    return 2 * stages if microbatches is None else int(microbatches)


def check_stages(num_layers: int, stages: int, rows: int, microbatches: int, row_split: int = 1) -> None:
    """Refuse a layer stack or batch that does not split evenly, naming the numbers; warn when a
    micro-batch's rows do not split over the `row_split` devices the batch axes span (data parallel):
    GSPMD then gives each of them the whole micro-batch, so they compute the same rows."""
    if num_layers % stages:
        raise ConfigError(f"{num_layers} layers do not split evenly into {stages} pipeline stages (mesh axis "
                          f"'stage' of size {stages}); use a layer count that is a multiple of {stages} or "
                          "change `mesh_shape`")
    if microbatches < 1 or rows % microbatches:
        raise ConfigError(f"a batch of {rows} rows does not split into pipeline_microbatches={microbatches} "
                          f"micro-batches; make the rows per step a multiple of {microbatches} or set the model "
                          "option `pipeline_microbatches` to a divisor of them")
    if (rows // microbatches) % row_split:
        fits = [m for m in range(microbatches, 0, -1) if rows % m == 0 and (rows // m) % row_split == 0]
        fix = (f"set the model option `pipeline_microbatches` to {fits[0]}" if fits else
               f"give each step a multiple of {row_split} rows per micro-batch")
        logger.warning("pipeline_microbatches=%d leaves %d row(s) per micro-batch, which do not split over the %d "
                       "data-parallel devices: each of them computes the same rows (the results are right, the "
                       "data parallelism is lost inside the pipeline); %s", microbatches, rows // microbatches,
                       row_split, fix)


def with_pipeline_stages(model: Any, mesh: Mesh) -> Any:
    """The model set to run `mesh.shape['stage']` pipeline stages (unchanged without a stage axis).

    Refused, before compiling: a model without pipelining support, one whose layers are not
    scanned (pipelining needs the stacked [layers, ...] params that `scan_layers=True` gives;
    the saved layout is then the same as any scanned model's).
    """
    stages = dict(mesh.shape).get("stage", 1)
    if stages == 1:
        return model
    cfg = model.config
    if not hasattr(cfg, "pipeline_stages"):
        raise ConfigError(f"mesh axis 'stage' of size {stages} asks for pipeline parallelism, which "
                          f"{type(cfg).__name__} does not support; set `stage` to 1 in `mesh_shape`")
    if not cfg.scan_layers:
        raise ConfigError(f"pipeline parallelism (mesh axis 'stage' of size {stages}) needs stacked layers: set "
                          "`model.scan_layers: true` (or create_model(..., scan_layers=True))")
    return model.with_options(pipeline_stages=stages)


def split_stages(stacked: Any, stages: int) -> Any:
    """[L, ...] layer params -> [S, L/S, ...]: stage s gets its consecutive block of layers."""
    return jax.tree.map(lambda a: a.reshape(stages, a.shape[0] // stages, *a.shape[1:]), stacked)


def to_microbatches(x: jax.Array, microbatches: int) -> jax.Array:
    """[B, ...] -> [M, B/M, ...], micro-batch m = rows m, m + M, m + 2M, ...

    Strided rather than contiguous: rows are split over the batch axes in contiguous blocks, so
    each micro-batch keeps rows on every data-parallel device and nothing moves between them.
    """
    return jnp.swapaxes(x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]), 0, 1)


def from_microbatches(x: jax.Array) -> jax.Array:
    """Inverse of `to_microbatches`."""
    return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def gpipe(stage_fn: StageFn, stage_params: Any, h: jax.Array, row_args: Any, *, stages: int,
          microbatches: int, constrain: Constrain | None = None,
          h_logical: tuple = ("batch", "length", "embed"), with_aux: bool = False) -> Any:
    """Run `stage_fn` as an S-stage GPipe pipeline over M micro-batches of `h` [B, ...].

    `stage_params` has a leading [S] dimension (see `split_stages`); `row_args` is a tree of
    per-row arrays [B, ...] (masks, positions) that travel with their micro-batch: each stage
    reads the rows of the micro-batch it holds. `constrain(x, logical)` pins the pipeline
    buffers to the mesh (stage dimension over `stage`), as the model's activation sharding does.

    With `with_aux`, `stage_fn` returns `(h, aux)`, aux a tree of per-layer, per-row values
    [L/S, b, ...] (a mixture-of-experts layer's router logits), and `gpipe` returns `(h, aux)`
    with aux leaves [L, B, ...]: every layer's values for every row, as an unpipelined layer scan
    would give them (bubble ticks dropped).
    """
    S, M = stages, microbatches
    pin = (lambda x, _: x) if constrain is None else constrain
    x_MbX = pin(to_microbatches(h, M), (None, *h_logical))
    args_M = jax.tree.map(lambda a: to_microbatches(a, M), row_args)
    feed_TbX = jnp.concatenate([x_MbX, jnp.zeros((S - 1, *x_MbX.shape[1:]), x_MbX.dtype)])
    stage_ids = jnp.arange(S)
    run_stages = jax.vmap(stage_fn, spmd_axis_name="stage")

    def tick(state_SbX: jax.Array, feed: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        x_bX, t = feed
        is_first = (stage_ids == 0).reshape(S, *([1] * x_bX.ndim))
        state_SbX = pin(jnp.where(is_first, x_bX[None], state_SbX), ("stage", *h_logical))
        micro_S = jnp.clip(t - stage_ids, 0, M - 1)  # bubble ticks read a valid row set, discarded later
        args_S = jax.tree.map(lambda a: a[micro_S], args_M)
        out = run_stages(stage_params, state_SbX, args_S, stage_ids, micro_S)
        out_SbX, aux_S = out if with_aux else (out, None)
        out_SbX = pin(out_SbX, ("stage", *h_logical))
        return jnp.roll(out_SbX, 1, axis=0), (out_SbX[S - 1], aux_S)

    init = jnp.zeros((S, *x_MbX.shape[1:]), x_MbX.dtype)
    with useful_iterations(M, M + S - 1):  # MFU counts M ticks of work: the bubble computes on zeros
        _, (last_TbX, aux_T) = jax.lax.scan(tick, init, (feed_TbX, jnp.arange(M + S - 1)))
    h_out = from_microbatches(pin(last_TbX[S - 1:], (None, *h_logical)))
    return (h_out, _aux_by_layer(aux_T, S, M)) if with_aux else h_out


def _aux_by_layer(aux_T: Any, stages: int, microbatches: int) -> Any:
    """Leaves [T, S, L/S, b, ...] collected per tick -> [L, B, ...]: stage s held micro-batch m at
    tick m + s; its layers are s*L/S + j; the rows of micro-batch m go back to their batch order."""
    m = jnp.arange(microbatches)[:, None]
    s = jnp.arange(stages)[None, :]

    def by_layer(a: jax.Array) -> jax.Array:
        valid = jnp.moveaxis(a[m + s, s], 0, 2)  # [S, L/S, M, b, ...]
        layers = valid.reshape(valid.shape[0] * valid.shape[1], *valid.shape[2:])  # [L, M, b, ...]
        return jax.vmap(from_microbatches)(layers)

    return jax.tree.map(by_layer, aux_T)
