"""Post-training quantisation: weight-only int8/int4 (or NF4) of a trained model, with its cost.

`post_training_quantize` turns trained float params into a `QuantizedModel` and its params
and measures the weight error; `compare_eval_loss` runs the same eval step (jtrain's
`make_eval_step`, token-weighted mean) on the float and the quantised model so the loss the
quantisation costs is reported beside the float one. `save_quantized`/`load_quantized`
(`jtrain.quant.io`) write and read the result for later evaluation.

Example::

    qmodel, qparams, report = post_training_quantize(model, params, "int8")
    print(report.summary(), compare_eval_loss(model, params, qmodel, qparams, batches, causal_lm_loss))
    save_quantized("out/int8", qmodel, qparams)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import jax

from jtrain.quant.formats import QuantFormat
from jtrain.quant.model import QuantizedModel, QuantReport, quantization_report
from jtrain.quant.targets import Targets
from jtrain.step import make_eval_step


def post_training_quantize(model: Any, params: Any, fmt: QuantFormat | str = "int8", targets: Targets = None
                           ) -> tuple[QuantizedModel, Any, QuantReport]:
    """(QuantizedModel, quantised params, weight-error report) for trained float `params`."""
    qmodel = QuantizedModel(model, fmt, targets)
    qparams = jax.jit(qmodel.quantize_params)(params)
    return qmodel, qparams, quantization_report(params, qparams)


def evaluate_loss(model: Any, params: Any, batches: Iterable[Mapping[str, Any]], loss_fn: Callable) -> float:
    """Token-weighted mean loss over `batches` (sums on the device, one division at the end)."""
    step = jax.jit(make_eval_step(model.apply, loss_fn))
    loss_sum = weight = 0.0
    for batch in batches:
        out = step(params, dict(batch))
        loss_sum += float(out["loss_sum"])
        weight += float(out["weight"])
    return loss_sum / max(weight, 1.0)


@dataclass(frozen=True)
class LossComparison:
    eval_loss_float: float
    eval_loss_quantized: float

    @property
    def delta(self) -> float:
        return self.eval_loss_quantized - self.eval_loss_float

    def as_dict(self) -> dict[str, float]:
        return {"eval_loss_float": self.eval_loss_float, "eval_loss_quantized": self.eval_loss_quantized,
                "eval_loss_delta": self.delta}


def compare_eval_loss(model: Any, params: Any, qmodel: QuantizedModel, qparams: Any,
                      batches: Iterable[Mapping[str, Any]], loss_fn: Callable, *,
                      float_loss: float | None = None) -> LossComparison:
    """Eval loss of the float model and of its quantised form on the same batches.

    Pass `float_loss` (from `evaluate_loss`) to compare several formats without re-running
    the float model."""
    batches = [dict(b) for b in batches]
    if float_loss is None:
        float_loss = evaluate_loss(model, params, batches, loss_fn)
    return LossComparison(float_loss, evaluate_loss(qmodel, qparams, batches, loss_fn))
