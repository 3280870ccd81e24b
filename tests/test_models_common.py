"""Shared model-test helpers (tiny random HF models, padded batches) and tests of the attention core.

References are `transformers` in PyTorch on CPU, float32. Tolerances:
- 1e-4 abs on logits/losses: both sides compute in float32; reordered sums differ by ~1e-6
  relative per op and the tiny 2-layer models amplify that to ~1e-5 at most, while any real bug
  (a wrong mask, bias, position or layout) moves logits by >1e-2.
- 1e-5 abs between two jtrain paths that do the same math in a different order (fused vs
  einsum attention): only float32 reassociation separates them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jtrain.models.attention import attend, make_attention_mask, rope_inv_freq
from jtrain.models.bert import roberta_positions
from jtrain.models.layers import ACTIVATIONS, _gated_vjp, gated_activation, positions_within_segments

LOGITS_ATOL = 1e-4  # float32 vs float32 across frameworks, see module docstring
SAME_MATH_ATOL = 1e-5  # two jtrain paths, float32 reassociation only

VOCAB = 64
TINY = {
    "llama": dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0),
    "mistral": dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64, sliding_window=3, pad_token_id=0),
    "qwen2": dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, use_sliding_window=True, sliding_window=3,
                  max_window_layers=1, pad_token_id=0),
    "gpt2": dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32, pad_token_id=0,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "bert": dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "roberta": dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, max_position_embeddings=40, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0),
}
TINY["qwen3"] = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, max_position_embeddings=64, pad_token_id=0)
TINY["gemma"] = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=1, head_dim=8, max_position_embeddings=64, pad_token_id=0)
TINY["gemma2"] = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                      pad_token_id=0, sliding_window=3,
                      query_pre_attn_scalar=12, attn_logit_softcapping=0.5, final_logit_softcapping=2.0)
TINY["mixtral"] = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, num_local_experts=4,
                       num_experts_per_tok=2, pad_token_id=0)
PAD = {"mixtral": 0, "llama": 0, "mistral": 0, "qwen2": 0, "qwen3": 0, "gemma": 0, "gemma2": 0, "gpt2": 0, "bert": 0,
       "roberta": 1}
HF_AUTO = {
    "causal_lm": transformers.AutoModelForCausalLM,
    "sequence_classification": transformers.AutoModelForSequenceClassification,
    "masked_lm": transformers.AutoModelForMaskedLM,
    "token_classification": transformers.AutoModelForTokenClassification,
}


def hf_model(model_type: str, task: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny HF model whose every weight (norm scales and biases included) is random.

    Default inits leave biases at 0 and norm scales at 1, which would hide a mis-mapped bias
    or scale, so noise is added to every parameter.
    """
    config = transformers.AutoConfig.for_model(model_type, **{**TINY[model_type], **overrides})
    torch.manual_seed(seed)
    model = HF_AUTO[task].from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def padded_batch(model_type: str, rows: int = 3, length: int = 10, seed: int = 0, left: bool = False,
                 token_types: bool = False) -> dict[str, np.ndarray]:
    """Random ids with unequal padding (row 0 full); padding uses the model type's pad id."""
    rng = np.random.default_rng(seed)
    pad = PAD[model_type]
    ids = rng.integers(2, VOCAB, size=(rows, length))
    lengths = np.concatenate([[length], rng.integers(3, length, size=rows - 1)])
    mask = np.arange(length)[None, :] < lengths[:, None]
    if left:
        mask = mask[:, ::-1]
    batch = {"input_ids": np.where(mask, ids, pad).astype(np.int32), "attention_mask": mask.astype(np.int32)}
    if token_types:
        batch["token_type_ids"] = (rng.random((rows, length)) < 0.5).astype(np.int32) * mask
    return batch


def with_labels(batch: dict, task: str, num_labels: int = 2, seed: int = 1) -> dict:
    """Labels as HF expects them: -100 on padding (and unmasked MLM positions); floats for regression."""
    rng = np.random.default_rng(seed)
    mask = batch["attention_mask"].astype(bool)
    if task == "sequence_classification":
        rows = mask.shape[0]
        labels = rng.normal(size=rows).astype(np.float32) if num_labels == 1 else \
            rng.integers(0, num_labels, size=rows).astype(np.int32)
    elif task == "causal_lm":
        labels = np.where(mask, batch["input_ids"], -100).astype(np.int32)
    elif task == "masked_lm":
        chosen = mask & (rng.random(mask.shape) < 0.5)
        labels = np.where(chosen, rng.integers(0, VOCAB, size=mask.shape), -100).astype(np.int32)
    else:
        labels = np.where(mask, rng.integers(0, num_labels, size=mask.shape), -100).astype(np.int32)
    return {**batch, "labels": labels}


