"""Sequence (context) parallelism: activations split along the length over the `sequence` axis.

The tiny Llama runs on `sequence: 4 x data: 2` (8 fake devices) with packed rows (two documents
per row, segment ids) and right padding; loss and gradients must match a single-device run. Each
device holds a quarter of every row's positions; attention all-gathers keys and values, so each
device scores only its own query rows, and the compiled step's per-device scratch memory shrinks
accordingly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jtrain import ConfigError
from jtrain.compiled import with_activation_sharding
from jtrain.losses import causal_lm_loss
from jtrain.sharding import BATCH_AXES, ShardingRules, make_mesh, param_shardings
from tiny import padded_lm_batch, tiny_llama

LENGTH, ROWS = 128, 4
SP_MESH = {"sequence": 4, "data": 2}
# Same float32 math, different summation order: the sequence-split run sums each weight's
# gradient over 4 length shards (and 2 row shards) by all-reduce instead of inside one dot, and
# its loss sum likewise. Each such sum differs by a few ulp (float32 eps 1.2e-7). Loss: rtol 1e-6
# (~8 ulp). Gradients: rtol 1e-5 plus atol 1e-6 x the largest gradient, for entries near zero
# where cancellation leaves no relative precision. A real bug (a mask using shard-local
# positions, a document leaking into the next) moves the loss by 1e-3 or more.
LOSS_RTOL, GRAD_RTOL, GRAD_ATOL_SCALE = 1e-6, 1e-5, 1e-6


def _packed_padded_batch() -> dict:
    """Rows of two packed documents (segment ids 1, 2; the boundary differs per row), right-padded."""
    batch = padded_lm_batch(ROWS, LENGTH, seed=3, min_len=LENGTH // 2)
    boundary = np.array([20, 37, 45, 61])[:, None]  # inside the first 64 (real) tokens, off shard edges (32)
    seg = np.where(np.arange(LENGTH)[None, :] < boundary, 1, 2) * batch["attention_mask"]
    return {**batch, "segment_ids": seg.astype(np.int32)}


def _loss_and_grads(model):
    def mean_loss(p, b):
        out = causal_lm_loss(model.apply(p, b), b)
        return out.loss_sum / out.weight

    return jax.jit(jax.value_and_grad(mean_loss))


def _on_mesh(mesh_shape):
    """(model with the mesh's activation constraints, placed params, placed batch, mesh)."""
    model = tiny_llama()
    mesh = make_mesh(mesh_shape)
    run_model = with_activation_sharding(model, mesh, ShardingRules())
    params = jax.device_put(_start_params(), param_shardings(model.logical_axes(), model.abstract_params(), mesh))
    batch = jax.device_put(_packed_padded_batch(), NamedSharding(mesh, P(BATCH_AXES, "sequence")))
    return run_model, params, batch


_PARAMS: list = []


def _start_params():
    if not _PARAMS:
        _PARAMS.append(jax.device_get(tiny_llama().init(jax.random.key(0))))
    return _PARAMS[0]


def test_sequence_parallel_matches_one_device_with_packing_and_padding():
    batch = _packed_padded_batch()
    assert (batch["segment_ids"] == 2).any(axis=1).all() and (batch["attention_mask"] == 0).any()
    ref_loss, ref_grads = _loss_and_grads(tiny_llama())(_start_params(), batch)
    model, params, placed = _on_mesh(SP_MESH)
    step = _loss_and_grads(model)
    loss, grads = step(params, placed)
    assert float(loss) == pytest.approx(float(ref_loss), rel=LOSS_RTOL)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(ref_grads))
    worst = 0.0
    for (path, g), r in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(ref_grads)):
        worst = max(worst, float(jnp.abs(g - r).max()))
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=GRAD_RTOL, atol=GRAD_ATOL_SCALE * scale,
                                   err_msg=jax.tree_util.keystr(path))
    print(f"sequence 4 x data 2: loss {float(loss):.7f} vs {float(ref_loss):.7f}; max grad delta {worst:.1e} "
          f"(largest grad {scale:.1e})")

    # Attention gathers keys and values over the sequence axis (the per-device memory this saves
    # is measured in the next test).
    assert "all-gather" in step.lower(params, placed).compile().as_text()


def test_sequence_parallel_cuts_per_device_activation_memory():
    """The length that the data-parallel step needs 4x the scratch for fits a budget SP meets.

    Budget: 40% of the per-device scratch (XLA's temp allocation) of plain data parallelism over
    the same 2 row shards. Splitting the length 4 ways divides the [rows, heads, L, L] attention
    scores (the largest activation at this length) and every [rows, L, ...] activation by 4; the
    gathered keys/values and replicated weights are what keeps it above exactly 25%.
    """
    temp = {}
    for name, shape in (("data2", {"data": 2}), ("sequence4_data2", SP_MESH)):
        model, params, placed = _on_mesh(shape)
        compiled = _loss_and_grads(model).lower(params, placed).compile()
        temp[name] = compiled.memory_analysis().temp_size_in_bytes
    budget = 0.4 * temp["data2"]
    print(f"per-device scratch at length {LENGTH}: data 2 {temp['data2']} bytes, sequence 4 x data 2 "
          f"{temp['sequence4_data2']} bytes; budget {budget:.0f}")
    assert temp["sequence4_data2"] <= budget < temp["data2"]


def test_indivisible_sequence_length_is_refused_naming_the_numbers():
    model, params, _ = _on_mesh(SP_MESH)
    batch = {"input_ids": jnp.zeros((2, 18), jnp.int32)}
    with pytest.raises(ConfigError, match=r"sequence length 18 does not divide over mesh axis 'sequence' of size 4"):
        jax.eval_shape(lambda p, b: model.apply(p, b), params, batch)  # traced only: refused before compiling
