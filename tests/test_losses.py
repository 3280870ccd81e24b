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


def test_sequence_classification_losses_match_hfs_three_problem_types():
    """HF's ForSequenceClassificationLoss infers the problem type from the head and the labels: one
    output -> MSE, integer labels -> cross-entropy, float [rows, classes] labels -> BCEWithLogits
    averaged over every entry. jtrain had no multi-label loss (float targets were read as class ids
    or failed on their shape). Extreme logits (+-60) check the stable form. Float32 on both sides
    over a few terms: 1e-6 relative is rounding. NaN targets (the loader's filler rows) are left out
    of sum and count, so a padded batch gives the loss of its real rows."""
    import torch
    from transformers.loss.loss_utils import ForSequenceClassificationLoss

    from jtrain.errors import ConfigError
    from jtrain.losses import sequence_classification_loss

    class Config:
        problem_type = None

        def __init__(self, num_labels):
            self.num_labels = num_labels

    rng = np.random.default_rng(0)
    cases = {"regression": (rng.normal(size=(5, 1)), rng.normal(size=5).astype(np.float32)),
             "single": (rng.normal(size=(5, 3)), rng.integers(0, 3, size=5).astype(np.int32)),
             "multi": (np.concatenate([rng.normal(size=(4, 3)), [[60.0, -60.0, 0.5]]]),
                       rng.integers(0, 2, size=(5, 3)).astype(np.float32))}
    for name, (logits, labels) in cases.items():
        logits = logits.astype(np.float32)
        out = sequence_classification_loss({"logits": logits}, {"labels": labels})
        hf_labels = torch.tensor(labels if labels.dtype == np.float32 else labels.astype(np.int64))  # HF: long ids
        hf = ForSequenceClassificationLoss(hf_labels, torch.tensor(logits), Config(logits.shape[-1]))
        np.testing.assert_allclose(float(out.loss_sum / out.weight), float(hf), rtol=1e-6, err_msg=name)
        padded = np.concatenate([labels, np.full((2,) + labels.shape[1:], np.nan, np.float32)]) \
            if labels.dtype == np.float32 else np.concatenate([labels, [-100, -100]]).astype(np.int32)
        more = np.concatenate([logits, rng.normal(size=(2, logits.shape[1])).astype(np.float32)])
        filled = sequence_classification_loss({"logits": more}, {"labels": padded})
        np.testing.assert_allclose(float(filled.loss_sum), float(out.loss_sum), rtol=1e-6, err_msg=name)
        assert float(filled.weight) == float(out.weight), name
    assert "correct" not in sequence_classification_loss({"logits": cases["regression"][0].astype(np.float32)},
                                                         {"labels": cases["regression"][1]}).stats
    with pytest.raises(ConfigError, match=r"labels of shape \(5,\) for a head of 3 outputs under "
                                          r"multi_label_classification.*integer class ids"):
        sequence_classification_loss({"logits": np.zeros((5, 3), np.float32)}, {"labels": np.zeros(5, np.float32)})
    # The config's problem_type, when set, decides as in HF: a 3-output regression (MSE over every
    # entry), and each of the others named explicitly.
    explicit = {"regression": (rng.normal(size=(5, 3)), rng.normal(size=(5, 3))),
                "single_label_classification": cases["single"],
                "multi_label_classification": cases["multi"]}
    for problem_type, (logits, labels) in explicit.items():
        logits, config = logits.astype(np.float32), Config(3)
        config.problem_type = problem_type
        labels = labels.astype(np.float32) if labels.dtype.kind == "f" else labels
        out = sequence_classification_loss({"logits": logits}, {"labels": labels}, problem_type=problem_type)
        hf_labels = torch.tensor(labels if labels.dtype == np.float32 else labels.astype(np.int64))
        hf = ForSequenceClassificationLoss(hf_labels, torch.tensor(logits), config)
        np.testing.assert_allclose(float(out.loss_sum / out.weight), float(hf), rtol=1e-6, err_msg=problem_type)
    with pytest.raises(ConfigError, match=r"labels of shape \(5, 3\) for 5 rows: single-label.*problem_type: "
                                          r"multi_label_classification"):  # integer 0/1 targets, type unset
        sequence_classification_loss({"logits": np.zeros((5, 3), np.float32)}, {"labels": np.zeros((5, 3), np.int32)})
    with pytest.raises(ConfigError, match="unknown problem_type 'ordinal'"):
        sequence_classification_loss({"logits": np.zeros((5, 3), np.float32)}, {"labels": np.zeros(5, np.int32)},
                                     problem_type="ordinal")