def hf_forward(model: torch.nn.Module, batch: dict) -> tuple[np.ndarray, float | None]:
    """HF logits (float32 numpy) and loss when `labels` is in the batch."""
    kwargs = {k: torch.as_tensor(np.asarray(v)) for k, v in batch.items()}
    kwargs = {k: v.float() if v.is_floating_point() else v.long() for k, v in kwargs.items()}
    with torch.no_grad():
        out = model(**kwargs)
    loss = None if out.loss is None else float(out.loss)
    return out.logits.float().numpy(), loss


def real_positions(batch: dict, task: str) -> np.ndarray:
    """Where HF and jtrain must agree: every row for pooled heads, non-padding tokens otherwise."""
    if task == "sequence_classification":
        return np.ones(batch["input_ids"].shape[0], bool)
    return batch["attention_mask"].astype(bool)


# ---------------------------------------------------------------- attention core tests


def _hf_inv_freq(rope: dict, max_pos: int, seq_len: int | None = None) -> np.ndarray:
    cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=max_pos,
                                   rope_parameters=rope)
    fn = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS[rope["rope_type"]]
    return fn(cfg, "cpu", seq_len=seq_len)[0].numpy()


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 4.0, "rope_theta": 500.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16, "rope_theta": 10000.0},
])
def test_rope_scaling_matches_transformers(rope):
    ours = rope_inv_freq(16, rope["rope_theta"], rope, max_position_embeddings=64)
    np.testing.assert_allclose(ours, _hf_inv_freq(rope, 64), rtol=1e-6)  # same float32 formula


@pytest.mark.parametrize("longest", [20, 100])
def test_dynamic_rope_matches_transformers(longest):
    """Below max_position_embeddings dynamic NTK is the default rope; beyond it the base grows."""
    rope = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    positions = jnp.arange(longest)[None, :]
    ours = rope_inv_freq(16, 10000.0, rope, positions_BL=positions, max_position_embeddings=32)
    np.testing.assert_allclose(ours, _hf_inv_freq(rope, 32, seq_len=longest), rtol=1e-5)  # float32 pow


_attend = jax.jit(attend, static_argnames=("implementation", "scale", "dropout_rate", "causal_blocks",
                                           "sequence_parallel"))


def _random_qkv(seed: int, B=2, L=7, N=4, K=2, H=8):
    rng = np.random.default_rng(seed)  # numpy: eager jax.random would compile a PRNG kernel per shape
    return tuple(jnp.asarray(rng.standard_normal(s), jnp.float32) for s in [(B, L, N, H), (B, L, K, H), (B, L, K, H)])


