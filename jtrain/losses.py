"""Losses as `(sum, weight)`, never a mean.

Token losses are summed over real tokens and the count travels beside them, so gradient
accumulation and data parallelism divide once by the global count (k micro-batches give the
same update as one big batch, whatever their padding). All arithmetic is in float32.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from jtrain.errors import ConfigError
from jtrain.models import cpu_cross_entropy

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

    Computed as logsumexp(logits) - logit[label], which never materialises the [B, L, V]
    log-softmax (on a large vocabulary that pass costs as much as a layer). A label outside
    [0, vocab) other than -100 makes its position NaN (the Trainer names such labels before they
    reach the device; a direct caller sees a non-finite loss, never another class's logit). Label smoothing
    follows HF's `LabelSmoother`: (1 - eps) * nll + eps * mean over the vocabulary of -log p,
    where -mean(log p) = logsumexp - mean(logits).
    """
    logits = logits_BLV.astype(jnp.float32)
    valid = labels_BL != IGNORE_INDEX
    # Any other label outside [0, vocab) gives NaN on both paths, as PyTorch would raise: a negative
    # one is sent past the end (a gather would wrap it to another class; the kernel would skip it).
    labels = jnp.where(valid & (labels_BL < 0), logits.shape[-1], labels_BL)
    if not label_smoothing and logits_BLV.dtype == jnp.float32 and cpu_cross_entropy.applies(logits):
        nll = cpu_cross_entropy.token_nll(logits, jnp.where(valid, labels, -1))  # one pass per direction
        return _summed(nll, valid, logits, labels_BL)
    safe = jnp.where(valid, labels, 0)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1, mode="fill", fill_value=jnp.nan)[..., 0]
    nll = lse - picked
    if label_smoothing:
        smooth = lse - jnp.mean(logits, axis=-1)
        nll = (1.0 - label_smoothing) * nll + label_smoothing * smooth
    return _summed(nll, valid, logits, labels_BL)


def _summed(nll: jax.Array, valid: jax.Array, logits: jax.Array, labels: jax.Array) -> LossOutput:
    """The loss sum over valid positions, their count and the argmax hits (an eval statistic: a
    train step that drops it lets XLA skip the argmax pass)."""
    weight = jnp.sum(valid, dtype=jnp.float32)
    correct = jnp.sum((jnp.argmax(logits, -1) == labels) & valid, dtype=jnp.float32)
    return LossOutput(jnp.sum(jnp.where(valid, nll, 0.0)), weight, {"correct": correct})


def shift_labels_left(labels_BL: jax.Array) -> jax.Array:
    """Labels for next-token prediction aligned with the logits: position t gets label t+1 and
    the last position -100. Shifting the labels instead of slicing the logits avoids copying the
    [B, L-1, V] logits."""
    return jnp.concatenate([labels_BL[:, 1:], jnp.full_like(labels_BL[:, :1], IGNORE_INDEX)], axis=1)


def with_router_loss(out: LossOutput, outputs: Mapping[str, Any]) -> LossOutput:
    """Add a mixture-of-experts model's load-balancing loss and routing counts (no-op for dense models).

    The aux loss is a mean over the batch's tokens, not a sum, and it is not additive (HF's
    `load_balancing_loss_func` multiplies two batch means), so it joins the `(sum, weight)`
    convention as `coef * aux * weight`: after the step divides by the token count once, one
    batch gives exactly HF's `ce_mean + router_aux_loss_coef * aux_loss`, and k micro-batches
    give `ce_mean + coef * (token-weighted mean of the micro-batches' aux losses)`, which is
    what every micro-batching MoE trainer computes (exact agreement would need the whole
    batch's expert counts before any micro-batch's gradient). A data- or expert-parallel batch
    is one micro-batch: its aux loss is the global batch's, as on one device. Stats: the
    per-expert and dropped counts of `jtrain.models.moe.router_statistics`, plus
    `moe_aux_loss` = aux * weight (divide by `num_tokens` for the mean aux loss).
    """
    if "aux_loss" not in outputs:
        return out
    aux = outputs["aux_loss"].astype(jnp.float32)
    coef = jnp.asarray(outputs.get("aux_loss_coef", 0.0), jnp.float32)
    stats = {**out.stats, **outputs.get("router_stats", {}), "moe_aux_loss": aux * out.weight}
    return LossOutput(out.loss_sum + coef * aux * out.weight, out.weight, stats)


