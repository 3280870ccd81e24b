"""Attention core shared by every architecture: masks, rotary embeddings, the fused/reference paths.

Shape letters: B batch, L query length, S key length, N query heads, K key/value heads,
H head dim, D model width. Masks are boolean, True = may attend; the models pass them as their
parts (`jtrain.models.masks.AttentionMask`), so no path builds more of [B, 1, L, S] than it uses.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jax import lax

from jtrain.errors import ConfigError
from jtrain.models import cpu_attention, cpu_gemm
from jtrain.models.masks import AttentionMask, DenseMask, Mask, as_mask, make_attention_mask

__all__ = ["AttentionMask", "DenseMask", "apply_rope", "rope_tables", "attend", "make_attention_mask", "rope_inv_freq",
           "rope_type", "soft_cap"]


ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
# The model option `attention_impl`: "auto" (default) resolves per backend and dtype
# (`resolve_implementation`); "reference" is the plain einsum the tests use as the oracle.
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "reference")
logger = logging.getLogger(__name__)
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    """Log `message` once per process (attention is traced once per layer and per compile)."""
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def rope_inv_freq(head_dim: int, theta: float, scaling: Mapping[str, Any] | None, *,
                  positions_BL: jax.Array | None = None, max_position_embeddings: int = 2048) -> jax.Array:
    """Inverse frequencies of rotary embeddings, with HF's `rope_scaling` variants.

    linear divides frequencies by `factor`. dynamic NTK raises the base once the longest
    position (max of `positions_BL` + 1, as HF computes it) passes `max_position_embeddings`,
    the same reference length HF uses. llama3 rescales low frequencies only.
    """
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    inv = 1.0 / (theta ** exponents)
    kind = rope_type(scaling)
    if kind == "default":
        return inv
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv / factor
    if kind == "dynamic":
        original = float(max_position_embeddings)
        seq_len = original if positions_BL is None else jnp.max(positions_BL).astype(jnp.float32) + 1.0
        seq_len = jnp.maximum(seq_len, original)
        base = theta * ((factor * seq_len / original) - (factor - 1)) ** (head_dim / (head_dim - 2))
        return 1.0 / (base ** exponents)
    return _llama3_inv_freq(inv, scaling)


def rope_type(scaling: Mapping[str, Any] | None) -> str:
    """The rope type named by an HF `rope_scaling`/`rope_parameters` dict; errors on unsupported ones."""
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default")) or "default"
    if kind not in ROPE_TYPES:
        raise ConfigError(f"unsupported rope type {kind!r}; supported: {', '.join(ROPE_TYPES)}")
    return kind


def _llama3_inv_freq(inv: jax.Array, s: Mapping[str, Any]) -> jax.Array:
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    original = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    low_wavelen, high_wavelen = original / low, original / high
    scaled = jnp.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def rope_tables(positions_BL: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin [B|1, L, 1, H] (float32) of the rotary angles, shared by every layer's `apply_rope`.

    Where the positions are known while tracing (the default 0..L-1), call this under
    `jax.ensure_compile_time_eval()` so the tables are constants of the compiled step. Computed in the
    graph, XLA:CPU fuses the sine and cosine into each consumer and evaluates them again for every
    element of [B, L, heads, H], in every layer's forward and backward: the constant tables made the
    CPU benchmark's bf16 step 1.05x faster (benchmarks/TRIED.md)."""
    angles = positions_BL[..., None].astype(jnp.float32) * inv_freq  # B L H/2
    cos = jnp.cos(jnp.concatenate([angles, angles], -1))[:, :, None, :]
    sin = jnp.sin(jnp.concatenate([angles, angles], -1))[:, :, None, :]
    return cos, sin


def apply_rope(x_BLNH: jax.Array, positions_BL: jax.Array | None = None, inv_freq: jax.Array | None = None, *,
               tables: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """Rotate pairs (i, i + H/2) as HF's `rotate_half` does, computed in float32; the angles come
    from `positions_BL` and `inv_freq`, or as `tables` already made by `rope_tables`."""
    cos, sin = tables if tables is not None else rope_tables(positions_BL, inv_freq)
    xf = x_BLNH.astype(jnp.float32)
    half = xf.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], -1)
    return (xf * cos + rotated * sin).astype(x_BLNH.dtype)


