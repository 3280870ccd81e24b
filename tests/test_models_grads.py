"""One training step's gradients against `transformers` (PyTorch autograd), per parameter.

Tolerance: relative error ||g - g_hf|| / ||g_hf|| < 1e-4 for every parameter. Both sides run
float32 forward and backward; reassociated sums give ~1e-6 relative differences, while a wrong
mask, tie or layout gives O(1) relative error on the affected parameters.
"""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
import torch

from jtrain.losses import LOSSES_BY_TASK
from jtrain.models import from_pretrained, to_hf_state_dict
from test_models_common import LOGITS_ATOL, SAME_MATH_ATOL, hf_model, padded_batch, real_positions, with_labels

GRAD_RTOL = 1e-4  # see module docstring
SAME_MATH_RTOL = 1e-5  # two jtrain paths running the same float32 ops, reassociated at most
# Without rotary positions a key bias adds q.b_k to every score of a query row, which softmax
# ignores: its true gradient is exactly 0, so both sides hold float32 noise (~1e-9) and a relative
# error means nothing. (With RoPE the bias is rotated per position, so Llama's k_proj.bias counts.)
ZERO_GRAD = re.compile(r"attention\.self\.key\.bias$")
ZERO_GRAD_ATOL = 1e-6  # noise level of a float32 backward pass through two layers


def hf_named(model, tree) -> dict[str, np.ndarray]:
    """A jtrain params-shaped tree (e.g. grads) as HF-named, HF-laid-out numpy arrays."""
    return to_hf_state_dict(model, tree)


def jtrain_grads(model, params, batch):
    """((mean loss, logits), grads) of jtrain's loss, as the train step computes it."""
    loss_fn = LOSSES_BY_TASK[model.task]

    def mean_loss(p):
        outputs = model.apply(p, batch)
        out = loss_fn(outputs, batch)
        return out.loss_sum / out.weight, outputs["logits"]

    return jax.jit(jax.value_and_grad(mean_loss, has_aux=True))(params)


def hf_grads(hf, batch):
    kwargs = {k: torch.as_tensor(np.asarray(v)).long() for k, v in batch.items()}
    hf.zero_grad()
    out = hf(**kwargs)
    out.loss.backward()
    return float(out.loss.detach()), out.logits.detach().numpy(), {n: p.grad.numpy() for n, p in hf.named_parameters()}


def assert_grads_close(ours: dict, expected: dict, rtol: float) -> None:
    """Per-parameter relative error below `rtol` (analytically zero gradients checked absolutely)."""
    assert set(expected) <= set(ours), set(expected) - set(ours)
    for name, g_ref in expected.items():
        if ZERO_GRAD.search(name):
            assert np.abs(ours[name]).max() < ZERO_GRAD_ATOL and np.abs(g_ref).max() < ZERO_GRAD_ATOL, name
            continue
        err = np.linalg.norm(ours[name] - g_ref) / max(np.linalg.norm(g_ref), 1e-12)
        assert err < rtol, f"{name}: relative error {err:.2e}"


# Execution options ride along: scanned/rematerialised variants must reproduce HF's gradients
# just as the plain model does, so one compile checks both.
GRAD_CASES = [
    # (id, model_type, task, HF config overrides, jtrain options, batch options)
    # The plain llama (GQA, untied) is in test_plain_llama_and_its_scanned_remat_variant below.
    ("llama-tied-scan-remat", "llama", "causal_lm", {"tie_word_embeddings": True},
     {"scan_layers": True, "remat_policy": "dots_with_no_batch_dims_saveable"}, {}),
    ("qwen2-windows-scan-remat", "qwen2", "causal_lm", {}, {"scan_layers": True, "remat_policy": "nothing_saveable"},
     {}),
    # Gemma: norm weights as offsets from 1, embeddings scaled by sqrt(hidden), GeGLU, MQA, tied head.
    ("gemma-lm", "gemma", "causal_lm", {}, {}, {}),
    # Gemma 2: sandwich norms, scores and logits soft-capped (caps small enough to bite), scale from
    # query_pre_attn_scalar, a 3-token window on layer 0; once unrolled on the CPU path, once scanned
    # through the reference einsum.
    ("gemma2-lm", "gemma2", "causal_lm", {}, {}, {}),
    ("gemma2-lm-scan-reference", "gemma2", "causal_lm", {}, {"scan_layers": True, "attention_impl": "reference"}, {}),
    # Qwen3: per-head q/k RMSNorm before RoPE (head_dim 16 != hidden / heads), with biases and a window on layer 1.
    ("qwen3-qknorm-window-scan", "qwen3", "causal_lm",
     {"attention_bias": True, "use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1},
     {"scan_layers": True}, {}),
    ("bert-mlm", "bert", "masked_lm", {}, {}, {"token_types": True}),
    ("bert-seqcls-scan-remat", "bert", "sequence_classification", {"num_labels": 3},
     {"scan_layers": True, "remat_policy": "full"}, {"token_types": True}),
]


def _case(case, tmp_path):
    _, model_type, task, overrides, options, batch_opts = case
    hf = hf_model(model_type, task, **overrides)
    hf.save_pretrained(tmp_path)
    batch = with_labels(padded_batch(model_type, **batch_opts), task, overrides.get("num_labels", 2))
    return hf, batch, from_pretrained(tmp_path, **options)


def _assert_matches_hf(hf, batch, model, params):
    (loss, logits), grads = jtrain_grads(model, params, batch)
    hf_loss, hf_logits, expected = hf_grads(hf, batch)
    where = real_positions(batch, model.task)
    np.testing.assert_allclose(np.asarray(logits)[where], hf_logits[where], atol=LOGITS_ATOL)
    np.testing.assert_allclose(float(loss), hf_loss, rtol=GRAD_RTOL)
    assert_grads_close(hf_named(model, grads), expected, GRAD_RTOL)
    return (loss, logits), grads


@pytest.mark.parametrize("case", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_logits_and_gradients_match_transformers(case, tmp_path):
    hf, batch, (model, params) = _case(case, tmp_path)
    _assert_matches_hf(hf, batch, model, params)


def test_plain_llama_and_its_scanned_remat_variant(tmp_path):
    """The plain llama matches HF; its scanned, rematerialised twin matches it more tightly (same
    float32 ops, different fusion), so remat/scan change memory and speed, not results."""
    hf, batch, (plain, params) = _case(("llama", "llama", "causal_lm", {}, {}, {}), tmp_path)
    (loss, logits), grads = _assert_matches_hf(hf, batch, plain, params)
    variant, vparams = from_pretrained(tmp_path, scan_layers=True, remat_policy="full")
    (vloss, vlogits), vgrads = jtrain_grads(variant, vparams, batch)
    np.testing.assert_allclose(vloss, loss, rtol=SAME_MATH_RTOL)
    np.testing.assert_allclose(vlogits, logits, atol=SAME_MATH_ATOL)
    assert_grads_close(hf_named(variant, vgrads), hf_named(plain, grads), SAME_MATH_RTOL)
