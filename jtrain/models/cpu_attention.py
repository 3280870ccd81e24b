"""Float32 attention on XLA:CPU as two custom calls (forward, backward) of `cpu_gemm.cc`.

Why: written as XLA ops, attention stores every head's [rows, keys] scores, probabilities and
their gradients between batched products that run at 80-120 GFLOP/s on the benchmark's shapes
(the 64-long contraction of q k^T), with softmax passes and head-major copies in between. The
kernel takes one head at a time on each core, a query block at a time, so those matrices stay in
the core's cache, and computes its products itself (AVX-512 register tiles, no per-call cost) on
strided views of the [batch, length, heads, dim] arrays (no copies). Like flash attention, the
forward saves each row's log-sum-exp and the backward recomputes the probabilities from it. On the
large benchmark model's shapes one layer's forward took 10.5 ms as XLA ops and 4.1-4.6 ms here,
forward and backward 26 and 17.5-20 ms (benchmarks/TRIED.md).

When (`applies`): the CPU backend on one device (`cpu_gemm.on_one_cpu`), a CPU with AVX-512 (F, BW
and VL), a C++ compiler to build `cpu_gemm.cc` (no GEMM library is needed), float32 q, k and v,
and no soft-capping. The `JTRAIN_CPU_ATTENTION` setting: `auto` (default) takes it where it
applies, `xla` never (the head-major einsums of `jtrain.models.attention`).

Numerics: the same float32 softmax as the einsum path (scaled scores, row maximum subtracted,
masked keys excluded), with exp from a polynomial (relative error about 2e-7) and a different
summation order; rows that may see no key give zeros, as `attend` promises.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from jtrain import native
from jtrain.errors import ConfigError
from jtrain.models import cpu_gemm

logger = logging.getLogger(__name__)

ENV = "JTRAIN_CPU_ATTENTION"
FORWARD = "jtrain_cpu_attention_forward"
BACKWARD = "jtrain_cpu_attention_backward"
# Query rows per block: a [64, keys] float32 block of scores and its gradient (128 KB at 256 keys)
# stay in a core's L2 cache, and causal blocks skip the keys after their last row (blocks of 32
# measured the same, 128 slower: more keys scored past the diagonal).
BLOCK = 64
# The checkpoint name of the forward's output and log-sum-exp (`jtrain.models.layers.REMAT_POLICIES`).
ATTENTION_NAME = "jtrain_cpu_attention"
_CPU_FEATURES = {"avx512f", "avx512bw", "avx512vl"}  # the kernel's softmax loops are AVX-512


def mode() -> str:
    """The `JTRAIN_CPU_ATTENTION` setting, checked."""
    return native.env_setting(ENV, ("auto", "xla"))


def applies(q: jax.Array, k: jax.Array, v: jax.Array, softcap: float | None) -> bool:
    """Whether `attention` should compute this (see the module docstring)."""
    return (softcap is None and q.dtype == k.dtype == v.dtype == jnp.float32 and mode() == "auto"
            and cpu_gemm.on_one_cpu() and _CPU_FEATURES <= cpu_gemm.cpu_flags() and _built() is None)


@functools.cache
def _built() -> str | None:
    """Build the extension and register both handlers as FFI targets (once per process); None, or
    why that failed (logged once; `applies` then leaves attention to XLA)."""
    try:
        ext = cpu_gemm.extension()
    except (ConfigError, OSError) as err:
        logger.info("float32 attention stays on XLA's einsums: %s", err)
        return str(err)
    for target, symbol in ((FORWARD, ext.JtrainCpuAttentionForward), (BACKWARD, ext.JtrainCpuAttentionBackward)):
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(symbol), platform="cpu")
    return None


def attention(q: jax.Array, k: jax.Array, v: jax.Array, keep: jax.Array, scale: float, causal: bool) -> jax.Array:
    """softmax(q k^T * scale, masked) v of q [B, L, N, H] and k, v [B, S, K, H] (N a multiple of K).

    `keep` is the boolean [B or 1, L, S] mask (True: the query may see the key). `causal`
    promises that no query sees a later key, so a query block skips the keys after its last row."""
    missing = _CPU_FEATURES - cpu_gemm.cpu_flags()
    if missing:
        raise ConfigError(f"the CPU attention kernel needs AVX-512 (this CPU lacks {', '.join(sorted(missing))}); "
                          "call jtrain.models.attention.attend, which chooses")
    failure = _built()
    if failure is not None:
        raise ConfigError(f"the CPU attention kernel could not be built: {failure}; call "
                          "jtrain.models.attention.attend, which chooses")
    return _vjp(float(scale), bool(causal))(q, k, v, keep)


def scored_pairs(length: int, keys: int, causal: bool) -> int:
    """(query, key) pairs the kernel scores: every pair, or with `causal` self-attention the keys up
    to each query block's last row (the rule of `Shape::KeyEnd` in cpu_gemm.cc)."""
    if not (causal and length == keys):
        return length * keys
    return sum(min(BLOCK, length - r0) * min(r0 + BLOCK, length) for r0 in range(0, length, BLOCK))


def _attrs(scale: float, causal: bool) -> dict[str, Any]:
    return {"scale": np.float32(scale), "causal": causal, "block": np.int64(BLOCK)}


@functools.cache
def _vjp(scale: float, causal: bool):
    def forward(q: jax.Array, k: jax.Array, v: jax.Array, keep: jax.Array) -> tuple[jax.Array, jax.Array]:
        B, L, N, _ = q.shape
        shapes = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((B, N, L), jnp.float32))
        return jax.ffi.ffi_call(FORWARD, shapes, vmap_method="sequential")(q, k, v, keep, **_attrs(scale, causal))

    @jax.custom_vjp
    def attend(q: jax.Array, k: jax.Array, v: jax.Array, keep: jax.Array) -> jax.Array:
        return forward(q, k, v, keep)[0]

    def fwd(q, k, v, keep):
        out, lse = forward(q, k, v, keep)
        # Named, so that `dots_saveable` keeps them as it keeps XLA attention's products.
        out, lse = checkpoint_name(out, ATTENTION_NAME), checkpoint_name(lse, ATTENTION_NAME)
        return out, (q, k, v, keep, out, lse)

    def bwd(res, d_out):
        q, k, v, keep, out, lse = res
        shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
        call = jax.ffi.ffi_call(BACKWARD, shapes, vmap_method="sequential")
        dq, dk, dv = call(q, k, v, keep, out, lse, d_out.astype(jnp.float32), **_attrs(scale, causal))
        return dq, dk, dv, None

    attend.defvjp(fwd, bwd)
    return attend