def attend(
    q_BLNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    mask: Mask | jax.Array,
    *,
    implementation: str = "auto",
    scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    causal_blocks: bool = False,
    sequence_parallel: bool = False,
    softcap: float | None = None,
    branch_on_padding: bool | None = None,
) -> jax.Array:
    """Scaled dot-product attention with grouped-query heads.

    `mask` is an `AttentionMask` (its parts), a `DenseMask`, or a boolean [B|1, 1, L, S] array.
    `implementation="auto"` (the default, `resolve_implementation`) is "cudnn" on an NVIDIA GPU in
    bf16/fp16 and "xla" everywhere else. On the CPU backend "xla" takes `_blocked_attention`, which
    computes the same softmax in query blocks; on accelerators it calls `jax.nn.dot_product_attention`
    ("cudnn" asks for the fused GPU kernel), with `is_causal` and no mask array when the mask has no
    per-row terms. For cuDNN a mask whose only per-row term is padding goes as key-value sequence lengths
    when the batch turns out to be right-padded (a `lax.cond`; other padding gets the dense mask).
    `branch_on_padding` None does that for cuDNN only (XLA's own implementation builds a dense mask
    from the lengths anyway, so the cond would only add a branch), True for any implementation (the
    tests' way to run both branches on CPU), False never (callers under `vmap`, where a cond with a
    batched predicate runs both branches). `"reference"` is a plain einsum used by tests as the
    oracle, and also the path taken when attention-probability dropout is active (the fused call
    has no dropout).
    `causal_blocks=True` promises that `mask` never lets a query see a later key (true of every
    decoder mask: causal, sliding window, packed documents); the CPU path then skips the keys
    after each query block. With `sequence_parallel` (query rows split over devices) the CPU path
    is not taken: its head-major copies would make GSPMD regather the length, and the fused call's
    layout keeps the rows split, but not cuDNN's (JAX's cuDNN partitioner refuses rows split along
    the sequence): `auto` then takes XLA's attention and an explicit "cudnn" is refused on a GPU.
    `scale` defaults to 1/sqrt(H). Fully masked rows (padding
    queries) give zeros, not NaN. `softcap` (Gemma 2) bounds the scores to (-cap, cap) with
    cap * tanh(score / cap) before masking; the fused call has no such option, so off the CPU
    path it takes the reference einsum.
    """
    scale = 1.0 / math.sqrt(q_BLNH.shape[-1]) if scale is None else scale
    dropout_active = dropout_rng is not None and dropout_rate > 0.0
    _check_implementation(implementation, softcap, dropout_rate if dropout_active else None, q_BLNH.dtype,
                          sequence_parallel)
    chosen = implementation
    implementation = resolve_implementation(implementation, q_BLNH.dtype, softcap, dropout_active, sequence_parallel)
    mask = as_mask(mask)
    L, S = q_BLNH.shape[1], k_BSKH.shape[1]
    on_cpu_path = implementation == "xla" and jax.default_backend() == "cpu" and not sequence_parallel
    if implementation == "reference" or dropout_active or (softcap is not None and not on_cpu_path):
        return _reference_attention(q_BLNH, k_BSKH, v_BSKH, mask.dense(L, S), scale, dropout_rate, dropout_rng,
                                    softcap)
    if on_cpu_path:
        return _blocked_attention(q_BLNH, k_BSKH, v_BSKH, mask, scale, causal_blocks, softcap)
    impl = None if implementation == "xla" else implementation
    fused = functools.partial(_fused_attention, q_BLNH, k_BSKH, v_BSKH, scale, impl, chosen == "auto")

    def with_dense_mask() -> jax.Array:
        full = mask.dense(L, S)
        out = fused(mask=jnp.broadcast_to(full, (q_BLNH.shape[0], 1, L, S)))
        return _zero_keyless_rows(out, full).astype(q_BLNH.dtype)

    kwargs = mask.fused_kwargs(L, S)
    if kwargs is not None:  # causal / window only: every row has a key (causal: itself)
        return fused(**kwargs).astype(q_BLNH.dtype)
    if branch_on_padding is None:
        branch_on_padding = impl == "cudnn"
    padded = mask.padded_kwargs(L, S) if branch_on_padding else None
    if padded is None:
        return with_dense_mask()
    # Right-padded (or unpadded) rows go to the kernel as sequence lengths; any other padding (left
    # padding) takes the dense mask. One branch runs; both are compiled.
    right_padded, kwargs = padded
    return lax.cond(right_padded, lambda: fused(**kwargs).astype(q_BLNH.dtype), with_dense_mask)


