"""Losses as `(sum, weight)`, never a mean.

Token losses are summed over real tokens and the count travels beside them, so gradient
accumulation and data parallelism divide once by the global count (k micro-batches give the
same update as one big batch, whatever their padding). All arithmetic is in float32.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100


class LossOutput(NamedTuple):
    """Summed loss, the count it is summed over, and extra summed statistics (e.g. correct)."""

    loss_sum: jax.Array
    weight: jax.Array
    stats: dict


def token_cross_entropy(
    logits_BLV: jax.Array, labels_BL: jax.Array, *, label_smoothing: float = 0.0
) -> LossOutput:
    """Cross-entropy summed over positions whose label is not -100 (HF's ignore index).

    Label smoothing follows HF's `LabelSmoother`: (1 - eps) * nll + eps * mean over the
    vocabulary of -log p.
    """
    logits = logits_BLV.astype(jnp.float32)
    valid = labels_BL != IGNORE_INDEX
    safe = jnp.where(valid, labels_BL, 0)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    if label_smoothing:
        smooth = -jnp.mean(logp, axis=-1)
        nll = (1.0 - label_smoothing) * nll + label_smoothing * smooth
    weight = jnp.sum(valid, dtype=jnp.float32)
    correct = jnp.sum((jnp.argmax(logits, -1) == labels_BL) & valid, dtype=jnp.float32)
    return LossOutput(jnp.sum(jnp.where(valid, nll, 0.0)), weight, {"correct": correct})


def causal_lm_loss(
    outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array], *, label_smoothing: float = 0.0
) -> LossOutput:
    """Next-token loss: logits at position t predict labels at t+1 (HF shifts inside the model)."""
    logits = outputs["logits"][:, :-1]
    labels = batch["labels"][:, 1:]
    return token_cross_entropy(logits, labels, label_smoothing=label_smoothing)


def masked_lm_loss(
    outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array], *, label_smoothing: float = 0.0
) -> LossOutput:
    """Masked-LM / token-classification loss: labels align with positions (no shift)."""
    return token_cross_entropy(outputs["logits"], batch["labels"], label_smoothing=label_smoothing)


def sequence_classification_loss(
    outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array], *, label_smoothing: float = 0.0
) -> LossOutput:
    """One label per row; mean-squared error when the head has one output (HF's regression)."""
    logits = outputs["logits"].astype(jnp.float32)
    labels = batch["labels"]
    if logits.shape[-1] == 1:
        err = (logits[:, 0] - labels.astype(jnp.float32)) ** 2
        n = jnp.float32(labels.shape[0])
        return LossOutput(jnp.sum(err), n, {"correct": jnp.float32(0.0)})
    return token_cross_entropy(logits[:, None, :], labels.reshape(-1, 1), label_smoothing=label_smoothing)


LOSSES_BY_TASK = {
    "causal_lm": causal_lm_loss,
    "masked_lm": masked_lm_loss,
    "token_classification": masked_lm_loss,
    "sequence_classification": sequence_classification_loss,
}
