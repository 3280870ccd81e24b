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
from jtrain.models import architecture, from_pretrained
from jtrain.models.convert import from_leaf, leaf_maps
from test_models_common import hf_model, padded_batch, with_labels

GRAD_RTOL = 1e-4  # see module docstring
# Key biases add q.b_k to every score of a query row, which softmax ignores: their true gradient
# is exactly 0, so both sides hold float32 noise (~1e-9) and a relative error means nothing.
ZERO_GRAD = re.compile(r"(key|k_proj)\.bias$")
ZERO_GRAD_ATOL = 1e-6  # noise level of a float32 backward pass through two layers


def hf_named(model, tree) -> dict[str, np.ndarray]:
    """A jtrain params-shaped tree (e.g. grads) as HF-named, HF-laid-out numpy arrays."""
    maps = leaf_maps(model.abstract_params(), model.logical_axes(), architecture(model.config.model_type).conv1d_pattern)
    flat = {tuple(k.key for k in path): np.asarray(x) for path, x in jax.tree_util.tree_leaves_with_path(tree)}
    return {name: t for m in maps for name, t in from_leaf(m, flat[m.path])}


def jtrain_grads(model, params, batch):
    loss_fn = LOSSES_BY_TASK[model.task]

    def mean_loss(p):
        out = loss_fn(model.apply(p, batch), batch)
        return out.loss_sum / out.weight

    return jax.jit(jax.value_and_grad(mean_loss))(params)


def hf_grads(hf, batch):
    kwargs = {k: torch.as_tensor(np.asarray(v)).long() for k, v in batch.items()}
    hf.zero_grad()
    loss = hf(**kwargs).loss
    loss.backward()
    return float(loss.detach()), {n: p.grad.numpy() for n, p in hf.named_parameters()}


GRAD_CASES = [
    ("llama", "causal_lm", {}),
    ("llama", "causal_lm", {"tie_word_embeddings": True}),
    ("llama", "sequence_classification", {"num_labels": 3}),
    ("bert", "masked_lm", {}),
    ("bert", "sequence_classification", {"num_labels": 3}),
    ("gpt2", "causal_lm", {}),
]


@pytest.mark.parametrize("model_type,task,overrides", GRAD_CASES,
                         ids=[f"{c[0]}-{c[1]}-{len(c[2])}" for c in GRAD_CASES])
def test_gradients_match_transformers(model_type, task, overrides, tmp_path):
    hf = hf_model(model_type, task, **overrides)
    hf.save_pretrained(tmp_path)
    model, params = from_pretrained(tmp_path)
    batch = with_labels(padded_batch(model_type, token_types=model_type == "bert"), task,
                        overrides.get("num_labels", 2))
    loss, grads = jtrain_grads(model, params, batch)
    hf_loss, expected = hf_grads(hf, batch)
    np.testing.assert_allclose(float(loss), hf_loss, rtol=GRAD_RTOL)
    ours = hf_named(model, grads)
    assert set(expected) <= set(ours), set(expected) - set(ours)
    for name, g_hf in expected.items():
        if ZERO_GRAD.search(name):
            assert np.abs(ours[name]).max() < ZERO_GRAD_ATOL and np.abs(g_hf).max() < ZERO_GRAD_ATOL, name
            continue
        err = np.linalg.norm(ours[name] - g_hf) / max(np.linalg.norm(g_hf), 1e-12)
        assert err < GRAD_RTOL, f"{name}: relative error {err:.2e}"
