"""Attention masks kept as their parts (`jtrain.models.masks`): every block equals the dense mask built
independently in numpy, the fused call gets `is_causal` (no mask array) exactly when no per-row term
exists, and no model path materialises an [L, L] boolean any more.

Tolerances: SAME_MATH_ATOL 1e-5 where two jtrain attention paths compute the same float32 softmax in
a different order (as in test_models_common); mask blocks are booleans and must be equal.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtrain.models import create_model
from jtrain.models.attention import attend
from jtrain.models.masks import DenseMask, make_attention_mask

SAME_MATH_ATOL = 1e-5
B, L = 2, 40
LONG = 512  # the length of the memory-structure tests: 4 CPU query blocks of 128, or 4 ring blocks


def _numpy_mask(causal: bool, valid: np.ndarray | None, seg: np.ndarray | None, window: int | None) -> np.ndarray:
    """The dense [B, 1, L, L] mask from its definition, one entry at a time (the oracle)."""
    out = np.zeros((B, 1, L, L), bool)
    for b in range(B):
        for i in range(L):
            for j in range(L):
                ok = (not causal or j <= i) and (window is None or i - j < window)
                ok = ok and (seg is None or seg[b, i] == seg[b, j]) and (valid is None or bool(valid[b, j]))
                out[b, 0, i, j] = ok
    return out


def _parts(seed: int = 0):
    rng = np.random.default_rng(seed)
    valid = np.ones((B, L), np.int32)
    valid[0, 31:] = 0  # right padding
    valid[1, :5] = 0  # left padding
    seg = np.sort(rng.integers(1, 4, size=(B, L)), axis=1).astype(np.int32) * valid
    return valid, seg


@pytest.mark.parametrize("causal,window,with_valid,with_seg", [
    (True, None, False, False), (True, 7, True, False), (True, None, True, True), (False, None, True, False),
    (True, 5, True, True)])
def test_blocks_equal_the_dense_mask_from_its_definition(causal, window, with_valid, with_seg):
    valid, seg = _parts()
    want = _numpy_mask(causal, valid if with_valid else None, seg if with_seg else None, window)
    mask = make_attention_mask(jnp.asarray(valid) if with_valid else None, jnp.asarray(seg) if with_seg else None,
                               causal=causal, sliding_window=window)
    full = np.asarray(mask.dense(L, L))
    np.testing.assert_array_equal(np.broadcast_to(full, want.shape), want)
    traced = jax.jit(lambda m, q0, k0: m.block(q0, 8, k0, 16))  # ring attention's traced offsets
    for q0, k0 in ((0, 0), (8, 16), (32, 24)):
        for got in (mask.block(q0, 8, k0, 16), traced(mask, jnp.int32(q0), jnp.int32(k0))):
            np.testing.assert_array_equal(np.broadcast_to(np.asarray(got), (B, 1, 8, 16)),
                                          want[:, :, q0:q0 + 8, k0:k0 + 16])
    dense = DenseMask(jnp.asarray(want))
    np.testing.assert_array_equal(np.asarray(dense.block(8, 8, 16, 16)), want[:, :, 8:16, 16:32])


def test_a_traced_window_equals_the_static_one():
    """Gemma 2 under `scan_layers` picks each layer's window from the traced layer index."""
    valid, seg = _parts(1)
    static = make_attention_mask(jnp.asarray(valid), jnp.asarray(seg), causal=True, sliding_window=6)
    traced = jax.jit(lambda m, w: m.with_window(w).dense(L, L))(static.with_window(None), jnp.int32(6))
    np.testing.assert_array_equal(np.asarray(traced), np.asarray(static.dense(L, L)))


@pytest.mark.cpu_only("it passes sequence_parallel=True to stay off the CPU's blocked path, and a GPU "
                      "refuses cuDNN under sequence parallelism")
@pytest.mark.parametrize("case", ["causal", "window", "bidirectional", "padding", "padding_no_branch", "padding_xla",
                                  "segments", "traced_window"])
