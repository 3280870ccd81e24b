"""Every architecture x head against `transformers`: logits and losses on random padded batches.

Each case builds a tiny random HF model, saves it, loads it with `jtrain.models.from_pretrained`
(so this also tests HF -> jtrain loading) and compares in float32. Logits are compared only
where HF defines them the same way (non-padding tokens; HF's additive masks make fully masked
rows differ). One case runs the reference (einsum) attention path, so it too is checked against
HF. Tolerance reasons are in `test_models_common`.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jtrain.losses import LOSSES_BY_TASK
from jtrain.models import from_pretrained
from test_models_common import (LOGITS_ATOL, hf_forward, hf_model, padded_batch, real_positions,
                                with_labels)

_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8, "rope_theta": 10000.0}
# Cases whose gradients are also compared live in test_models_grads (which checks their logits too).
CASES = [
    # (id, model_type, task, HF config overrides, batch options, jtrain options)
    ("llama-rope-linear-biases", "llama", "causal_lm",
     {"attention_bias": True, "mlp_bias": True,
      "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}}, {}, {}),
    ("llama-rope-dynamic", "llama", "causal_lm", {"max_position_embeddings": 6,
                                                  "rope_parameters": {"rope_type": "dynamic", "factor": 2.0,
                                                                      "rope_theta": 10000.0}}, {}, {}),
    ("llama-rope-llama3", "llama", "causal_lm", {"rope_parameters": _LLAMA3}, {}, {}),
    ("mistral-window-reference-attn", "mistral", "causal_lm", {}, {}, {"attention_impl": "reference"}),
    ("llama-seqcls-leftpad-remat", "llama", "sequence_classification", {"num_labels": 3}, {"left": True},
     {"remat_policy": "full"}),
    ("llama-regression", "llama", "sequence_classification", {"num_labels": 1}, {}, {}),
    ("gemma-seqcls", "gemma", "sequence_classification", {"num_labels": 3}, {}, {}),
    ("qwen3-seqcls", "qwen3", "sequence_classification", {"num_labels": 3}, {}, {}),
    ("gemma2-seqcls", "gemma2", "sequence_classification", {"num_labels": 3}, {}, {}),
    ("gpt2-lm-token-types-scan", "gpt2", "causal_lm", {}, {"token_types": True}, {"scan_layers": True}),
    ("gpt2-seqcls", "gpt2", "sequence_classification", {"num_labels": 3}, {}, {}),
    ("bert-token", "bert", "token_classification", {"num_labels": 5}, {"token_types": True}, {}),
    ("llama-token", "llama", "token_classification", {"num_labels": 5}, {}, {}),
    ("gemma2-token-leftpad", "gemma2", "token_classification", {"num_labels": 5}, {"left": True}, {}),
    ("mixtral-token", "mixtral", "token_classification", {"num_labels": 5}, {}, {}),
    ("gpt2-token", "gpt2", "token_classification", {"num_labels": 5}, {}, {}),
    ("roberta-mlm", "roberta", "masked_lm", {}, {}, {}),
    ("roberta-seqcls", "roberta", "sequence_classification", {"num_labels": 3}, {}, {}),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_logits_and_loss_match_transformers(case, tmp_path):
    _, model_type, task, overrides, batch_opts, options = case
    hf = hf_model(model_type, task, **overrides)
    hf.save_pretrained(tmp_path)
    model, params = from_pretrained(tmp_path, **options)
    assert model.task == task
    batch = with_labels(padded_batch(model_type, **batch_opts), task, overrides.get("num_labels", 2))
    hf_logits, hf_loss = hf_forward(hf, batch)
    logits = np.asarray(jax.jit(model.apply)(params, batch)["logits"])
    where = real_positions(batch, task)
    np.testing.assert_allclose(logits[where], hf_logits[where], atol=LOGITS_ATOL)
    out = LOSSES_BY_TASK[task]({"logits": logits}, batch)
    np.testing.assert_allclose(float(out.loss_sum / out.weight), hf_loss, atol=LOGITS_ATOL)