def _fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, impl: str | None, fall_back: bool,
                     **kwargs: Any) -> jax.Array:
    """`jax.nn.dot_product_attention` with `impl`; with `fall_back` (attention_impl 'auto'), what JAX
    refuses while tracing (an old GPU, no cuDNN, a head size) runs as XLA's attention instead."""
    call = functools.partial(jax.nn.dot_product_attention, q, k, v, scale=scale, **kwargs)
    if not fall_back or impl is None:
        return call(implementation=impl)
    try:
        return call(implementation=impl)
    except (ValueError, NotImplementedError, RuntimeError) as err:
        _warn_once(f"attention_impl 'auto': cuDNN's fused attention is not available here ({err}); using XLA's "
                   "attention, which materialises the [B, heads, L, S] scores")
        return call(implementation=None)


def resolve_implementation(implementation: str, dtype: Any, softcap: float | None = None,
                           dropout_active: bool = False, sequence_parallel: bool = False) -> str:
    """What `attention_impl: auto` means where it is traced: cuDNN's fused flash kernel on an NVIDIA
    GPU in bf16/fp16 (JAX's own `implementation=None` stays on XLA's attention, which materialises
    the scores; every cuDNN call path jtrain makes was checked against the einsum on an H200, and the
    1B benchmark trained on it), XLA's attention elsewhere: on CPU, TPU, in float32 (cuDNN has no
    float32 flash kernel), when soft-capping or active dropout needs the einsum anyway, and under
    sequence parallelism (JAX's cuDNN partitioner refuses query rows split along the sequence).
    Other values are returned as they are."""
    if implementation != "auto":
        return implementation
    if _on_gpu_in_half(dtype) and softcap is None and not dropout_active and not sequence_parallel:
        return "cudnn"
    return "xla"


def _on_gpu_in_half(dtype: Any) -> bool:
    """Where cuDNN's flash kernel runs: a GPU backend, bf16 or fp16 operands."""
    return jax.default_backend() == "gpu" and dtype in (jnp.bfloat16, jnp.float16)


def _check_implementation(implementation: str, softcap: float | None, active_dropout: float | None,
                          dtype: Any, sequence_parallel: bool = False) -> None:
    """Refuse what no attention path can do, and say once why a GPU run misses cuDNN's fused kernel
    (active attention dropout keeps it on the reference einsum; `xla` never asks for it)."""
    if implementation not in ATTENTION_IMPLS:
        raise ConfigError(f"unknown attention_impl {implementation!r}; valid: {', '.join(ATTENTION_IMPLS)}")
    if implementation == "cudnn" and softcap is not None:
        raise ConfigError("attention_impl 'cudnn' has no logit soft-capping (Gemma 2's attn_logit_softcapping): "
                          "use attention_impl 'xla'")
    if implementation == "cudnn" and sequence_parallel and jax.default_backend() == "gpu":
        raise ConfigError("attention_impl 'cudnn' cannot run on this mesh: the sequence is split over devices (the "
                          "mesh's `sequence` axis), and JAX's cuDNN kernel refuses query rows sharded along the "
                          "sequence; sequence_parallel_attention 'ring' is the other option. Use attention_impl "
                          "'auto' (which takes XLA's attention here) or 'xla'")
    if implementation == "cudnn" and active_dropout is not None:
        _warn_once(f"attention_impl 'cudnn' has no attention-probability dropout: while dropout {active_dropout} is "
                   "active in training, attention takes the reference einsum, which materialises the [B, heads, L, "
                   "S] scores. Set the model's attention dropout (attention_dropout, attn_pdrop, "
                   "attention_probs_dropout_prob) to 0 to train with the cuDNN kernel")
    if implementation == "xla" and _on_gpu_in_half(dtype):
        _warn_once("attention_impl 'xla' on a GPU runs XLA's own attention, which materialises the [B, heads, L, S] "
                   "scores; for bf16/fp16 leave attention_impl at 'auto' (or set 'cudnn') to use cuDNN's fused "
                   "flash kernel (docs/performance.md)")


