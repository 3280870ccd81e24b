"""The model-FLOP counter behind MFU (jtrain.flop_count) against hand counts.

Each expected number is written out from the shapes (2 FLOPs per multiply-add), independently of
the counter's code; integer-valued float counts compare exactly. The cuDNN attention count, which
needs JAX's cuDNN path traced as if on a GPU, is checked in tests/test_gpu_lowering.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jtrain.flop_count import jaxpr_flops, traced_flops, useful_iterations
from jtrain.flops import step_flops
from tiny import TINY_LLAMA, tiny_llama


def _count(fn, *args) -> float:
    return jaxpr_flops(jax.make_jaxpr(fn)(*args))


def test_matrix_products_count_two_flops_per_multiply_add():
    a, b = jnp.ones((3, 5, 7)), jnp.ones((3, 7, 11))
    assert _count(lambda x, y: x @ y, a, b) == 2 * 3 * 5 * 7 * 11  # batched
    assert _count(lambda x, y: jnp.einsum("bij,bjk->ik", x, y), a, b) == 2 * 3 * 5 * 7 * 11  # batch contracted
    assert _count(lambda x: jnp.tanh(x).sum() * 2.0, a) == 0  # elementwise work and reductions are not counted
    x, w = jnp.ones((10, 4)), jnp.ones((3, 4, 6))
    sizes = jnp.array([2, 5, 3], jnp.int32)
    assert _count(lambda x, w: jax.lax.ragged_dot(x, w, sizes), x, w) == 2 * 10 * 4 * 6  # each row meets one group
    img, kernel = jnp.ones((2, 3, 9, 9)), jnp.ones((8, 3, 3, 3))  # NCHW, OIHW, valid padding: 7 x 7 outputs
    conv = lambda i, k: jax.lax.conv_general_dilated(i, k, (1, 1), "VALID")
    assert _count(conv, img, kernel) == 2 * (2 * 8 * 7 * 7) * (3 * 3 * 3)


def test_loops_branches_gradients_and_remat():
    x = jnp.ones((4, 8))
    w = jnp.ones((6, 8, 8))
    one = 2 * 4 * 8 * 8
    scanned = lambda x, w: jax.lax.scan(lambda c, wi: (c @ wi, None), x, w)[0]
    assert _count(jax.jit(scanned), x, w) == 6 * one  # the body times the scan's length, through a jit
    branches = lambda x, p: jax.lax.cond(p, lambda v: v @ w[0] @ w[1], lambda v: v @ w[0], x)
    assert _count(branches, x, True) == 2 * one  # the dearer branch
    loss = lambda w0: jnp.sum(jnp.tanh(x @ w0))
    assert _count(jax.grad(loss), w[0]) == 2 * one  # forward, weight gradient (x's is not asked for)
    assert _count(jax.grad(lambda v: jnp.sum(jnp.tanh(v @ w[0]))), x) == 2 * one  # forward, input gradient
    # remat recomputes the forward in the backward: that runs, but it is not model work (MFU, not HFU)
    assert _count(jax.grad(jax.checkpoint(loss)), w[0]) == 2 * one
    for policy in (None, jax.checkpoint_policies.dots_saveable, jax.checkpoint_policies.nothing_saveable):
        assert _count(jax.grad(jax.checkpoint(loss, policy=policy)), w[0]) == 2 * one
    assert _count(jax.checkpoint(loss), w[0]) == one  # a checkpointed forward alone (an eval step) still counts


def test_a_loop_marked_with_its_useful_iterations_counts_only_those_forward_and_backward():
    """The pipeline's tick loop: 6 iterations run, 4 are model work (the rest is bubble). The mark
    survives jit, grad and the scan's transpose; a scan inside the marked body is counted in full."""
    x, w = jnp.ones((4, 8)), jnp.ones((8, 8))
    one = 2 * 4 * 8 * 8

    def ticks(w, x):
        inner = lambda c: jax.lax.scan(lambda h, _: (h @ w, None), c, None, length=3)[0]
        with useful_iterations(4, 6):
            out, _ = jax.lax.scan(lambda c, _: (jnp.tanh(inner(c)), None), x, None, length=6)
        return out.sum()

    assert _count(jax.jit(ticks), w, x) == 4 * 3 * one
    assert _count(jax.jit(jax.grad(ticks)), w, x) == 3 * 4 * 3 * one  # forward, and the weight and carry grads
    with useful_iterations(4, 5):  # a mark whose total is not the scan's length is ignored
        assert _count(lambda x: jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=6)[0], x) == 6 * one


