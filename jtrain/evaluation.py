"""The evaluation loop: loss and accuracy reduced on the device, predictions on request.

`eval_loss` is HF's: each batch's mean loss over its scored tokens, counted once per row of the batch
and averaged over the rows (HF repeats a batch's loss for each of its rows), which differs from the
mean over every token when batches hold different numbers of tokens; accuracy is over every scored
token. Sums stay on the device across batches and are fetched once at the end, so evaluation costs no
per-batch host sync unless `compute_metrics` needs predictions; then each batch's
(preprocessed) logits are fetched, filler rows dropped, and concatenated on the host. Because
predictions leave the device after every batch, device memory is bounded whatever
`eval_accumulation_steps` says (HF's option bounds device memory the same way).
`include_for_metrics` adds `inputs` (input ids) and `losses` (each batch's mean loss, repeated
for each of its rows) to the `EvalPrediction`, as HF does.

HF's two memory options behave as in HF: `batch_eval_metrics` calls `compute_metrics` after every
batch with `compute_result` true only on the last one, whose return value is the metrics, and
keeps no predictions in `evaluate` (`predict` still returns them); `eval_do_concat_batches=False`
hands over (and returns) lists with one array per batch instead of concatenated arrays.
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
    # Keys jtrain adds beyond HF's evaluate (accuracy, perplexity) that compute_metrics did not set;
    # the default hyperparameter-search objective leaves them out, so it means what HF's means.
    derived_keys: tuple[str, ...] = ()


def _sum_metrics(total: dict | None, step_out: dict) -> dict:
    reduced = {k: v for k, v in step_out.items() if k != "predictions"}
    return reduced if total is None else jax.tree.map(lambda a, b: a + b, total, reduced)


class _Collected:
    """Per-batch host arrays of one kind (predictions, labels, ...), concatenated or kept as a list.
    A batch's part may be a pytree (a `prediction_step` returning a tuple or dict): leaves concatenate."""

    def __init__(self, concat: bool):
        self.concat, self.parts = concat, []

    def add(self, part: np.ndarray | None) -> None:
        if part is not None:
            self.parts.append(part)

    def result(self) -> Any:
        if not self.parts:
            return None
        return jax.tree.map(lambda *xs: pad_and_concatenate(xs), *self.parts) if self.concat else list(self.parts)


PADDING_INDEX = -100  # HF's evaluation loop pads predictions, labels and inputs with it


def pad_and_concatenate(parts: Any) -> np.ndarray:
    """HF's `nested_concat`: batches stacked on the first axis; where their second axis differs (sequences
    padded per batch), each is padded on the right to the longest with -100, as HF's loop pads them."""
    parts = [np.asarray(p) for p in parts]
    if parts[0].ndim < 2 or len({p.shape[1] for p in parts}) == 1:
        return np.concatenate(parts)
    longest = max(p.shape[1] for p in parts)
    padded = []
    for p in parts:
        widths = [(0, 0), (0, longest - p.shape[1])] + [(0, 0)] * (p.ndim - 2)
        padded.append(np.pad(p, widths, constant_values=np.array(PADDING_INDEX).astype(p.dtype)))
    return np.concatenate(padded)


class _RowsLoss:
    """HF's eval_loss: each batch's mean loss (over its scored tokens) repeated for each of its rows, averaged
    over the rows. Summed on the device, so no batch waits for the host."""

    def __init__(self) -> None:
        self.total, self.rows = None, 0

    def add(self, out: dict, rows: int) -> None:
        if "loss_sum" not in out:
            return
        part = out["loss_sum"] / jax.numpy.maximum(out["weight"], 1.0) * rows
        self.total, self.rows = part if self.total is None else self.total + part, self.rows + rows

    def mean(self) -> float:
        return float(jax.device_get(self.total)) / max(self.rows, 1)