# What a compile failure inside cuDNN's attention says: the kernel's own names, and the refusals of
# JAX's cuDNN partitioner (which runs inside XLA's compile) for shardings it cannot split.
_FUSED_ATTENTION_FAILURES = ("cudnn", "fmha", "fused_attention", "query, key and value should have same sharding",
                             "sharding on sequence dim is not allowed", "sharding on head dim is not allowed")


def refuse_failed_fused_attention(err: Exception) -> None:
    """A compile that fails inside cuDNN's fused attention (a GPU, driver, shape or sharding the
    kernel lacks, found only when XLA builds it) as a ConfigError naming the option that avoids the
    kernel; JAX refuses most such cases while tracing, where `attention_impl: auto` falls back."""
    text = str(err)
    if any(marker in text.lower() for marker in _FUSED_ATTENTION_FAILURES):
        first = text.strip().splitlines()[0][:300] if text.strip() else type(err).__name__
        raise ConfigError(f"compiling the train step failed in cuDNN's fused attention ({first}). Set the model "
                          "option attention_impl: xla (XLA's own attention) to train without that kernel") from err


def _zero_keyless_rows(out_BLNH: jax.Array, mask: jax.Array) -> jax.Array:
    """Zeros for query rows the mask gives no key at all (padding queries): the softmax over an
    all-masked row is uniform, not the zeros HF produces."""
    any_key = jnp.any(mask, axis=-1)[:, 0, :, None, None]  # B|1, L, 1, 1
    return jnp.where(any_key, out_BLNH, 0.0)


CPU_QUERY_BLOCK = 128  # rows per query block on the CPU path; at most CPU_MAX_BLOCKS blocks
CPU_MAX_BLOCKS = 8


