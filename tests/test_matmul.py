"""jtrain.models.matmul: the dense layers' dot_general with a CPU-friendly backward.

The custom VJP only reorders how XLA lays out the weight-gradient matmul; values must be those
of `lax.dot_general` and its autodiff. References: numpy float64 (x^T dy, dy W^T), tolerance
1e-5 relative for float32 sums of at most 96 products; and plain `lax.dot_general` under
`jax.grad`, same tolerance (the summation order differs).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jtrain.models import matmul

RTOL = ATOL = 1e-5


def _grads(dot, x, w, dims, cot):
    def f(x, w):
        return jnp.sum(dot(x, w, dims) * cot)

    return jax.grad(f, argnums=(0, 1))(x, w)


@pytest.mark.parametrize("x_shape,w_shape,n_contract", [
    ((2, 5, 8), (8, 12), 1),          # Dense: [B, L, K] x [K, F]
    ((2, 5, 4, 6), (4, 6, 16), 2),    # DenseGeneral over (heads, head_dim): o_proj
    ((3, 16), (16, 2, 8), 1),         # DenseGeneral to (heads, head_dim): q_proj
])
def test_values_and_grads_match_float64_and_autodiff(x_shape, w_shape, n_contract):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    dims = ((tuple(range(len(x_shape) - n_contract, len(x_shape))), tuple(range(n_contract))), ((), ()))
    out_shape = x_shape[: len(x_shape) - n_contract] + w_shape[n_contract:]
    cot = rng.standard_normal(out_shape).astype(np.float32)

    y = matmul.dot_general(jnp.asarray(x), jnp.asarray(w), dims)
    k = int(np.prod(w_shape[:n_contract]))
    x2, w2 = x.reshape(-1, k).astype(np.float64), w.reshape(k, -1).astype(np.float64)
    c2 = cot.reshape(-1, w2.shape[1]).astype(np.float64)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, w2.shape[1]), x2 @ w2, rtol=RTOL, atol=ATOL)

    dx, dw = _grads(matmul.dot_general, jnp.asarray(x), jnp.asarray(w), dims, cot)
    np.testing.assert_allclose(np.asarray(dx), (c2 @ w2.T).reshape(x_shape), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(dw), (x2.T @ c2).reshape(w_shape), rtol=RTOL, atol=ATOL)

    ref_dx, ref_dw = _grads(lax.dot_general, jnp.asarray(x), jnp.asarray(w), dims, cot)
    np.testing.assert_allclose(np.asarray(dx), np.asarray(ref_dx), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(dw), np.asarray(ref_dw), rtol=RTOL, atol=ATOL)

    jit_dx, jit_dw = jax.jit(lambda x, w: _grads(matmul.dot_general, x, w, dims, cot))(x, w)
    np.testing.assert_allclose(np.asarray(jit_dx), np.asarray(dx), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(jit_dw), np.asarray(dw), rtol=RTOL, atol=ATOL)


def test_bfloat16_gradients_keep_the_input_dtypes():
    x = jnp.ones((4, 8), jnp.bfloat16)
    w = jnp.full((8, 3), 0.5, jnp.bfloat16)
    dims = (((1,), (0,)), ((), ()))
    dx, dw = _grads(matmul.dot_general, x, w, dims, jnp.ones((4, 3), jnp.bfloat16))
    ref_dx, ref_dw = _grads(lax.dot_general, x, w, dims, jnp.ones((4, 3), jnp.bfloat16))
    assert (dx.dtype, dw.dtype) == (ref_dx.dtype, ref_dw.dtype) == (jnp.bfloat16, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(dx, np.float32), np.asarray(ref_dx, np.float32))
    np.testing.assert_array_equal(np.asarray(dw, np.float32), np.asarray(ref_dw, np.float32))


def test_routing_custom_vjp_for_dense_contractions_lax_for_the_rest():
    """Only what Dense emits takes the custom VJP on CPU; batch dims or a kernel contracted on a
    trailing dim go to plain lax. Forward-mode autodiff tells them apart: a custom VJP has no
    JVP rule (the limitation docs/performance.md states), lax.dot_general has one."""
    assert jax.default_backend() == "cpu"
    x, w = jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5))
    batched = (((2,), (1,)), ((0,), (0,)))
    assert not matmul._is_dense_contraction(x, w, batched)
    assert not matmul._is_dense_contraction(x, jnp.ones((5, 4)), (((2,), (1,)), ((), ())))
    out, tangent = jax.jvp(lambda x: matmul.dot_general(x, w, batched), (x,), (x,))
    np.testing.assert_array_equal(out, lax.dot_general(x, w, batched))
    np.testing.assert_array_equal(tangent, lax.dot_general(x, w, batched))

    dense = (((2,), (0,)), ((), ()))
    assert matmul._is_dense_contraction(x, jnp.ones((4, 5)), dense)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda x: matmul.dot_general(x, jnp.ones((4, 5)), dense), (x,), (x,))


def test_dense_factories_are_flax_dense_modules():
    """LoRA and quantization find layers by `isinstance(module, nn.Dense)`; the factories keep that."""
    assert isinstance(matmul.Dense(3), nn.Dense) and isinstance(matmul.DenseGeneral((2, 3)), nn.DenseGeneral)
    params = matmul.Dense(3).init(jax.random.PRNGKey(0), jnp.ones((2, 4)))
    ref = nn.Dense(3).apply(params, jnp.ones((2, 4)))
    np.testing.assert_allclose(np.asarray(matmul.Dense(3).apply(params, jnp.ones((2, 4)))), np.asarray(ref),
                               rtol=RTOL, atol=ATOL)
