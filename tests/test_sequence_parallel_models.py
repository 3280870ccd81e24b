"""GPT-2, BERT and Gemma under sequence parallelism (and with tensor or FSDP parallelism beside it), on 8 fake
devices, against a single-device run: the same activation layouts the Llama family uses
(`test_sequence_parallel`), now for learned-position and bidirectional models.

Tolerances are those of `test_sequence_parallel` (same float32 math, different summation order
across shards): loss rtol 1e-6, gradients rtol 1e-5 plus atol 1e-6 x the largest gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jtrain import ConfigError
from jtrain.compiled import with_activation_sharding
from jtrain.losses import LOSSES_BY_TASK
from jtrain.models import create_model
from jtrain.sharding import BATCH_AXES, ShardingRules, make_mesh, param_shardings
from tiny import padded_lm_batch

LENGTH, ROWS = 128, 4
LOSS_RTOL, GRAD_RTOL, GRAD_ATOL_SCALE = 1e-6, 1e-5, 1e-6
MODELS = {
    "gpt2": ("causal_lm", dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=LENGTH, resid_pdrop=0.0,
                               embd_pdrop=0.0, attn_pdrop=0.0)),
    # Gemma's scaled embedding rows are read from the gathered table on a mesh: the scale must follow them.
    "gemma": ("causal_lm", dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                max_position_embeddings=LENGTH)),
    "bert": ("masked_lm", dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=LENGTH, hidden_dropout_prob=0.0,
                               attention_probs_dropout_prob=0.0)),
}
MESHES = {"sequence4_data2": {"sequence": 4, "data": 2},
          "tensor2_sequence2_data2": {"tensor": 2, "sequence": 2, "data": 2},
          "fsdp2_sequence2_data2": {"fsdp": 2, "sequence": 2, "data": 2}}  # the embedding tables gathered over fsdp


def _model(model_type: str):
    task, config = MODELS[model_type]
    return create_model(model_type, config, task=task)


def _batch(model_type: str) -> dict:
    """Right-padded rows; for BERT, labels on a random 15% of the real tokens (the rest -100)."""
    batch = padded_lm_batch(ROWS, LENGTH, seed=3, min_len=LENGTH // 2)
    if model_type == "bert":
        chosen = np.random.default_rng(4).random(batch["input_ids"].shape) < 0.15
        batch["labels"] = np.where(chosen & (batch["attention_mask"] == 1), batch["input_ids"], -100).astype(np.int32)
    return batch


def _loss_and_grads(model):
    loss_fn = LOSSES_BY_TASK[model.task]

    def mean_loss(p, b):
        out = loss_fn(model.apply(p, b), b)
        return out.loss_sum / out.weight

    return jax.jit(jax.value_and_grad(mean_loss))


def _on_mesh(model_type: str, params, mesh_shape: dict):
    model = _model(model_type)
    mesh = make_mesh(mesh_shape)
    run_model = with_activation_sharding(model, mesh, ShardingRules())
    placed = jax.device_put(params, param_shardings(model.logical_axes(), model.abstract_params(), mesh))
    batch = jax.device_put(_batch(model_type), NamedSharding(mesh, P(BATCH_AXES, "sequence")))
    return run_model, placed, batch


@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("model_type", list(MODELS))
def test_split_length_matches_one_device(model_type, mesh_name):
    params = jax.device_get(_model(model_type).init(jax.random.key(0)))
    ref_loss, ref_grads = _loss_and_grads(_model(model_type))(params, _batch(model_type))
    model, placed, batch = _on_mesh(model_type, params, MESHES[mesh_name])
    step = _loss_and_grads(model)
    loss, grads = step(placed, batch)
    assert float(loss) == pytest.approx(float(ref_loss), rel=LOSS_RTOL)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(ref_grads))
    for (path, g), r in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=GRAD_RTOL, atol=GRAD_ATOL_SCALE * scale,
                                   err_msg=jax.tree_util.keystr(path))
    assert "all-gather" in step.lower(placed, batch).compile().as_text()  # keys and values over `sequence`


@pytest.mark.parametrize("model_type", list(MODELS))
def test_split_length_cuts_per_device_scratch(model_type):
    """As for Llama: splitting the length 4 ways must bring the per-device scratch (XLA's temp
    allocation) under 40% of plain data parallelism over the same 2 row shards; without the
    activation layouts GSPMD keeps every row whole on each device and the scratch stays put."""
    params = jax.device_get(_model(model_type).init(jax.random.key(0)))
    temp = {}
    for name, shape in (("data2", {"data": 2}), ("sequence4_data2", MESHES["sequence4_data2"])):
        model, placed, batch = _on_mesh(model_type, params, shape)
        temp[name] = _loss_and_grads(model).lower(placed, batch).compile().memory_analysis().temp_size_in_bytes
    assert temp["sequence4_data2"] <= 0.4 * temp["data2"], temp


@pytest.mark.parametrize("model_type", list(MODELS))
def test_indivisible_length_is_refused(model_type):
    params = jax.device_get(_model(model_type).init(jax.random.key(0)))
    model, placed, _ = _on_mesh(model_type, params, MESHES["sequence4_data2"])
    batch = {"input_ids": jnp.zeros((2, 18), jnp.int32), "attention_mask": jnp.ones((2, 18), jnp.int32)}
    with pytest.raises(ConfigError, match=r"sequence length 18 does not divide over mesh axis 'sequence' of size 4"):
        jax.eval_shape(lambda p, b: model.apply(p, b), placed, batch)
