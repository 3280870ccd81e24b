"""Losses against references: HF's LabelSmoother (PyTorch) and a research loop built on the public step."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from jtrain import TrainState, causal_lm_loss, make_train_step
from jtrain.losses import masked_lm_loss
from tiny import lm_rows, padded_lm_batch, tiny_llama


@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("shift", [False, True])
def test_label_smoothing_matches_hf_label_smoother(epsilon, shift):
    torch = pytest.importorskip("torch", reason="the reference is HF's PyTorch LabelSmoother (test extra)")
    from transformers.trainer_pt_utils import LabelSmoother

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 7, 11)).astype(np.float32)
    batch = padded_lm_batch(3, 7, seed=1, vocab=11)
    loss_fn = causal_lm_loss if shift else masked_lm_loss
    out = loss_fn({"logits": logits}, batch, label_smoothing=epsilon)
    ours = float(out.loss_sum / out.weight)
    hf = LabelSmoother(epsilon=epsilon)({"logits": torch.tensor(logits)}, torch.tensor(batch["labels"]).long(),
                                        shift_labels=shift)
    # Both sides compute log-softmax in float32 over 11 classes; 1e-6 relative is float32 rounding.
    np.testing.assert_allclose(ours, float(hf), rtol=1e-6)


def test_research_loop_with_public_step_learns():
    """The README's research loop: the public step without the Trainer, about 20 lines."""
    model = tiny_llama()
    tx = optax.adamw(3e-3)
    state = TrainState.create(model.init(jax.random.key(0)), tx, jax.random.key(1))
    step = jax.jit(make_train_step(model.apply, causal_lm_loss, tx, lr_schedule=3e-3), donate_argnums=0)
    rows = lm_rows(64, 16)
    losses = []
    for i in range(30):
        pick = np.random.default_rng(i).choice(64, size=8, replace=False)
        batch = {k: v[pick].reshape(2, 4, 16) for k, v in rows.items()}  # 2 micro-batches of 4 rows
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 30
    assert losses[-1] < 0.5 * losses[0], losses
    assert float(metrics["learning_rate"]) == pytest.approx(3e-3, rel=1e-6)
    assert int(metrics["num_tokens"]) == 8 * 15  # causal shift: 15 predicted tokens per 16-token row