def routing_logs(metrics: Mapping[str, float]) -> dict[str, float]:
    """Host-side view of one step's summed routing stats (`with_router_loss`): per-expert and
    dropped fractions of the top-k assignments, and the mean aux loss; {} for dense models.

    Example (in a logging callback)::

        logs.update(routing_logs(step_metrics))  # {"moe_expert_0_fraction": 0.26, ..., "moe_aux_loss": 2.01}
    """
    total = float(metrics.get("moe_assignments", 0.0))
    if not total:
        return {}
    out = {f"{k}_fraction": round(float(v) / total, 6) for k, v in metrics.items()
           if k.startswith("moe_expert_") and not k.endswith("_fraction")}
    out["moe_dropped_fraction"] = round(float(metrics.get("moe_dropped", 0.0)) / total, 6)
    if "moe_aux_loss" in metrics and metrics.get("num_tokens"):
        out["moe_aux_loss"] = round(float(metrics["moe_aux_loss"]) / float(metrics["num_tokens"]), 6)
    return out


def causal_lm_loss(
    outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array], *, label_smoothing: float = 0.0
) -> LossOutput:
    """Next-token loss: logits at position t predict labels at t+1 (HF shifts inside the model).

    For mixture-of-experts models the router's load-balancing loss is added as HF's
    `MixtralForCausalLM` does (see `with_router_loss`).
    """
    labels = shift_labels_left(batch["labels"])
    return with_router_loss(token_cross_entropy(outputs["logits"], labels, label_smoothing=label_smoothing), outputs)


def masked_lm_loss(
    outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array], *, label_smoothing: float = 0.0
) -> LossOutput:
    """Masked-LM / token-classification loss: labels align with positions (no shift)."""
    return token_cross_entropy(outputs["logits"], batch["labels"], label_smoothing=label_smoothing)


def sequence_classification_loss(
    outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array], *, label_smoothing: float = 0.0,
    problem_type: str | None = None,
) -> LossOutput:
    """One label per row, with HF's three problem types: the config's `problem_type`, or, unset, what
    HF infers from the head and the labels: one output is a regression (mean-squared error), integer
    labels are class ids (cross-entropy), float labels [rows, num_labels] are multi-label targets
    (binary cross-entropy per class). Regression and multi-label average over every entry, as HF's
    MSELoss and BCEWithLogitsLoss; their float labels that are NaN (the loader's filler rows; -100
    for integer labels) are left out of the sum and the count. Neither reports an accuracy (HF's
    Trainer reports none either)."""
    logits = outputs["logits"].astype(jnp.float32)
    labels = batch["labels"]
    floating = jnp.issubdtype(labels.dtype, jnp.floating)
    if problem_type is None:
        problem_type = ("regression" if logits.shape[-1] == 1 else
                        "multi_label_classification" if floating else "single_label_classification")
    if problem_type == "single_label_classification":
        if labels.size != logits.shape[0]:
            raise ConfigError(f"labels of shape {tuple(labels.shape)} for {logits.shape[0]} rows: single-label "
                              "classification takes one integer class id per row; per-class 0/1 targets [rows, "
                              "num_labels] are multi-label (float labels, or problem_type: multi_label_classification "
                              "in the model config)")
        return token_cross_entropy(logits[:, None, :], labels.astype(jnp.int32).reshape(-1, 1),
                                   label_smoothing=label_smoothing)
    if problem_type not in ("regression", "multi_label_classification"):
        raise ConfigError(f"unknown problem_type {problem_type!r} in the model config; HF's are regression, "
                          "single_label_classification and multi_label_classification")
    target = labels.astype(jnp.float32).reshape(logits.shape[0], -1)
    if target.shape != logits.shape:
        raise ConfigError(f"labels of shape {tuple(labels.shape)} for a head of {logits.shape[-1]} outputs under "
                          f"{problem_type}: it takes one target per output, shape {logits.shape} (single-label "
                          "classification takes integer class ids)")
    # float labels pad with NaN, integer ones (class ids, integer scores) with -100
    valid = ~jnp.isnan(target) if floating else target != IGNORE_INDEX
    target = jnp.where(valid, target, 0.0)
    if problem_type == "regression":
        per_entry = (logits - target) ** 2
    else:  # log(1 + exp(x)) - x z, written so that no exp overflows (as torch's BCEWithLogitsLoss)
        per_entry = jnp.maximum(logits, 0.0) - logits * target + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    return LossOutput(jnp.sum(jnp.where(valid, per_entry, 0.0)), jnp.sum(valid, dtype=jnp.float32), {})