def test_what_the_fused_call_gets(case, monkeypatch):
    """What `attend` hands `jax.nn.dot_product_attention` (recorded, not run: the cuDNN kernel needs a GPU).
    Causal and static-window masks go as `is_causal`/`local_window_size` (cuDNN's causal flash path, no
    [B, 1, L, L] tensor). Key padding traces two calls, one per `lax.cond` branch: sequence lengths (taken
    for right-padded rows) and the dense mask (any other padding); `branch_on_padding=False` (the
    pipeline's vmap) keeps only the dense one, and so does XLA's own implementation by default.
    Documents and a traced window need the dense mask."""
    calls = []

    def fake(q, k, v, **kw):
        calls.append(kw)
        return jnp.zeros_like(q)

    monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
    q = k = v = jnp.zeros((B, L, 2, 8))
    valid, seg = _parts()
    mask = {"causal": make_attention_mask(None, None, causal=True),
            "window": make_attention_mask(None, None, causal=True, sliding_window=9),
            "bidirectional": make_attention_mask(None, None, causal=False),
            "padding": make_attention_mask(jnp.asarray(valid), None, causal=True),
            "padding_no_branch": make_attention_mask(jnp.asarray(valid), None, causal=True),
            "padding_xla": make_attention_mask(jnp.asarray(valid), None, causal=True),
            "segments": make_attention_mask(None, jnp.asarray(seg), causal=True),
            "traced_window": make_attention_mask(None, None, causal=True, sliding_window=jnp.int32(9))}[case]
    attend(q, k, v, mask, implementation="xla" if case == "padding_xla" else "cudnn", sequence_parallel=True,
           branch_on_padding=False if case == "padding_no_branch" else None)
    dense = [c for c in calls if "mask" in c]
    lengths = [c for c in calls if "key_value_seq_lengths" in c]
    assert all(c["mask"].shape == (B, 1, L, L) and "is_causal" not in c for c in dense)
    if case in ("causal", "window", "bidirectional"):
        assert len(calls) == 1 and not dense and not lengths
        assert calls[0]["is_causal"] == (case != "bidirectional")
        assert calls[0]["local_window_size"] == ((8, 0) if case == "window" else None)
    elif case == "padding":
        assert len(dense) == 1 and len(lengths) == 1 and lengths[0]["is_causal"]
        np.testing.assert_array_equal(np.asarray(lengths[0]["key_value_seq_lengths"]), valid.sum(-1))
    else:
        assert len(calls) == 1 and len(dense) == 1


@pytest.mark.parametrize("case", ["causal", "window", "right_padding", "left_padding", "bidirectional_padding"])
def test_the_fused_paths_compute_the_reference_attention(case):
    """Each way the fused call can be asked (its own causal/window masking, key-value sequence lengths for
    right padding, the dense mask for left padding) gives the reference einsum on the dense mask. On CPU
    the fused call is XLA's implementation, reached through `sequence_parallel=True`, with the cond on
    padding forced (`branch_on_padding=True`; by default only cuDNN takes it)."""
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.standard_normal((B, L, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((B, L, 2, 8)), jnp.float32) for _ in range(2))
    lengths = np.array([[L], [29]])
    right = (np.arange(L)[None, :] < lengths).astype(np.int32)
    left = right[:, ::-1].copy()
    mask = {"causal": make_attention_mask(None, None, causal=True),
            "window": make_attention_mask(None, None, causal=True, sliding_window=9),
            "right_padding": make_attention_mask(jnp.asarray(right), None, causal=True),
            "left_padding": make_attention_mask(jnp.asarray(left), None, causal=True),
            "bidirectional_padding": make_attention_mask(jnp.asarray(right), None, causal=False)}[case]
    fused = jax.jit(lambda q, k, v, m: attend(q, k, v, m, sequence_parallel=True, branch_on_padding=True))(
        q, k, v, mask)
    ref = attend(q, k, v, mask, implementation="reference")
    np.testing.assert_allclose(np.asarray(fused), np.asarray(ref), atol=SAME_MATH_ATOL)
    if case == "left_padding":  # the first queries of the left-padded row see no key: zeros, as on every path
        assert float(jnp.abs(fused[1, :L - 29]).max()) == 0.0


def _whole_length_booleans(jaxpr, rows: int, keys: int = LONG) -> list[tuple[int, ...]]:
    """Shapes of the booleans [..., >= rows, >= keys] in a jaxpr and its sub-jaxprs (scan, cond, shard_map,
    VJP): a mask over the whole length of keys for at least `rows` queries."""
    found = []
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            aval = getattr(var, "aval", None)
            shape = getattr(aval, "shape", ())
            if getattr(aval, "dtype", None) == jnp.bool_ and len(shape) >= 2 and shape[-2] >= rows \
                    and shape[-1] >= keys:
                found.append(tuple(shape))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _whole_length_booleans(inner, rows, keys)
    return found


DECODERS = {"llama": dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=LONG),
            "gemma2": dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=64,
                           max_position_embeddings=LONG),
            "gpt2": dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=LONG)}


def _grad_jaxpr(apply, params):
    ids = jnp.ones((B * 2, LONG), jnp.int32)
    batch = {"input_ids": ids, "attention_mask": ids, "segment_ids": ids}
    return jax.make_jaxpr(jax.grad(lambda p: jnp.sum(apply(p, batch)["logits"])))(params).jaxpr


