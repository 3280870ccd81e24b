"""jtrain.models.cpu_attention: float32 attention as one custom call per direction on XLA:CPU.

References and tolerances:
- outputs and q/k/v gradients against numpy float64 (the softmax and its backward written out
  on the same float32 inputs): the kernel computes in float32 with its own exp (relative error
  about 2e-7) and summation order, over at most 300 keys of O(1) values, so every entry is held
  to 2e-5 of the largest entry of its array (measured errors are about 1e-6);
- a Trainer step with the kernel against the same step on the einsum path: the same float32
  arithmetic in another order, three AdamW updates apart, so losses agree to 1e-5 relative (as
  the float32 GEMM's Trainer test).
Runs where the kernel applies: the CPU with oneDNN as the float32 GEMM library (the test extra
installs it; `JTRAIN_CPU_F32_GEMM=onednn` is forced so a CPU without AVX-512 runs it as well).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtrain.errors import ConfigError
from jtrain.flop_count import jaxpr_flops
from jtrain.models import attention, cpu_attention, cpu_gemm
from jtrain.models.masks import AttentionMask
from tiny import assert_kernel_step_matches_xla, cpu_kernel_on

pytestmark = pytest.mark.cpu_only("an XLA:CPU custom call")


@pytest.fixture
def kernel(monkeypatch):
    """The fused attention on, on one device (it needs no GEMM library, only AVX-512 and g++)."""
    with cpu_kernel_on(monkeypatch, cpu_attention.ENV, cpu_attention._CPU_FEATURES):
        yield


def _reference(q, k, v, keep, d_out, scale):
    """float64 attention and its gradients: softmax over the kept keys, zeros for rows with none."""
    q, k, v, d_out = (np.asarray(x, np.float64) for x in (q, k, v, d_out))
    B, L, N, H = q.shape
    G = N // k.shape[2]
    k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
    s = np.einsum("blnh,bsnh->bnls", q, k) * scale
    keep = np.broadcast_to(np.asarray(keep)[:, None], s.shape)
    s = np.where(keep, s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    p = np.exp(s - np.where(np.isfinite(m), m, 0.0))
    total = np.sum(p, axis=-1, keepdims=True)
    p = np.where(total > 0, p / np.where(total > 0, total, 1.0), 0.0)
    out = np.einsum("bnls,bsnh->blnh", p, v)
    dv = np.einsum("bnls,blnh->bsnh", p, d_out)
    dp = np.einsum("blnh,bsnh->bnls", d_out, v)
    ds = p * (dp - np.sum(dp * p, axis=-1, keepdims=True)) * scale
    dq = np.einsum("bnls,bsnh->blnh", ds, k)
    dk = np.einsum("bnls,blnh->bsnh", ds, q)
    fold = lambda x: x.reshape(B, x.shape[1], N // G, G, H).sum(axis=3)  # noqa: E731  grouped heads
    return out, (dq, fold(dk), fold(dv))


def _close(got, want, rel=2e-5):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=rel * max(np.max(np.abs(want)), 1e-30))


CASES = pytest.mark.parametrize("B,L,S,N,K,causal,padding", [
    (2, 300, 300, 4, 2, True, "left"),   # five query blocks (4 x 64, 44), grouped heads, keyless rows
    (2, 256, 256, 4, 4, True, "right"),  # the benchmark's shape family: two causal blocks
    (3, 200, 200, 2, 1, False, "right"),  # bidirectional (BERT): every block sees every key
    (1, 40, 70, 2, 2, False, None),       # more keys than queries (cross attention)
])


@CASES
def test_outputs_and_gradients_match_float64(kernel, B, L, S, N, K, causal, padding):
    rng = np.random.default_rng(0)
    H = 16
    q = jnp.asarray(rng.standard_normal((B, L, N, H)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, S, K, H)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, S, K, H)), jnp.float32)
    d_out = rng.standard_normal((B, L, N, H)).astype(np.float32)
    lengths = rng.integers(S // 2, S, size=B)
    valid = np.arange(S)[None] < lengths[:, None] if padding == "right" else np.ones((B, S), bool)
    if padding == "left":
        valid = np.arange(S)[None] >= (S - lengths)[:, None]
    mask = AttentionMask(causal, jnp.asarray(valid))
    scale = 1.0 / np.sqrt(H)

    def run(impl):
        def loss(q, k, v):
            return jnp.sum(attention.attend(q, k, v, mask, implementation=impl, causal_blocks=causal) * d_out)
        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        return fn, jax.jit(lambda q, k, v: attention.attend(q, k, v, mask, implementation=impl, causal_blocks=causal))

    grads_fn, out_fn = run("xla")
    assert cpu_attention.FORWARD in out_fn.lower(q, k, v).as_text()
    assert cpu_attention.BACKWARD in grads_fn.lower(q, k, v).as_text()
    keep = np.asarray(mask.block(0, L, 0, S))[:, 0]
    want_out, want_grads = _reference(q, k, v, keep, d_out, scale)
    if padding == "left" and causal:
        assert not keep.any(axis=-1).all(), "the case should have queries that see no key"
    _close(out_fn(q, k, v), want_out)
    for got, want in zip(grads_fn(q, k, v)[1], want_grads):
        _close(got, want)


def test_it_follows_its_setting_and_leaves_what_it_cannot_compute_to_xla(kernel, monkeypatch):
    q = jnp.ones((1, 8, 2, 4), jnp.float32)
    mask = AttentionMask(True)

    def lowered(**kw):
        return jax.jit(lambda q: attention.attend(q, q, q, mask, causal_blocks=True, **kw)).lower(q).as_text()

    assert cpu_attention.FORWARD in lowered()
    assert cpu_attention.FORWARD not in lowered(softcap=5.0)  # soft-capping: the einsum path
    assert cpu_attention.FORWARD not in jax.jit(
        lambda q: attention.attend(q, q, q, mask, causal_blocks=True)).lower(q.astype(jnp.bfloat16)).as_text()
    with monkeypatch.context() as m:  # a CPU without AVX-512: the einsums, and a clear error if asked directly
        m.setattr(cpu_gemm, "cpu_flags", lambda: {"avx2", "fma"})
        assert cpu_attention.FORWARD not in lowered()
        with pytest.raises(ConfigError, match="needs AVX-512"):
            cpu_attention.attention(q, q, q, jnp.ones((1, 8, 8), bool), 0.5, causal=True)
    with monkeypatch.context() as m:  # no compiler to build it: the einsums, and a clear error if asked directly
        m.setattr(cpu_attention, "_built", lambda: "no C++ compiler (g++) was found")
        assert cpu_attention.FORWARD not in lowered()
        with pytest.raises(ConfigError, match="could not be built: no C"):
            cpu_attention.attention(q, q, q, jnp.ones((1, 8, 8), bool), 0.5, causal=True)
    with monkeypatch.context() as m:  # no GEMM library for float32 products: the kernel still applies
        m.setenv(cpu_gemm.ENV_F32_MODE, "xla")
        cpu_gemm.reset()
        assert cpu_attention.FORWARD in lowered()
    cpu_gemm.reset()
    monkeypatch.setenv(cpu_attention.ENV, "xla")
    assert cpu_attention.FORWARD not in lowered()
    monkeypatch.setenv(cpu_attention.ENV, "sometimes")
    with pytest.raises(ConfigError, match=r"JTRAIN_CPU_ATTENTION='sometimes' is not one of auto, xla"):
        lowered()


def test_trainer_step_with_the_kernel_matches_the_einsum_path(kernel, tmp_path, monkeypatch):
    assert_kernel_step_matches_xla(monkeypatch, tmp_path, cpu_attention.ENV, cpu_attention.FORWARD)


def test_flop_count_is_what_the_blocks_compute(kernel):
    """Causal blocks of 64 rows over 300 positions score 64*64 + 64*128 + 64*192 + 64*256 + 44*300
    pairs (by hand); the backward counts its four gradient products (twice the forward), not the
    recomputed scores."""
    B, L, N, H = 1, 300, 2, 8
    q = jnp.ones((B, L, N, H), jnp.float32)
    keep = jnp.tril(jnp.ones((L, L), bool))[None]

    def loss(q):
        return jnp.sum(cpu_attention.attention(q, q, q, keep, 0.5, causal=True))

    pairs = 64 * 64 + 64 * 128 + 64 * 192 + 64 * 256 + 44 * 300
    forward = jaxpr_flops(jax.make_jaxpr(loss)(q).jaxpr)
    assert forward == 4 * B * N * H * pairs
    assert jaxpr_flops(jax.make_jaxpr(jax.grad(loss))(q).jaxpr) == 3 * forward
    assert cpu_attention.scored_pairs(L, L, causal=False) == L * L


def test_under_vmap_each_item_matches_its_own_call(kernel):
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((3, 1, 20, 2, 8)), jnp.float32)
    mask = AttentionMask(True)

    def one(q):
        return attention.attend(q, q, q, mask, causal_blocks=True)

    batched = jax.jit(jax.vmap(one))(q)
    assert cpu_attention.FORWARD in jax.jit(jax.vmap(one)).lower(q).as_text()
    for i in range(3):
        np.testing.assert_array_equal(batched[i], jax.jit(one)(q[i]))  # the same kernel on the same item
