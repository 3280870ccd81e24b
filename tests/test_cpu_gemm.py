"""jtrain.models.cpu_gemm: bf16 products through oneDNN's matmul or MKL's cblas_gemm_bf16bf16f32,
and float32 products through oneDNN's matmul, as an XLA custom call. Every bf16 test runs once per
library that is installed; the float32 tests need oneDNN.

References and tolerances:
- the raw product against numpy float64 on the same bf16 inputs: the inputs are exact in float32,
  so the only error is the float32 accumulation, bounded by k * 2^-24 * (|A| @ |B|) elementwise
  (k products summed; a factor 2 of slack for the summation order); a bf16 result adds its own
  rounding to nearest, at most 2^-8 of the accumulated value's magnitude (8 significand bits);
- the dense layer and the CPU attention against XLA's own bf16 path (`lax.dot_general`, the einsum):
  both round a float32 accumulation to bf16, so they may differ by one bf16 step, 2^-8 relative
  to the value, plus the accumulation difference; gradients pass through a second bf16 rounding,
  so those compare at 2^-6 relative to the largest entry;
- float32 products (raw, and the dense layer's forward and both gradients) against numpy float64 on
  the same float32 inputs: the float32 accumulation bound above, nothing else;
- the float32 Trainer step against XLA's dot: the same float32 arithmetic in another summation
  order, three AdamW updates apart, so the losses agree to 1e-5 relative (the per-product
  difference is ~1e-7 relative; Adam's normalised updates carry it, they do not amplify it).
The tests force `JTRAIN_CPU_BF16_GEMM=onednn` or `=mkl` (both compute bf16 products on any x86
CPU, emulated where there is no AMX/AVX512-BF16), so they check the same code on every machine
that has the libraries.
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
from jtrain.losses import causal_lm_loss
from jtrain.models import attention, cpu_attention, cpu_gemm, matmul
from jtrain.models.masks import as_mask
from tiny import lm_rows, three_trainer_steps, tiny_llama

LIBRARIES = {"onednn": (cpu_gemm.ENV_ONEDNN_LIBRARY, "libdnnl.so*"), "mkl": (cpu_gemm.ENV_LIBRARY, "libmkl_rt.so*")}


def _missing(name: str) -> bool:
    try:
        cpu_gemm._library_path(*LIBRARIES[name], hint="")
    except ConfigError:
        return True
    return False


pytestmark = pytest.mark.cpu_only("an XLA:CPU custom call")

BF16 = jnp.bfloat16


def _use(monkeypatch, name: str, f32: str) -> None:
    if _missing(name):
        pytest.skip(reason=f"{name} is not installed (the test extra has both oneDNN and MKL; x86-64 only)")
    monkeypatch.setenv(cpu_gemm.ENV_MODE, name)
    monkeypatch.setenv(cpu_gemm.ENV_F32_MODE, f32)
    cpu_gemm.reset()


@pytest.fixture(params=list(LIBRARIES))
def library(request, monkeypatch):
    """One library's bf16 path on (oneDNN, then MKL; float32 stays on XLA's dot), for one device,
    whatever this CPU has."""
    _use(monkeypatch, request.param, "xla")
    with cpu_gemm.single_device(True):
        yield request.param
    cpu_gemm.reset()


@pytest.fixture
def onednn(monkeypatch):
    """oneDNN for both bf16 and float32 products, for one device."""
    _use(monkeypatch, "onednn", "onednn")
    with cpu_gemm.single_device(True):
        yield "onednn"
    cpu_gemm.reset()


def _bf16(rng, shape):
    return jnp.asarray(rng.standard_normal(shape), BF16)


def _f32(rng, shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _f64(x):
    return np.asarray(x.astype(jnp.float32), np.float64)


SHAPES = pytest.mark.parametrize("a_shape,b_shape,trans_a,trans_b", [
    ((64, 96), (96, 80), False, False),
    ((96, 64), (96, 80), True, False),       # a weight gradient: x^T dy
    ((64, 96), (80, 96), False, True),       # an input gradient: dy W^T
    ((5, 33, 17), (5, 40, 17), False, True),  # attention scores per head
    ((5, 17, 33), (5, 17, 40), True, False),
    ((3, 0, 4), (3, 4, 6), False, False),    # empty rows
    ((4, 0), (0, 3), False, False),          # nothing to contract: zeros
])


def _accumulation_bound(op_a, op_b):
    """float32 summation error of op_a @ op_b: k products summed, 2^-24 each, a factor 2 of slack."""
    return 2 * op_a.shape[-1] * 2.0 ** -24 * (np.abs(op_a) @ np.abs(op_b))


@SHAPES
@pytest.mark.parametrize("out_dtype", [jnp.float32, BF16])
def test_gemm_matches_float64(library, a_shape, b_shape, trans_a, trans_b, out_dtype):
    rng = np.random.default_rng(0)
    a, b = _bf16(rng, a_shape), _bf16(rng, b_shape)
    out = jax.jit(lambda a, b: cpu_gemm.gemm(a, b, trans_a=trans_a, trans_b=trans_b, out_dtype=out_dtype))(a, b)
    op_a = np.swapaxes(_f64(a), -1, -2) if trans_a else _f64(a)
    op_b = np.swapaxes(_f64(b), -1, -2) if trans_b else _f64(b)
    ref, accumulation = op_a @ op_b, _accumulation_bound(op_a, op_b)
    assert out.dtype == out_dtype and out.shape == ref.shape
    rounding = 2.0 ** -8 * (np.abs(ref) + accumulation) if out_dtype == BF16 else 0.0
    assert np.all(np.abs(_f64(out) - ref) <= accumulation + rounding)


@SHAPES
def test_float32_gemm_matches_float64(onednn, a_shape, b_shape, trans_a, trans_b):
    rng = np.random.default_rng(0)
    a, b = _f32(rng, a_shape), _f32(rng, b_shape)
    out = jax.jit(lambda a, b: cpu_gemm.gemm(a, b, trans_a=trans_a, trans_b=trans_b))(a, b)
    op_a = np.swapaxes(_f64(a), -1, -2) if trans_a else _f64(a)
    op_b = np.swapaxes(_f64(b), -1, -2) if trans_b else _f64(b)
    ref = op_a @ op_b
    assert out.dtype == jnp.float32 and out.shape == ref.shape
    assert np.all(np.abs(_f64(out) - ref) <= _accumulation_bound(op_a, op_b))


def test_gemm_rejects_what_it_cannot_compute(library):
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


def test_dense_layer_matches_xla_bf16_path_and_uses_the_custom_call(library):
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


def test_float32_dense_layer_uses_onednn_and_matches_float64(onednn):
    rng = np.random.default_rng(5)
    x, w, cot = _f32(rng, (2, 24, 64)), _f32(rng, (64, 48)), rng.standard_normal((2, 24, 48))
    dims = (((2,), (0,)), ((), ()))
    y = jax.jit(lambda x, w: matmul.dot_general(x, w, dims))(x, w)
    (_, (dx, dw)) = jax.jit(lambda x, w: _dense_grads(matmul.dot_general, x, w, cot))(x, w)
    x2, w2, dy = _f64(x).reshape(48, 64), _f64(w), np.asarray(cot, np.float32).astype(np.float64).reshape(48, 48)
    for got, op_a, op_b in ((y, x2, w2), (dx, dy, w2.T), (dw, x2.T, dy)):
        assert got.dtype == jnp.float32
        got = _f64(got).reshape(op_a.shape[0], op_b.shape[1])
        assert np.all(np.abs(got - op_a @ op_b) <= _accumulation_bound(op_a, op_b))
    hlo = jax.jit(lambda x, w: _dense_grads(matmul.dot_general, x, w, cot)).lower(x, w).as_text()
    assert hlo.count(cpu_gemm.TARGET) == 3  # forward, dx, dw
    with cpu_gemm.single_device(False):  # a mesh of several devices keeps XLA's dot in float32 too
        assert cpu_gemm.TARGET not in jax.jit(lambda x, w: matmul.dot_general(x, w, dims)).lower(x, w).as_text()


def test_float32_follows_its_setting_and_a_sharded_step_stays_on_xla(library):
    x, w = jnp.ones((4, 8)), jnp.ones((8, 3))
    dims = (((1,), (0,)), ((), ()))
    assert cpu_gemm.TARGET not in jax.jit(lambda x, w: matmul.dot_general(x, w, dims)).lower(x, w).as_text()
    with cpu_gemm.single_device(False):  # a mesh of several devices: XLA must be free to partition
        hlo = jax.jit(lambda x, w: matmul.dot_general(x, w, dims)).lower(x.astype(BF16), w.astype(BF16)).as_text()
    assert cpu_gemm.TARGET not in hlo


def test_flop_count_counts_the_custom_call_like_the_dot(library):
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


def test_blocked_attention_matches_reference_with_grads(library):
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
    cpu_gemm.reset()
    try:
        monkeypatch.setenv(cpu_gemm.ENV_MODE, "fast")
        with pytest.raises(ConfigError, match="JTRAIN_CPU_BF16_GEMM='fast'"):
            cpu_gemm.mode()
        monkeypatch.setenv(cpu_gemm.ENV_F32_MODE, "mkl")  # float32 products have no MKL path
        with pytest.raises(ConfigError, match="JTRAIN_CPU_F32_GEMM='mkl' is not one of auto, onednn, xla"):
            cpu_gemm.f32_library()
        monkeypatch.setenv(cpu_gemm.ENV_MODE, "xla")
        monkeypatch.setenv(cpu_gemm.ENV_F32_MODE, "xla")
        assert not cpu_gemm.available() and cpu_gemm.library_for(jnp.float32) is None
        with pytest.raises(ConfigError, match="JTRAIN_CPU_BF16_GEMM=xla"):
            cpu_gemm.gemm(jnp.ones((2, 2), BF16), jnp.ones((2, 2), BF16))
        with pytest.raises(ConfigError, match="JTRAIN_CPU_F32_GEMM=xla"):
            cpu_gemm.gemm(jnp.ones((2, 2)), jnp.ones((2, 2)))
        for name, (env, pattern) in LIBRARIES.items():
            monkeypatch.setenv(env, f"/nonexistent/{pattern}")
            with pytest.raises(ConfigError, match=f"{env}=/nonexistent"):
                cpu_gemm._library_path(env, pattern, hint="")
    finally:
        cpu_gemm.reset()


def _compare_with_xla(runs: dict, library: str, rtol: float) -> None:
    (losses, hlo, flops), (xla_losses, xla_hlo, xla_flops) = runs[library], runs["xla"]
    assert cpu_gemm.TARGET in hlo and cpu_gemm.TARGET not in xla_hlo
    assert flops == xla_flops > 0  # the same products, whichever kernel computes them
    np.testing.assert_allclose(losses, xla_losses, rtol=rtol)
    assert len(losses) == 3


def test_dot_remat_policies_save_the_library_products_and_attention(monkeypatch):
    """JAX's `dots_saveable` looks for `dot_general`; the library products and the CPU attention
    kernel are custom calls, so without their checkpoint names (`matmul.PRODUCT_NAME`,
    `cpu_attention.ATTENTION_NAME`) a checkpointed layer recomputed all of them, as `full` does.
    Counted in the compiled gradient of a tiny two-layer Llama; the gradients stay the plain ones."""
    _use(monkeypatch, "onednn", "onednn")
    batch = {k: jnp.asarray(v) for k, v in lm_rows(4, 16).items()}
    params = tiny_llama().init(jax.random.key(0))

    def compiled(policy):
        model = tiny_llama(remat_policy=policy)

        def loss(p):
            out = causal_lm_loss(model.apply(p, batch), batch)
            return out.loss_sum / out.weight

        with cpu_gemm.single_device(True):
            step = jax.jit(jax.grad(loss))
            hlo = step.lower(params).compile().as_text()
            grads = step(params)
        counts = (hlo.count(f'custom_call_target="{cpu_gemm.TARGET}"'),
                  hlo.count(f'custom_call_target="{cpu_attention.FORWARD}"'))
        return counts, grads

    (plain, plain_attn), plain_grads = compiled(None)
    (full, full_attn), _ = compiled("full")
    assert plain > 0 and plain_attn == 2  # the kernel ran: one forward per layer
    assert (full, full_attn) == (plain + 12, 4)  # the recomputed forward: 2 layers x (q, k, v, o, gate, up)
    assert compiled("nothing_saveable")[0] == (full, full_attn)
    (dots, dots_attn), dots_grads = compiled("dots_saveable")
    assert (dots, dots_attn) == (plain, plain_attn)  # nothing recomputed but element-wise work
    # attention has batch dimensions: this policy recomputes it, as it does XLA's attention products
    assert compiled("dots_with_no_batch_dims_saveable")[0] == (plain, full_attn)
    # 1e-6 relative: the same float32 kernels on the same inputs; XLA may fuse the recomputed
    # element-wise work differently, which moves the last bit or two
    for g1, g0 in zip(jax.tree.leaves(dots_grads), jax.tree.leaves(plain_grads)):
        np.testing.assert_allclose(g1, g0, rtol=1e-6, atol=1e-7)


def test_float32_auto_mode_uses_onednn_only_on_an_avx512_cpu(monkeypatch):
    """`auto` takes oneDNN for float32 only where it was measured faster (AVX-512); `onednn` forces it."""
    if _missing("onednn"):
        pytest.skip(reason="oneDNN is not installed (the test extra has it; x86-64 only)")
    monkeypatch.setenv(cpu_gemm.ENV_F32_MODE, "auto")
    try:
        for flags, want in (({"avx2", "fma"}, None), ({"avx2", "avx512f"}, "onednn")):
            monkeypatch.setattr(cpu_gemm, "cpu_flags", lambda flags=flags: flags)
            cpu_gemm.reset()
            assert cpu_gemm.f32_library() == want
        monkeypatch.setattr(cpu_gemm, "cpu_flags", lambda: {"avx2"})
        monkeypatch.setenv(cpu_gemm.ENV_F32_MODE, "onednn")
        cpu_gemm.reset()
        assert cpu_gemm.f32_library() == "onednn"
    finally:
        cpu_gemm.reset()


def test_trainer_bf16_step_uses_the_library_on_one_device_and_matches_xla(library, tmp_path, monkeypatch):
    runs = {}
    for mode in (library, "xla"):
        monkeypatch.setenv(cpu_gemm.ENV_MODE, mode)
        cpu_gemm.reset()
        runs[mode] = three_trainer_steps(tmp_path / mode, bf16=True)
    _compare_with_xla(runs, library, rtol=2.0 ** -7)  # bf16 arithmetic in another summation order


def test_trainer_float32_step_uses_onednn_and_matches_xla(onednn, tmp_path, monkeypatch):
    runs = {}
    for mode in ("onednn", "xla"):
        monkeypatch.setenv(cpu_gemm.ENV_F32_MODE, mode)
        cpu_gemm.reset()
        runs[mode] = three_trainer_steps(tmp_path / mode, bf16=False)
    _compare_with_xla(runs, "onednn", rtol=1e-5)  # float32 arithmetic in another summation order


def test_flax_dense_module_routes_through_it(library):
    layer = matmul.Dense(8, dtype=BF16)
    params = layer.init(jax.random.key(0), jnp.ones((2, 4)))
    hlo = jax.jit(lambda p, x: layer.apply(p, x)).lower(params, jnp.ones((2, 4))).as_text()
    assert cpu_gemm.TARGET in hlo
    assert isinstance(layer, nn.Dense)


def _repeatable_gradients(dtype: str, rel: float) -> None:
    """XLA runs independent products (a layer's input and weight gradients) side by side on its
    threads. With oneDNN's own scratchpad, shared between primitives, this model's gradients came
    out different on every call (wrong by up to their own size); each calling thread now owns a
    scratchpad. Repeated calls must agree bitwise, and with XLA's dot to `rel` of the largest entry."""
    from jtrain import create_model

    config = dict(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    model = create_model("llama", config, dtype=dtype)
    ids = jnp.asarray(np.random.default_rng(4).integers(0, 2048, (2, 128)), jnp.int32)
    params = model.init(jax.random.key(0))

    def loss(params):
        logits = model.apply(params, {"input_ids": ids})["logits"].astype(jnp.float32)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits)[:, :-1], ids[:, 1:, None], -1))

    grad = jax.jit(jax.grad(loss))
    first = jax.tree_util.tree_leaves(grad(params))
    assert cpu_gemm.TARGET in grad.lower(params).as_text()
    for _ in range(5):
        for a, b in zip(first, jax.tree_util.tree_leaves(grad(params))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with cpu_gemm.single_device(False):  # XLA's own dot: the reference
        ref = jax.tree_util.tree_leaves(jax.jit(jax.grad(loss))(params))
    for g, r in zip(first, ref):
        _close(g, r, rel)


def test_concurrent_products_give_identical_gradients_every_call(library):
    _repeatable_gradients("bfloat16", 2.0 ** -6)  # bf16 rounding of the gradients (module docstring)


def test_concurrent_float32_products_give_identical_gradients_every_call(onednn):
    # float32 in another summation order, through two layers' backward: 1e-5 of the largest entry.
    _repeatable_gradients("float32", 1e-5)


def test_required_onednn_that_cannot_load_is_a_config_error_naming_both_settings(tmp_path):
    """In a fresh process (this one has oneDNN loaded already): `JTRAIN_CPU_F32_GEMM=onednn` with
    `JTRAIN_ONEDNN_LIB` pointing nowhere fails at the first float32 product, naming both."""
    import os
    import subprocess
    import sys

    code = ("import jax.numpy as jnp\nfrom jtrain.models import cpu_gemm\n"
            "cpu_gemm.gemm(jnp.ones((2, 2)), jnp.ones((2, 2)))\n")
    env = dict(os.environ, JTRAIN_CPU_F32_GEMM="onednn", JTRAIN_ONEDNN_LIB=str(tmp_path / "libdnnl.so"),
               JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "ConfigError: JTRAIN_CPU_F32_GEMM=onednn, but oneDNN cannot be used" in done.stderr
    assert f"JTRAIN_ONEDNN_LIB={tmp_path / 'libdnnl.so'} is not a file" in done.stderr


def test_sgemm_setting_is_checked(monkeypatch):
    for value, want in (("auto", cpu_gemm.SGEMM_MIN_COLUMNS), ("off", 0), ("96", 96)):
        monkeypatch.setenv(cpu_gemm.ENV_F32_SGEMM, value)
        assert cpu_gemm.sgemm_min_columns() == want
    monkeypatch.setenv(cpu_gemm.ENV_F32_SGEMM, "fast")
    with pytest.raises(ConfigError, match="JTRAIN_CPU_F32_SGEMM='fast' is not a setting"):
        cpu_gemm.sgemm_min_columns()


@pytest.mark.parametrize("threshold,want_sgemm", [("64", True), ("off", False)])
def test_wide_float32_products_take_onednn_sgemm_where_set(threshold, want_sgemm):
    """In a fresh process (the threshold is handed to the extension once, when oneDNN loads): with
    a 64-column threshold the un-transposed 2-D product of 96 columns runs on oneDNN's `gemm:jit`
    kernel and the transposed ones on oneDNN's first choice, all within the float32 accumulation
    bound of float64; `off` never asks for it (on AVX-512, where oneDNN ranks brgemm first)."""
    import os
    import subprocess
    import sys

    if _missing("onednn"):
        pytest.skip(reason="oneDNN is not installed (the test extra has it; x86-64 only)")
    if "avx512f" not in cpu_gemm.cpu_flags():
        pytest.skip(reason="oneDNN ranks its sgemm kernel first anyway on CPUs without AVX-512")
    code = """
import numpy as np, jax, jax.numpy as jnp
from jtrain.models import cpu_gemm
rng = np.random.default_rng(0)
a, b = rng.standard_normal((64, 128)).astype(np.float32), rng.standard_normal((128, 96)).astype(np.float32)
for ta, tb in ((False, False), (True, False), (False, True)):
    x, y = (a.T.copy() if ta else a), (b.T.copy() if tb else b)
    out = np.asarray(jax.jit(lambda x, y: cpu_gemm.gemm(x, y, trans_a=ta, trans_b=tb))(x, y), np.float64)
    ref = a.astype(np.float64) @ b.astype(np.float64)
    bound = 2 * 128 * 2.0 ** -24 * (np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64)))
    assert np.all(np.abs(out - ref) <= bound), (ta, tb)
print("products ok")
"""
    env = dict(os.environ, JTRAIN_CPU_F32_GEMM="onednn", JTRAIN_CPU_F32_SGEMM=threshold, ONEDNN_VERBOSE="1",
               JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "products ok" in done.stdout
    kernels = {}  # problem ("1x64x128:1x128x96") and operand layouts -> the implementation that ran
    for line in done.stdout.splitlines():
        fields = line.split(",")  # oneDNN 3.2: onednn_verbose,exec,...; 3.4+: onednn_verbose,v1,primitive,exec,...
        at = fields.index("exec") if line.startswith("onednn_verbose,") and "exec" in fields else -1
        if at > 0 and fields[at + 1:at + 3] == ["cpu", "matmul"]:
            kernels[(fields[-2], fields[at + 5])] = fields[at + 3]
    assert len(kernels) == 3, kernels
    sgemm = [key for key, impl in kernels.items() if impl.startswith("gemm:jit")]
    if want_sgemm:
        assert len(sgemm) == 1 and "wei_f32::blocked:abc:" in sgemm[0][1], kernels  # the un-transposed one
    else:
        assert not sgemm, kernels
