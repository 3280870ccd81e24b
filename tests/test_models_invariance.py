"""Packing and dropout: execution details that must not change results.

Packed rows (segment ids) must give each document's logits as if it ran alone; dropout must act
only when training with an rng. (remat/scan invariance is in test_models_grads, the reference
attention path in test_models_common and test_models_parity.) Tolerance: SAME_MATH_ATOL (1e-5
abs); packed and separate rows run the same float32 ops, masked differently.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtrain.models import from_pretrained
from test_models_common import PAD, SAME_MATH_ATOL, hf_forward, hf_model, padded_batch


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One saved tiny checkpoint per family, shared by the tests below."""
    root = tmp_path_factory.mktemp("ckpt")
    for model_type, task in [("llama", "causal_lm"), ("bert", "masked_lm"), ("roberta", "masked_lm")]:
        hf_model(model_type, task).save_pretrained(root / model_type)
    return root


def _packed_and_alone(model_type: str, lengths=(4, 3, 2), total=10, seed=0):
    """One packed row (documents back to back, then padding) and each document alone, right-padded."""
    rng = np.random.default_rng(seed)
    docs = [rng.integers(2, 64, size=n) for n in lengths]
    pad = PAD[model_type]
    used = sum(lengths)
    packed = {
        "input_ids": np.concatenate(docs + [np.full(total - used, pad)])[None].astype(np.int32),
        "segment_ids": np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)]
                                      + [np.zeros(total - used)])[None].astype(np.int32),
        "attention_mask": (np.arange(total) < used)[None].astype(np.int32),
    }
    real = np.stack([np.arange(total) < len(d) for d in docs]).astype(np.int32)
    alone = {  # segment id 1 on real tokens: the same mask as padding alone, and one compile for both
        "input_ids": np.stack([np.concatenate([d, np.full(total - len(d), pad)]) for d in docs]).astype(np.int32),
        "segment_ids": real, "attention_mask": real,
    }
    packed = {k: np.repeat(v, len(docs), axis=0) for k, v in packed.items()}  # same shape as `alone`
    return packed, alone, lengths


@pytest.mark.parametrize("model_type", ["llama", "bert", "roberta"])
def test_packed_rows_equal_each_document_alone(model_type, checkpoints):
    model, params = from_pretrained(checkpoints / model_type)
    packed, alone, lengths = _packed_and_alone(model_type)
    apply = jax.jit(model.apply)
    p = np.asarray(apply(params, packed)["logits"])[0]
    a = np.asarray(apply(params, alone)["logits"])
    start = 0
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(p[start:start + n], a[i, :n], atol=SAME_MATH_ATOL)
        start += n


def test_dropout_only_with_train_and_rng(tmp_path):
    hf_model("bert", "sequence_classification", hidden_dropout_prob=0.3,
             attention_probs_dropout_prob=0.3).save_pretrained(tmp_path)
    model, params = from_pretrained(tmp_path, scan_layers=True)
    batch = padded_batch("bert")
    apply = jax.jit(model.apply, static_argnames="train")
    evaluation = apply(params, batch)["logits"]
    np.testing.assert_array_equal(apply(params, batch, train=True)["logits"], evaluation)  # no rng: no dropout
    # rbg keys: dropout's semantics do not depend on the PRNG, and threefry masks take ~3x longer to compile
    one = apply(params, batch, rng=jax.random.key(1, impl="rbg"), train=True)["logits"]
    again = apply(params, batch, rng=jax.random.key(1, impl="rbg"), train=True)["logits"]
    other = apply(params, batch, rng=jax.random.key(2, impl="rbg"), train=True)["logits"]
    np.testing.assert_array_equal(one, again)
    assert not np.allclose(one, evaluation) and not np.allclose(one, other)
    assert jnp.isfinite(one).all()


# bfloat16 keeps 8 mantissa bits (~4e-3 relative per rounding); through embeddings, two layers and
# the head, logits of magnitude ~2 drift by ~2e-2 (measured 0.019 against float32). 0.05 abs bounds it while
# catching a broken cast (NaN, a wrong dtype in the scan carry, or weights used uncast).
BF16_ATOL = 0.05


@pytest.mark.parametrize("model_type,task", [("llama", "causal_lm"), ("bert", "masked_lm")])
def test_bfloat16_compute_with_scanned_layers(model_type, task, checkpoints):
    model, params = from_pretrained(checkpoints / model_type, scan_layers=True, dtype="float32")
    fast = model.with_options(dtype="bfloat16")
    batch = padded_batch(model_type)
    out = jax.jit(fast.apply)(params, batch)["logits"]
    assert out.dtype == jnp.float32  # logits leave the model in float32 whatever the compute dtype
    reference, _ = hf_forward(hf_model(model_type, task), batch)  # the checkpoint's float32 model
    where = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(np.asarray(out)[where], reference[where], atol=BF16_ATOL)


def test_default_positions_use_constant_rope_tables(checkpoints):
    """Without position_ids the rotary tables are built while tracing (constants of the compiled
    program, no sine or cosine left in it); explicit position ids 0..L-1 compute them in the graph.
    Same float32 ops either way, so the logits agree to SAME_MATH_ATOL."""
    model, params = from_pretrained(checkpoints / "llama")
    batch = padded_batch("llama", rows=2, length=12)
    explicit = {**batch, "position_ids": np.broadcast_to(np.arange(12, dtype=np.int32), (2, 12))}
    hlo = jax.jit(model.apply).lower(params, batch).compile().as_text()
    assert "sine(" not in hlo and "cosine(" not in hlo
    assert "cosine(" in jax.jit(model.apply).lower(params, explicit).compile().as_text()
    np.testing.assert_allclose(np.asarray(jax.jit(model.apply)(params, batch)["logits"]),
                               np.asarray(jax.jit(model.apply)(params, explicit)["logits"]), atol=SAME_MATH_ATOL)
