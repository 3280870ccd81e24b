"""`WrappedModel`: what every Model-shaped wrapper (LoRA, quantised bases, QAT) delegates.

A wrapper changes how params are stored or applied; the config, task and inputs stay the inner
model's, so code downstream (losses, loaders, checkpoints) sees the model it expects.
"""

from __future__ import annotations

from typing import Any

import jax


class WrappedModel:
    """Mixin: the Model attributes a wrapper takes from `self.inner` unchanged."""

    inner: Any

    @property
    def config(self) -> Any:
        return self.inner.config

    @property
    def task(self) -> str:
        return self.inner.task

    @property
    def input_names(self) -> tuple[str, ...]:
        return self.inner.input_names

    def _dummy_inputs(self, *args: Any, **kwargs: Any) -> dict[str, jax.Array]:
        """The inner model's tracing inputs (an outer wrapper such as LoRA traces with them)."""
        return self.inner._dummy_inputs(*args, **kwargs)


def innermost(model: Any) -> Any:
    """The plain model inside any wrappers (LoRA around a quantised base around a Llama): the one
    whose float parameters count, and whose HF tensor names the wrappers' trees keep."""
    while hasattr(model, "inner"):
        model = model.inner
    return model


def hf_exportable(model: Any, params: Any) -> tuple[Any, Any]:
    """The plain model and float params behind quantisation wrappers, for an HF-format export: a
    quantised base (`jtrain.quant.QuantizedModel`) dequantised, a QAT model's float params as they are."""
    if hasattr(model, "dequantized_params"):
        return hf_exportable(model.inner, model.dequantized_params(params))
    if hasattr(model, "inner"):
        return hf_exportable(model.inner, params)
    return model, params


def has_hf_format(model: Any) -> bool:
    """Whether `model` (under any wrappers) is an architecture HF's format names, so that
    `Trainer.save_model` can write it; a user's own Model-shaped class may not be."""
    from jtrain.models.registry import ARCHITECTURES

    return getattr(getattr(innermost(model), "config", None), "model_type", None) in ARCHITECTURES
