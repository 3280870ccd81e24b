"""The `dot_general` every dense layer uses: plain forward, a backward laid out for XLA:CPU.

Autodiff of `y = x @ W` gives the weight gradient `dW = x^T @ dy`. On the CPU backend XLA
canonicalises that dot by transposing `dy`, and fuses the transpose into whatever elementwise
op produced `dy` (the SiLU backward, the softmax of the loss): a loop that reads four inputs
with a stride of the row length and ran at under 1 GB/s, 20 ms per MLP layer of the 7M
benchmark model, and the lm_head gradient of a [2048, 8192] logits tensor went the same way.
Here the backward instead materialises the much smaller `x^T` (hidden size columns, not
intermediate or vocabulary size) behind an optimisation barrier, so `dW = (x^T) @ dy` is a
plain row-major matmul on the `dy` XLA already has. Same arithmetic, same dtypes; the float32
train step of the benchmark model ran 1.3x faster (benchmarks/RESULTS.md).

With bfloat16 operands on a CPU with AMX, or float32 operands where oneDNN loads (and one device),
all three products go to oneDNN or MKL instead (`jtrain.models.cpu_gemm`), which take transposed
operands as flags.

GPU and TPU matmul libraries take transposed operands for free, so there the standard
`lax.dot_general` (and its autodiff) is used: the choice is made when the step is traced, from
the backend JAX computes on.

A library product is a custom call, which JAX's remat policies do not see as a dot (they look
for `dot_general`): `dots_saveable` would recompute every such product of a checkpointed layer, as
`full` does. So the CPU product's output carries the name `PRODUCT_NAME`, which the dot policies of
`jtrain.models.layers.REMAT_POLICIES` save.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from jtrain.models import cpu_gemm

# The checkpoint name of the CPU dense products' outputs (see the module docstring).
PRODUCT_NAME = "jtrain_dense_product"

DimensionNumbers = tuple[tuple[tuple[int, ...], tuple[int, ...]], tuple[tuple[int, ...], tuple[int, ...]]]


def _is_dense_contraction(lhs: jax.Array, rhs: jax.Array, dimension_numbers: DimensionNumbers) -> bool:
    """True for what Dense/DenseGeneral emit: no batch dims, lhs contracts its trailing dims and
    rhs (the kernel) its leading dims, in the same order."""
    (lhs_c, rhs_c), (lhs_b, rhs_b) = dimension_numbers
    if lhs_b or rhs_b or not lhs_c:
        return False
    n = len(lhs_c)
    return (tuple(lhs_c) == tuple(range(lhs.ndim - n, lhs.ndim))
            and tuple(rhs_c) == tuple(range(n)))


@functools.cache
def _dense_vjp(precision: Any, preferred_element_type: Any, n_contract: int, library: bool = False):
    """A custom-VJP matmul of x[..., *K] and w[*K, *F] for fixed static arguments; with `library`
    (`jtrain.models.cpu_gemm.applies`) all three products go to oneDNN or MKL."""

    def flat(x: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
        k = math.prod(w.shape[:n_contract])
        return x.reshape(-1, k), w.reshape(k, -1)

    def forward(x: jax.Array, w: jax.Array) -> jax.Array:
        if library:  # float32 accumulation, returned in the dtype XLA's dot would return
            y = cpu_gemm.gemm(*flat(x, w), out_dtype=preferred_element_type or x.dtype)
            return y.reshape(*x.shape[: x.ndim - n_contract], *w.shape[n_contract:])
        dims = ((tuple(range(x.ndim - n_contract, x.ndim)), tuple(range(n_contract))), ((), ()))
        return lax.dot_general(x, w, dims, precision=precision, preferred_element_type=preferred_element_type)

    @jax.custom_vjp
    def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
        return forward(x, w)

    def fwd(x: jax.Array, w: jax.Array):
        return forward(x, w), (x, w)

    def bwd(res, dy: jax.Array):
        x, w = res
        x2, w2 = flat(x, w)
        dy2 = dy.reshape(-1, w2.shape[1]).astype(x.dtype)
        if library:  # the library takes the transposes as flags: no transposed copy at all
            dx = cpu_gemm.gemm(dy2, w2, trans_b=True, out_dtype=x.dtype)
            dw = cpu_gemm.gemm(x2, dy2, trans_a=True, out_dtype=w.dtype)
        else:
            dx = lax.dot_general(dy2, w2, (((1,), (1,)), ((), ())), precision=precision)
            # The barrier keeps XLA from folding this transpose back into the dot (which would make it
            # transpose dy instead, the slow path this module exists to avoid).
            x_t = lax.optimization_barrier(jnp.transpose(x2))
            dw = lax.dot_general(x_t, dy2, (((1,), (0,)), ((), ())), precision=precision)
        return dx.reshape(x.shape).astype(x.dtype), dw.reshape(w.shape).astype(w.dtype)

    matmul.defvjp(fwd, bwd)
    return matmul


def dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers: DimensionNumbers,
                precision: Any = None, preferred_element_type: Any = None) -> jax.Array:
    """Drop-in for `lax.dot_general` in `nn.Dense(dot_general=...)`; see the module docstring."""
    if jax.default_backend() != "cpu" or not _is_dense_contraction(lhs, rhs, dimension_numbers):
        return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)
    n_contract = len(dimension_numbers[0][0])
    library = preferred_element_type in (None, jnp.float32, jnp.bfloat16) and cpu_gemm.applies(lhs, rhs)
    out = _dense_vjp(None if library else precision, preferred_element_type, n_contract, library)(lhs, rhs)
    return checkpoint_name(out, PRODUCT_NAME)


def Dense(*args: Any, **kwargs: Any) -> nn.Dense:
    """`flax.linen.Dense` with this module's `dot_general` (still an `nn.Dense`, for LoRA and quant)."""
    return nn.Dense(*args, dot_general=dot_general, **kwargs)


def DenseGeneral(*args: Any, **kwargs: Any) -> nn.DenseGeneral:
    """`flax.linen.DenseGeneral` with this module's `dot_general`."""
    return nn.DenseGeneral(*args, dot_general=dot_general, **kwargs)