def _query_blocks(length: int, keys: int, causal: bool) -> list[tuple[int, int, int]]:
    """(first row, end row, end key) of each query block: one block unless causal self-attention
    is long enough to skip keys, then up to CPU_MAX_BLOCKS equal blocks (sizes that divide L)."""
    if not causal or length != keys or length < 2 * CPU_QUERY_BLOCK:
        return [(0, length, keys)]
    block = max(CPU_QUERY_BLOCK, -(-length // CPU_MAX_BLOCKS))
    while length % block:
        block += 1
    return [(start, start + block, start + block) for start in range(0, length, block)]


def soft_cap(scores: jax.Array, softcap: float | None) -> jax.Array:
    """cap * tanh(scores / cap) (HF's Gemma 2 soft-capping); scores unchanged without a cap."""
    return scores if softcap is None else softcap * jnp.tanh(scores / softcap)


def _blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask, scale: float,
                       causal: bool, softcap: float | None = None) -> jax.Array:
    """Attention for XLA:CPU: head-major einsums per query block, softmax in float32.

    Why not `jax.nn.dot_product_attention` here: on CPU it lowers to a vmapped grouped-query
    einsum with a broadcast [B, N, L, S] mask and layout copies around every step; on the 7M
    benchmark model its forward+backward took about 55 ms per layer, this path about 20 ms (as
    a 5-D grouped einsum 30 ms, without query blocks 35 ms), results equal to float32 rounding. With
    `causal` (`attend`'s `causal_blocks`), query block i only meets keys [0, end of block i):
    the masked upper triangle is never computed, as in flash-attention kernels. Each block's mask
    is built for that block only (`mask.block`), never the whole [L, S].
    """
    B, L, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    if cpu_attention.applies(q, k, v, softcap):
        return cpu_attention.attention(q, k, v, mask.block(0, L, 0, S)[:, 0], scale, causal)
    G = N // K
    # Head-major once: queries [B, K, G, L, H], keys and values [B, K, S, H]. Per block the G query
    # heads of a key head are folded into the rows, so both einsums are plain 4-D batched matmuls
    # (a 5-D grouped einsum measured 1.5x slower on CPU).
    qt = q.reshape(B, L, K, G, H).transpose(0, 2, 3, 1, 4)
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    exact = {} if q.dtype == jnp.float32 else {"preferred_element_type": jnp.float32}
    outs, any_key = [], []
    for start, end, keys in _query_blocks(L, S, causal):
        rows = end - start
        q_blk = qt[:, :, :, start:end].reshape(B, K, G * rows, H)
        scores = _scores(q_blk, kt[:, :, :keys], exact) * scale
        scores = soft_cap(scores, softcap)
        m = mask.block(start, rows, 0, keys)  # B|1, 1, rows, keys
        any_key.append(jnp.any(m, axis=-1))  # under causal_blocks no later key could have been visible
        m = jnp.broadcast_to(m[:, :, None], (m.shape[0], 1, G, rows, keys)).reshape(m.shape[0], 1, G * rows, keys)
        scores = jnp.where(m, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = _weighted_values(probs, vt[:, :, :keys])
        outs.append(out.reshape(B, K, G, rows, H))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
    out = out.transpose(0, 3, 1, 2, 4).reshape(B, L, N, H)
    seen = any_key[0] if len(any_key) == 1 else jnp.concatenate(any_key, axis=-1)  # B|1, 1, L
    return jnp.where(seen[:, 0, :, None, None], out, 0.0).astype(q.dtype)


def _scores(q: jax.Array, k: jax.Array, exact: dict) -> jax.Array:
    """float32 q @ k^T of [B, K, rows, H] and [B, K, keys, H]: the CPU GEMM library where it applies."""
    if cpu_gemm.applies(q, k):
        B, K, R, H = q.shape
        out = cpu_gemm.batched_matmul(q.reshape(B * K, R, H), k.reshape(B * K, -1, H), trans_b=True)
        return out.reshape(B, K, R, -1)
    return jnp.einsum("bkrh,bksh->bkrs", q, k, **exact).astype(jnp.float32)


def _weighted_values(probs: jax.Array, v: jax.Array) -> jax.Array:
    """probs @ v of [B, K, rows, keys] and [B, K, keys, H], in v's dtype."""
    if cpu_gemm.applies(probs, v):
        B, K, R, S = probs.shape
        out = cpu_gemm.batched_matmul(probs.reshape(B * K, R, S), v.reshape(B * K, S, -1), out_dtype=v.dtype)
        return out.reshape(B, K, R, -1)
    return jnp.einsum("bkrs,bksh->bkrh", probs, v)


def _reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float,
                         dropout_rate: float, rng: jax.Array | None, softcap: float | None = None) -> jax.Array:
    B, L, N, H = q.shape
    K = k.shape[2]
    qg = q.reshape(B, L, K, N // K, H).astype(jnp.float32)
    scores = soft_cap(jnp.einsum("blkgh,bskh->bkgls", qg, k.astype(jnp.float32)) * scale, softcap)
    m = mask[:, :, None, :, :]  # B 1 1 L S
    scores = jnp.where(m, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(jnp.any(m, axis=-1, keepdims=True), probs, 0.0)
    if rng is not None and dropout_rate > 0.0:
        keep = jax.random.bernoulli(rng, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    out = jnp.einsum("bkgls,bskh->blkgh", probs.astype(v.dtype), v)
    return out.reshape(B, L, N, H).astype(q.dtype)