LOSSES_BY_TASK = {
    "causal_lm": causal_lm_loss,
    "masked_lm": masked_lm_loss,
    "token_classification": masked_lm_loss,
    "sequence_classification": sequence_classification_loss,
}


class ModelOutputs(dict):
    """A model's outputs dict that also reads as attributes (`outputs.logits`), as HF's ModelOutput,
    so loss functions written against HF's outputs run on jtrain's."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as err:
            raise AttributeError(f"the model outputs have no {name!r}; they have {sorted(self)}") from err


def takes_hf_loss_arguments(fn: Callable) -> bool:
    """Whether `fn` has HF's `compute_loss_func` signature `(outputs, labels, num_items_in_batch)`
    rather than jtrain's `(outputs, batch)`."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    positional = [p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return "num_items_in_batch" in params or len(positional) >= 3


def compute_loss_func_adapter(fn: Callable, task: str) -> Callable[[Mapping[str, Any], Mapping[str, Any]], LossOutput]:
    """The Trainer's `compute_loss_func` as a `(outputs, batch) -> LossOutput` loss.

    jtrain's own signature, `fn(outputs, batch) -> LossOutput(sum, weight, stats)`, is used as it is
    (its result is checked when the step is traced). HF's, `fn(outputs, labels, num_items_in_batch)
    -> loss`, written with jax.numpy: each micro-batch passes its own item count, the labels HF
    counts (`labels[..., 1:]` for a causal LM, whose loss shifts them; all labels otherwise, -100
    left out), and the returned mean is turned back into a sum. HF's documented form, a sum divided
    by `num_items_in_batch`, then trains exactly like jtrain's built-in loss; a plain mean does too
    whenever the function averages over the items HF counts.
    """
    if not takes_hf_loss_arguments(fn):
        def checked(outputs: Mapping[str, Any], batch: Mapping[str, Any]) -> LossOutput:
            out = fn(outputs, batch)
            if isinstance(out, tuple) and len(out) in (2, 3):
                return LossOutput(out[0], out[1], out[2] if len(out) == 3 else {})
            raise ConfigError(f"compute_loss_func(outputs, batch) returned a {type(out).__name__}; it must return "
                              "jtrain.losses.LossOutput(loss_sum, weight, stats), or take HF's arguments "
                              "(outputs, labels, num_items_in_batch) and return the mean loss")
        return checked

    def hf_style(outputs: Mapping[str, Any], batch: Mapping[str, Any]) -> LossOutput:
        if "labels" not in batch:
            raise ConfigError(f"compute_loss_func takes HF's (outputs, labels, num_items_in_batch), but the batch has "
                              f"no 'labels' (it has {sorted(batch)})")
        labels = batch["labels"]
        counted = labels[..., 1:] if task == "causal_lm" else labels
        weight = jnp.sum(counted != IGNORE_INDEX, dtype=jnp.float32)
        loss = jnp.asarray(fn(ModelOutputs(outputs), labels, num_items_in_batch=weight), jnp.float32)
        if loss.ndim:
            raise ConfigError(f"compute_loss_func returned an array of shape {loss.shape}; HF's signature returns "
                              "one scalar loss")
        return LossOutput(loss * weight, weight, {})

    return hf_style