@pytest.mark.cpu_only("the blocked attention is the CPU's; XLA's attention on a GPU takes the dense mask")
@pytest.mark.parametrize("model_type,options", [("llama", {}), ("gemma2", {"scan_layers": True}), ("gpt2", {})])
def test_decoders_on_cpu_never_build_a_whole_length_mask(model_type, options):
    """Forward and backward of a padded, packed batch at L=512 on the CPU's blocked attention: each query
    block builds its own [128, keys] mask; the [B|1, 1, L, L] the models used to pass is gone."""
    model = create_model(model_type, DECODERS[model_type], **options)
    assert _whole_length_booleans(_grad_jaxpr(model.apply, model.abstract_params()), LONG) == []


@pytest.mark.devices(8)
@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_ring_attention_never_builds_a_whole_length_mask(model_type):
    """The same under ring attention on `sequence 4 x data 2`: each device builds the [L/4, L/4] block it
    scores, from the padding and segment ids (O(L) integers) it holds whole: no mask of its L/4 rows against
    every key (the [B|1, 1, L/4, L] per device, [L, L] in all, that the ring used to slice) exists."""
    from jtrain.compiled import with_activation_sharding
    from jtrain.sharding import ShardingRules, make_mesh

    model = create_model(model_type, DECODERS[model_type], sequence_parallel_attention="ring")
    run_model = with_activation_sharding(model, make_mesh({"sequence": 4, "data": 2}), ShardingRules())
    jaxpr = _grad_jaxpr(run_model.apply, model.abstract_params())
    assert "shard_map" in str(jaxpr)  # the ring ran
    assert _whole_length_booleans(jaxpr, LONG // 4) == []  # (rows >= 128, keys >= 512)


def test_gemma2_scanned_layers_take_their_window_from_the_traced_index():
    """Alternating sliding-window layers: `scan_layers` (window chosen by the traced layer index) gives the
    unrolled model's logits (window a Python int per layer) on the CPU's blocked attention."""
    config = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, sliding_window=5, max_position_embeddings=L)
    unrolled, scanned = (create_model("gemma2", config, scan_layers=s) for s in (False, True))
    params = unrolled.init(jax.random.key(0))
    stacked = scanned.init(jax.random.key(0))
    layers = [params["model"][f"layers_{i}"] for i in range(2)]
    stacked["model"]["layers"]["layer"] = jax.tree.map(lambda *x: jnp.stack(x), *layers)
    for name in ("embed_tokens", "norm"):
        stacked["model"][name] = params["model"][name]
    valid, seg = _parts(2)
    batch = {"input_ids": jnp.asarray(np.random.default_rng(0).integers(1, 64, (B, L)), jnp.int32),
             "attention_mask": jnp.asarray(valid)}
    want = unrolled.apply(params, batch)["logits"]
    got = scanned.apply(stacked, batch)["logits"]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=SAME_MATH_ATOL)
    # and the window is applied: a window covering the whole row changes the logits
    wide = create_model("gemma2", {**config, "sliding_window": L}, scan_layers=True).apply(stacked, batch)["logits"]
    assert float(jnp.abs(wide - got).max()) > 1e-3


@pytest.mark.devices(8)
def test_ring_attention_takes_a_traced_window():
    """Gemma 2's per-layer window under `scan_layers` is a traced scalar; inside the ring's shard_map it
    travels as a replicated leaf. Output and q/k/v gradients equal the reference einsum with the same
    window as a Python int (padding, documents and grouped-query heads included)."""
    from jtrain.models.ring_attention import ring_attention
    from jtrain.sharding import ActivationSharding, make_mesh

    sharding = ActivationSharding(make_mesh({"sequence": 4, "data": 2}))
    rng = np.random.default_rng(4)
    q = jnp.asarray(rng.standard_normal((B, L, 4, 8)), jnp.float32)
    k, v, w = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((B, L, 2, 8), (B, L, 2, 8), (B, L, 4, 8)))
    valid, seg = _parts(5)
    mask = make_attention_mask(jnp.asarray(valid), jnp.asarray(seg), causal=True)

    def value_and_grads(attention):
        def loss(q, k, v):
            out = attention(q, k, v)
            return jnp.sum(out * w), out

        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return (out, *grads)

    ring = jax.jit(lambda window: value_and_grads(
        lambda q, k, v: ring_attention(q, k, v, mask.with_window(window), sharding, causal_blocks=True)))
    ref = value_and_grads(lambda q, k, v: attend(q, k, v, mask.with_window(6), implementation="reference"))
    for got, want, name in zip(ring(jnp.int32(6)), ref, ("out", "dq", "dk", "dv")):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=SAME_MATH_ATOL, err_msg=name)