@pytest.mark.parametrize("causal,window", [(True, None), (True, 3), (False, None)])
def test_reference_attention_equals_xla(causal, window):
    q, k, v = _random_qkv(0)
    attn = jnp.array([[1] * 7, [1] * 4 + [0] * 3])
    seg = jnp.array([[1, 1, 1, 2, 2, 2, 2], [1, 1, 2, 2, 0, 0, 0]])
    for segments in (None, seg):
        mask = make_attention_mask(attn, segments, causal=causal, sliding_window=window)
        ref = _attend(q, k, v, mask, implementation="reference")
        xla = _attend(q, k, v, mask, implementation="xla")
        np.testing.assert_allclose(ref, xla, atol=SAME_MATH_ATOL)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_query_blocks_equal_the_reference_with_gradients(dtype):
    """The CPU path's causal query blocks (L=512: 4 blocks of 128, later keys skipped) give the
    reference's outputs and q/k/v gradients, with left padding, packed documents, a sliding
    window and grouped-query heads. float32: same math to SAME_MATH_ATOL; bfloat16: inputs
    rounded alike, scores in float32 on both sides, probabilities rounded to bf16 before the
    value product (one bf16 ulp of outputs of size ~1: 2e-2; gradients, up to ~4 in size and
    rounded to bf16 at several points on both paths, get two ulps relative: rtol 2^-6)."""
    from jtrain.models.attention import _query_blocks

    L = 512
    assert [b[:2] for b in _query_blocks(L, L, True)] == [(0, 128), (128, 256), (256, 384), (384, 512)]
    q, k, v = (x.astype(dtype) for x in _random_qkv(2, B=2, L=L, N=4, K=2, H=8))
    attn = jnp.asarray(np.r_[[1] * L, [0] * 100 + [1] * (L - 100)].reshape(2, L))
    seg = jnp.asarray(np.r_[[1] * 300 + [2] * (L - 300), [0] * 100 + [1] * (L - 100)].reshape(2, L))
    mask = make_attention_mask(attn, seg, causal=True, sliding_window=200)
    atol = SAME_MATH_ATOL if dtype == "float32" else 2e-2
    grad_rtol = 0.0 if dtype == "float32" else 2.0 ** -6

    def loss(impl, blocks):
        return lambda q, k, v: jnp.sum(attend(q, k, v, mask, implementation=impl, causal_blocks=blocks)
                                       .astype(jnp.float32) * v.reshape(2, L, 2, 1, 8).repeat(2, 3)
                                       .reshape(2, L, 4, 8).astype(jnp.float32))

    ref = _attend(q, k, v, mask, implementation="reference").astype(jnp.float32)
    blocked = _attend(q, k, v, mask, implementation="xla", causal_blocks=True).astype(jnp.float32)
    np.testing.assert_allclose(blocked, ref, atol=atol)
    assert float(jnp.abs(blocked[1, :100]).max()) == 0.0  # padding queries: zeros, not NaN
    ref_grads = jax.jit(jax.grad(loss("reference", False), argnums=(0, 1, 2)))(q, k, v)
    grads = jax.jit(jax.grad(loss("xla", True), argnums=(0, 1, 2)))(q, k, v)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), atol=atol, rtol=grad_rtol)


def test_attention_scale():
    """An explicit scale replaces 1/sqrt(H) (GPT-2's scale_attn_weights; dropout is tested on models)."""
    q, k, v = _random_qkv(1)
    mask = make_attention_mask(jnp.ones((2, 7)), None, causal=True)
    scaled = _attend(q * 2.0, k, v, mask, scale=1.0 / (2 * math.sqrt(8)))
    np.testing.assert_allclose(scaled, _attend(q, k, v, mask), atol=SAME_MATH_ATOL)


def test_positions_within_segments():
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0]])
    np.testing.assert_array_equal(positions_within_segments(seg), [[0, 1, 2, 0, 1, 0, 0, 1]])


def test_roberta_positions_match_transformers():
    ids = np.array([[0, 5, 6, 7, 2, 1, 1], [1, 1, 0, 9, 2, 1, 1]])
    hf = transformers.models.roberta.modeling_roberta.RobertaEmbeddings.create_position_ids_from_input_ids(
        torch.as_tensor(ids), padding_idx=1)
    np.testing.assert_array_equal(roberta_positions(jnp.asarray(ids), None, 1), hf.numpy())


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_gated_activation_matches_autodiff(name):
    """The gated MLP's `act(gate) * up` with its own backward (gate and up kept, act recomputed)
    against autodiff of the plain expression, in float64 so only a wrong formula can differ (1e-12
    relative), also under remat and vmap; `gated_activation` takes it for float32 on CPU only."""
    gated = _gated_vjp(name)
    f32 = jnp.ones((2, 3), jnp.float32)
    assert "custom_vjp_call" in str(jax.make_jaxpr(gated_activation(name))(f32, f32))
    assert "custom_vjp_call" not in str(jax.make_jaxpr(gated_activation(name))(f32.astype(jnp.bfloat16),
                                                                              f32.astype(jnp.bfloat16)))
    plain = lambda g, u: ACTIVATIONS[name](g) * u  # noqa: E731
    keys = jax.random.split(jax.random.key(3), 3)
    with jax.enable_x64():
        gate = jax.random.normal(keys[0], (3, 5, 7), jnp.float64) * 3
        up = jax.random.normal(keys[1], (3, 5, 7), jnp.float64)
        weight = jax.random.normal(keys[2], (3, 5, 7), jnp.float64)
        for wrap in (lambda f: f, jax.checkpoint, lambda f: jax.vmap(f)):
            got = jax.grad(lambda g, u: jnp.sum(wrap(gated)(g, u) * weight), argnums=(0, 1))(gate, up)
            want = jax.grad(lambda g, u: jnp.sum(wrap(plain)(g, u) * weight), argnums=(0, 1))(gate, up)
            np.testing.assert_allclose(gated(gate, up), plain(gate, up), rtol=1e-12)
            for a, b in zip(got, want):
                np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