def evaluation_loop(trainer: Any, loader: HostLoader, prefix: str, want_predictions: bool,
                    predicting: bool = False) -> EvalLoopOutput:
    """Run the eval (or predict) step over `loader`; return HF-keyed metrics.

    `predicting` is `predict()`: with `batch_eval_metrics` it still keeps the predictions (as HF).
    """
    start = time.perf_counter()
    args, steps, params, n_rows = trainer.args, trainer.steps, trainer.train_state.full_params(), len(loader.dataset)
    include = set(args.include_for_metrics or ())
    per_batch_metrics = args.batch_eval_metrics and trainer.compute_metrics is not None
    keep = not args.batch_eval_metrics or predicting
    kept = {k: _Collected(args.eval_do_concat_batches) for k in ("predictions", "labels", "inputs", "losses")}
    total, extra, n_batches, rows_loss = None, None, len(loader), _RowsLoss()
    step_fn = steps.predict_step if want_predictions else steps.eval_step
    for i, batch in enumerate(loader.iterate(epoch=0)):
        out = step_fn(params, batch)
        total = _sum_metrics(total, out)
        real = min(loader.global_batch_size, n_rows - i * loader.global_batch_size)
        rows_loss.add(out, real)
        if want_predictions:
            now = {"predictions": jax.tree.map(lambda x: np.asarray(x)[:real], jax.device_get(out["predictions"])),
                   "labels": np.asarray(jax.device_get(batch["labels"]))[:real] if "labels" in batch else None,
                   "inputs": (np.asarray(jax.device_get(batch["input_ids"]))[:real]
                              if "inputs" in include else None),
                   "losses": (np.full(real, float(out["loss_sum"]) / max(float(out["weight"]), 1.0), np.float32)
                              if "loss" in include and "loss_sum" in out else None)}
            if keep:
                for key, part in now.items():
                    kept[key].add(part)
            if per_batch_metrics and now["labels"] is not None:
                extra = trainer.compute_metrics(
                    EvalPrediction(now["predictions"], now["labels"], inputs=now["inputs"], losses=now["losses"]),
                    compute_result=i == n_batches - 1)
        trainer.control = trainer.callback_handler.on_prediction_step(trainer.args, trainer.state, trainer.control)
    sums = {k: float(v) for k, v in jax.device_get(total or {}).items()}
    metrics = {}
    if "loss_sum" in sums:  # batches without labels compute no loss, and HF then reports none
        weight = max(sums.pop("weight", 0.0), 1.0)
        metrics[f"{prefix}_loss"] = rows_loss.mean()
        sums.pop("loss_sum")
        if "correct" in sums:
            metrics[f"{prefix}_accuracy"] = sums.pop("correct") / weight
        if trainer.model.task in ("causal_lm", "masked_lm"):
            metrics[f"{prefix}_perplexity"] = math.exp(min(metrics[f"{prefix}_loss"], 700.0))
    predictions, label_ids = kept["predictions"].result(), kept["labels"].result()
    if trainer.compute_metrics is not None and predictions is not None and not per_batch_metrics:
        extra = trainer.compute_metrics(EvalPrediction(
            predictions, label_ids, inputs=kept["inputs"].result(), losses=kept["losses"].result()))
    derived = [k for k in metrics if k != f"{prefix}_loss"]  # jtrain's additions to HF's eval_loss
    if extra:
        extra = {(k if k.startswith(f"{prefix}_") else f"{prefix}_{k}"): v for k, v in extra.items()}
        metrics.update(extra)
        derived = [k for k in derived if k not in extra]
    runtime = time.perf_counter() - start
    metrics.update({
        f"{prefix}_runtime": round(runtime, 4),
        f"{prefix}_samples_per_second": round(n_rows / runtime, 3),
        f"{prefix}_steps_per_second": round(n_batches / runtime, 3),
    })
    return EvalLoopOutput(predictions, label_ids, metrics, n_rows, tuple(derived))