@pytest.mark.devices(8)
def test_shard_map_bodies_count_once_per_shard_and_per_device_divides_by_devices():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    x = jax.device_put(jnp.ones((64, 16)), NamedSharding(mesh, P("data")))
    w = jax.device_put(jnp.ones((16, 32)), NamedSharding(mesh, P()))
    local = jax.shard_map(lambda a, b: a @ b, mesh=mesh, in_specs=(P("data"), P()), out_specs=P("data"))
    whole = 2 * 64 * 16 * 32
    assert _count(jax.jit(local), x, w) == whole  # 8 shards of 8 rows
    assert traced_flops(jax.jit(local).trace(x, w), devices=8) == whole / 8
    assert step_flops(jax.jit(lambda a, b: a @ b), x, w, devices=8) == whole / 8  # GSPMD: global shapes
    # manual over one axis of two: the body sees a quarter of the rows and runs once per data shard
    mesh2 = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    x2 = jax.device_put(jnp.ones((64, 16)), NamedSharding(mesh2, P("data")))
    w2 = jax.device_put(jnp.ones((16, 32)), NamedSharding(mesh2, P()))
    partial = jax.shard_map(lambda a, b: a @ b, mesh=mesh2, in_specs=(P("data"), P()), out_specs=P("data"),
                            axis_names={"data"})
    assert _count(jax.jit(partial), x2, w2) == whole


@pytest.mark.parametrize("options", [{}, {"remat_policy": "full"}, {"remat_policy": "dots_saveable"},
                                     {"remat_policy": "full", "scan_layers": True}])
def test_llama_train_step_count_is_the_6nt_plus_attention_formula(options):
    """The tiny Llama's train step through the Trainer's own compiled steps: every projection, the
    lm_head and the attention products, forward (1x) and backward (2x), nothing else. Gradient
    checkpointing (with layers scanned or not) recomputes the forward, and leaves the count as it is."""
    from jtrain.args import TrainingArguments
    from jtrain.compiled import build_compiled_steps
    from jtrain.precision import policy_from_args
    from jtrain.trainer import Trainer

    model = tiny_llama(attention_impl="reference", **options)
    args = TrainingArguments(output_dir="unused", max_steps=2, per_device_train_batch_size=4, save_strategy="no",
                             report_to=["none"], disable_tqdm=True, mesh_shape={"data": 1})
    trainer = Trainer(model, args)
    trainer.create_optimizer_and_scheduler(args.max_steps)
    steps = build_compiled_steps(model, trainer.mesh, trainer.optimizer, trainer.lr_scheduler, trainer.compute_loss,
                                 seed=0, precision=policy_from_args(args))
    rows, length = 4, 16
    ids = np.ones((1, rows, length), np.int32)
    batch = steps.abstract_train_batch({"input_ids": ids, "labels": ids})
    counted = traced_flops(steps.train_step.trace(steps.abstract_state, batch))

    c = TINY_LLAMA
    d, f, v, layers = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    kv = c["num_key_value_heads"] * d // c["num_attention_heads"]
    matmul_params = layers * (2 * d * d + 2 * d * kv + 3 * d * f) + d * v  # q, o, k, v, the MLP, lm_head
    tokens = rows * length
    attention = layers * 4 * d * length * tokens  # scores and values, full grid, forward
    # backward: 2x the forward, except that the first projections' input gradient (into the
    # embedding lookup) is computed as well: no weight is skipped, so exactly 3x
    assert counted == pytest.approx(3 * (2 * matmul_params * tokens + attention), rel=1e-12)


def test_float32_peak_on_a_gpu_is_the_tf32_one_unless_full_precision_is_asked_for():
    """MFU's denominator: JAX computes float32 matmuls on recent NVIDIA GPUs with TF32 unless told
    otherwise (HF's `tf32=False` -> "highest"), so the plain float32 peak would make MFU read ~7x high."""
    from types import SimpleNamespace

    from jtrain.flops import device_peak_flops

    h100 = SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3", platform="gpu")
    assert device_peak_flops("float32", h100) == (494.7e12, "datasheet (NVIDIA H100, TF32)")
    assert device_peak_flops("float32", h100, matmul_precision="tensorfloat32")[0] == 494.7e12
    assert device_peak_flops("float32", h100, matmul_precision="highest") == (67e12, "datasheet (NVIDIA H100)")
    assert device_peak_flops("bfloat16", h100)[0] == 989e12  # half precision is not touched
    tpu = SimpleNamespace(device_kind="TPU v4", platform="tpu")
    assert device_peak_flops("float32", tpu)[0] == 275e12  # the table's float32 entry (bf16 passes on TPU)
