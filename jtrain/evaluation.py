"""The evaluation loop: summed loss and accuracy reduced on the device, predictions on request.

Sums stay on the device across batches and are fetched once at the end, so evaluation costs no
per-batch host sync unless `compute_metrics` needs predictions; then each batch's
(preprocessed) logits are fetched, filler rows dropped, and concatenated on the host. Because
predictions leave the device after every batch, device memory is bounded whatever
`eval_accumulation_steps` says (HF's option bounds device memory the same way).
`include_for_metrics` adds `inputs` (input ids) and `losses` (per-batch mean loss) to the
`EvalPrediction`, as HF does.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from jtrain.data.loader import HostLoader


@dataclass
class EvalPrediction:
    """HF's `EvalPrediction`: what `compute_metrics` receives."""

    predictions: Any
    label_ids: Any
    inputs: Any = None
    losses: Any = None

    def __iter__(self):
        return iter((self.predictions, self.label_ids))


@dataclass
class EvalLoopOutput:
    predictions: Any
    label_ids: Any
    metrics: dict
    num_samples: int


def _sum_metrics(total: dict | None, step_out: dict) -> dict:
    reduced = {k: v for k, v in step_out.items() if k != "predictions"}
    return reduced if total is None else jax.tree.map(lambda a, b: a + b, total, reduced)


def evaluation_loop(trainer: Any, loader: HostLoader, prefix: str, want_predictions: bool) -> EvalLoopOutput:
    """Run the eval (or predict) step over `loader`; return HF-keyed metrics."""
    start = time.perf_counter()
    steps, params, n_rows = trainer.steps, trainer.train_state.full_params(), len(loader.dataset)
    total, preds, labels, inputs, losses = None, [], [], [], []
    include = set(trainer.args.include_for_metrics or ())
    step_fn = steps.predict_step if want_predictions else steps.eval_step
    for i, batch in enumerate(loader.iterate(epoch=0)):
        out = step_fn(params, batch)
        total = _sum_metrics(total, out)
        if want_predictions:
            real = min(loader.global_batch_size, n_rows - i * loader.global_batch_size)
            preds.append(np.asarray(jax.device_get(out["predictions"]))[:real])
            if "labels" in batch:
                labels.append(np.asarray(jax.device_get(batch["labels"]))[:real])
            if "inputs" in include:
                inputs.append(np.asarray(jax.device_get(batch["input_ids"]))[:real])
            if "loss" in include:
                losses.append(float(out["loss_sum"]) / max(float(out["weight"]), 1.0))
        trainer.control = trainer.callback_handler.on_prediction_step(trainer.args, trainer.state, trainer.control)
    sums = {k: float(v) for k, v in jax.device_get(total).items()}
    weight = max(sums.pop("weight", 0.0), 1.0)
    metrics = {f"{prefix}_loss": sums.pop("loss_sum") / weight}
    if "correct" in sums:
        metrics[f"{prefix}_accuracy"] = sums.pop("correct") / weight
    if trainer.model.task in ("causal_lm", "masked_lm"):
        metrics[f"{prefix}_perplexity"] = math.exp(min(metrics[f"{prefix}_loss"], 700.0))
    predictions = np.concatenate(preds) if preds else None
    label_ids = np.concatenate(labels) if labels else None
    if trainer.compute_metrics is not None and predictions is not None:
        extra = trainer.compute_metrics(EvalPrediction(
            predictions, label_ids, inputs=np.concatenate(inputs) if inputs else None,
            losses=np.asarray(losses) if losses else None))
        metrics.update({(k if k.startswith(f"{prefix}_") else f"{prefix}_{k}"): v for k, v in extra.items()})
    runtime = time.perf_counter() - start
    metrics.update({
        f"{prefix}_runtime": round(runtime, 4),
        f"{prefix}_samples_per_second": round(n_rows / runtime, 3),
        f"{prefix}_steps_per_second": round(len(loader) / runtime, 3),
    })
    return EvalLoopOutput(predictions, label_ids, metrics, n_rows)
