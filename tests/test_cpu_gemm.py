"""jtrain.models.cpu_gemm: bf16 products through MKL's cblas_gemm_bf16bf16f32 as an XLA custom call.

References and tolerances:
- the raw product against numpy float64 on the same bf16 inputs: the inputs are exact in float32,
  so the only error is MKL's float32 accumulation, bounded by k * 2^-24 * (|A| @ |B|) elementwise
  (k products summed; a factor 2 of slack for the summation order);
- the dense layer and the CPU attention against XLA's own bf16 path (`lax.dot_general`, the einsum):
  both round a float32 accumulation to bf16, so they may differ by one bf16 step, 2^-8 relative
  to the value, plus the accumulation difference; gradients pass through a second bf16 rounding,
  so those compare at 2^-6 relative to the largest entry.
The tests force `JTRAIN_CPU_BF16_GEMM=mkl` (MKL computes bf16 products on any x86 CPU, emulated
where there is no AMX/AVX512-BF16), so they check the same code on every machine that has MKL.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jtrain.errors import ConfigError
from jtrain.flop_count import _CPU_GEMM, jaxpr_flops
from jtrain.models import attention, cpu_gemm, matmul
from jtrain.models.masks import as_mask

def _mkl_missing() -> bool:
    try:
        cpu_gemm._mkl_path()
    except ConfigError:
        return True
    return False


pytestmark = [
    pytest.mark.cpu_only("an XLA:CPU custom call"),
    pytest.mark.skipif(_mkl_missing(), reason="MKL is not installed (pip install 'jtrain[cpu-bf16]'; x86-64 only)"),
]

BF16 = jnp.bfloat16


@pytest.fixture
def mkl(monkeypatch):
    """The MKL path on, for one device, whatever this CPU has."""
    monkeypatch.setenv(cpu_gemm.ENV_MODE, "mkl")
    cpu_gemm.available.cache_clear()
    with cpu_gemm.single_device(True):
        yield
    cpu_gemm.available.cache_clear()


def _bf16(rng, shape):
    return jnp.asarray(rng.standard_normal(shape), BF16)


def _f64(x):
    return np.asarray(x.astype(jnp.float32), np.float64)


@pytest.mark.parametrize("a_shape,b_shape,trans_a,trans_b", [
    ((64, 96), (96, 80), False, False),
    ((96, 64), (96, 80), True, False),       # a weight gradient: x^T dy
    ((64, 96), (80, 96), False, True),       # an input gradient: dy W^T
    ((5, 33, 17), (5, 40, 17), False, True),  # attention scores per head
    ((5, 17, 33), (5, 17, 40), True, False),
    ((3, 0, 4), (3, 4, 6), False, False),    # empty rows
    ((4, 0), (0, 3), False, False),          # nothing to contract: zeros
])
def test_gemm_matches_float64(mkl, a_shape, b_shape, trans_a, trans_b):
    rng = np.random.default_rng(0)
    a, b = _bf16(rng, a_shape), _bf16(rng, b_shape)
    out = jax.jit(lambda a, b: cpu_gemm.gemm(a, b, trans_a=trans_a, trans_b=trans_b))(a, b)
    op_a = np.swapaxes(_f64(a), -1, -2) if trans_a else _f64(a)
    op_b = np.swapaxes(_f64(b), -1, -2) if trans_b else _f64(b)
    ref, bound = op_a @ op_b, np.abs(op_a) @ np.abs(op_b)
    assert out.dtype == jnp.float32 and out.shape == ref.shape
    k = op_a.shape[-1]
    assert np.all(np.abs(np.asarray(out, np.float64) - ref) <= 2 * k * 2.0 ** -24 * bound)


def test_gemm_rejects_what_it_cannot_compute(mkl):
    a = jnp.ones((4, 3), BF16)
    with pytest.raises(ValueError, match="bfloat16"):
        cpu_gemm.gemm(a.astype(jnp.float32), a)
    with pytest.raises(ValueError, match="contracting sizes"):
        cpu_gemm.gemm(a, a)
    with pytest.raises(ValueError, match="batch sizes"):
        cpu_gemm.gemm(jnp.ones((2, 4, 3), BF16), jnp.ones((3, 3, 5), BF16))


def _dense_grads(dot, x, w, cot):
    dims = (((x.ndim - 1,), (0,)), ((), ()))
    return jax.value_and_grad(lambda x, w: jnp.sum(dot(x, w, dims).astype(jnp.float32) * cot), argnums=(0, 1))(x, w)


def _close(got, want, rel):
    got, want = _f64(got), _f64(want)
    np.testing.assert_allclose(got, want, rtol=0, atol=rel * np.abs(want).max())


def test_dense_layer_matches_xla_bf16_path_and_uses_the_custom_call(mkl):
    rng = np.random.default_rng(1)
    x, w, cot = _bf16(rng, (2, 24, 64)), _bf16(rng, (64, 48)), rng.standard_normal((2, 24, 48))
    dims = (((2,), (0,)), ((), ()))
    y = jax.jit(lambda x, w: matmul.dot_general(x, w, dims))(x, w)
    y_ref = lax.dot_general(x, w, dims)
    assert y.dtype == y_ref.dtype == BF16
    _close(y, y_ref, 2.0 ** -7)
    (_, (dx, dw)) = jax.jit(lambda x, w: _dense_grads(matmul.dot_general, x, w, cot))(x, w)
    (_, (dx_ref, dw_ref)) = _dense_grads(lax.dot_general, x, w, cot)
    assert dx.dtype == dw.dtype == BF16
    _close(dx, dx_ref, 2.0 ** -6)
    _close(dw, dw_ref, 2.0 ** -6)
    hlo = jax.jit(lambda x, w: _dense_grads(matmul.dot_general, x, w, cot)).lower(x, w).as_text()
    assert hlo.count(cpu_gemm.TARGET) == 3  # forward, dx, dw


def test_not_used_for_float32_or_for_a_sharded_step(mkl):
    x, w = jnp.ones((4, 8)), jnp.ones((8, 3))
    dims = (((1,), (0,)), ((), ()))
    assert cpu_gemm.TARGET not in jax.jit(lambda x, w: matmul.dot_general(x, w, dims)).lower(x, w).as_text()
    with cpu_gemm.single_device(False):  # a mesh of several devices: XLA must be free to partition
        hlo = jax.jit(lambda x, w: matmul.dot_general(x, w, dims)).lower(x.astype(BF16), w.astype(BF16)).as_text()
    assert cpu_gemm.TARGET not in hlo


def test_flop_count_counts_the_custom_call_like_the_dot(mkl):
    x, w = jnp.ones((6, 16), BF16), jnp.ones((16, 10), BF16)
    step = lambda x, w: _dense_grads(matmul.dot_general, x, w, jnp.ones((6, 10)))  # noqa: E731
    assert _CPU_GEMM == cpu_gemm.TARGET
    counted = jaxpr_flops(jax.make_jaxpr(step)(x, w).jaxpr)
    assert counted == 3 * 2 * 6 * 16 * 10
    with cpu_gemm.single_device(False):
        assert jaxpr_flops(jax.make_jaxpr(step)(x, w).jaxpr) == counted
    assert jaxpr_flops(jax.make_jaxpr(lambda a: cpu_gemm.gemm(a, a, trans_a=True))(x).jaxpr) == 2 * 16 * 16 * 6
    q, k = jnp.ones((3, 5, 7), BF16), jnp.ones((3, 11, 7), BF16)  # batched: [batch, rows, contracted]
    assert jaxpr_flops(jax.make_jaxpr(lambda q, k: cpu_gemm.gemm(q, k, trans_b=True))(q, k).jaxpr) == 2 * 3 * 5 * 11 * 7
    assert jaxpr_flops(jax.make_jaxpr(lambda q, k: cpu_gemm.gemm(q, k, trans_a=True))(k, k).jaxpr) == 2 * 3 * 7 * 7 * 11


def test_blocked_attention_matches_reference_with_grads(mkl):
    rng = np.random.default_rng(2)
    B, L, N, K, H = 2, 256, 4, 2, 16  # 256 rows: two causal query blocks, grouped-query heads
    q, k, v = _bf16(rng, (B, L, N, H)), _bf16(rng, (B, L, K, H)), _bf16(rng, (B, L, K, H))
    mask = np.tril(np.ones((L, L), bool))[None, None]
    cot = rng.standard_normal((B, L, N, H))

    def loss(impl, blocks):
        def f(q, k, v):
            out = attention.attend(q, k, v, as_mask(jnp.asarray(mask)), implementation=impl, causal_blocks=blocks)
            return jnp.sum(out.astype(jnp.float32) * cot)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))

    got_loss, got = loss("xla", True)(q, k, v)
    want_loss, want = loss("reference", False)(q, k, v)
    assert cpu_gemm.TARGET in loss("xla", True).lower(q, k, v).as_text()
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=2.0 ** -7)
    for g, r in zip(got, want):
        _close(g, r, 2.0 ** -6)


def test_mode_errors_name_the_setting(monkeypatch):
    cpu_gemm.available.cache_clear()
    try:
        monkeypatch.setenv(cpu_gemm.ENV_MODE, "fast")
        with pytest.raises(ConfigError, match="JTRAIN_CPU_BF16_GEMM='fast'"):
            cpu_gemm.mode()
        monkeypatch.setenv(cpu_gemm.ENV_MODE, "xla")
        assert not cpu_gemm.available()
        monkeypatch.setenv(cpu_gemm.ENV_LIBRARY, "/nonexistent/libmkl_rt.so")
        with pytest.raises(ConfigError, match="JTRAIN_MKL_LIB=/nonexistent"):
            cpu_gemm._mkl_path()
    finally:
        cpu_gemm.available.cache_clear()


def test_trainer_bf16_step_uses_mkl_on_one_device_and_matches_xla(mkl, tmp_path, monkeypatch):
    from jtrain import Trainer, TrainingArguments
    from jtrain.data.loader import ArrayDataset
    from jtrain.flops import step_flops
    from tiny import padded_lm_batch, tiny_llama

    rows = padded_lm_batch(8, 16, seed=3)
    losses, hlos, flops = {}, {}, {}
    for mode in ("mkl", "xla"):
        monkeypatch.setenv(cpu_gemm.ENV_MODE, mode)
        cpu_gemm.available.cache_clear()
        args = TrainingArguments(output_dir=str(tmp_path / mode), max_steps=3, per_device_train_batch_size=4,
                                 bf16=True, save_strategy="no", report_to=["none"], disable_tqdm=True,
                                 mesh_shape={"data": 1}, logging_steps=1, train_sampling_strategy="sequential")
        trainer = Trainer(tiny_llama(dtype="bfloat16"), args, train_dataset=ArrayDataset(rows))
        trainer.train()
        losses[mode] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        batch = trainer.steps.place_train_batch({k: v[None, :4] for k, v in rows.items()})
        hlos[mode] = trainer.steps.train_step.lower(trainer.train_state, batch).as_text()
        flops[mode] = step_flops(trainer.steps.train_step, trainer.train_state, batch)
    assert cpu_gemm.TARGET in hlos["mkl"] and cpu_gemm.TARGET not in hlos["xla"]
    assert flops["mkl"] == flops["xla"] > 0  # the same products, whichever kernel computes them
    # Same bf16 arithmetic in another summation order: the losses agree to bf16 rounding.
    np.testing.assert_allclose(losses["mkl"], losses["xla"], rtol=2.0 ** -7)
    assert len(losses["mkl"]) == 3


def test_flax_dense_module_routes_through_it(mkl):
    layer = matmul.Dense(8, dtype=BF16)
    params = layer.init(jax.random.key(0), jnp.ones((2, 4)))
    hlo = jax.jit(lambda p, x: layer.apply(p, x)).lower(params, jnp.ones((2, 4))).as_text()
    assert cpu_gemm.TARGET in hlo
    assert isinstance(layer, nn.Dense)
