"""Quantisation-aware training: fake-quantised kernels with a straight-through gradient.

`QATModel` wraps a Model; in `apply` each selected kernel W is replaced by
dequantize(quantize(W)) (int8 or int4, per-output-channel scales by default) so the loss sees
the rounding the deployed weights will have. Rounding has a zero gradient almost everywhere,
so the backward pass uses the straight-through estimator: d(fake_quant(W))/dW = identity, and
the optimizer keeps updating the float weights. Every param stays trainable (float master
weights); `export_quantized` writes the real quantised weights afterwards.

Example::

    qat = QATModel(model, "int4", targets=["q_proj", "v_proj"])
    ... train qat like any model ...
    export_quantized(qat, state.full_params(), "out/quantized")
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jax
from flax import traverse_util

from jtrain.errors import ConfigError
from jtrain.models.wrapper import WrappedModel
from jtrain.quant.formats import QuantFormat, as_format, dequantize, quantize
from jtrain.quant.model import KernelPlan, QuantizedModel, plan_kernels
from jtrain.quant.targets import Path, Targets


def fake_quantize(w: jax.Array, fmt: QuantFormat | str = "int8", reduce_axes: tuple[int, ...] | None = None
                  ) -> jax.Array:
    """dequantize(quantize(w)) in the forward pass, identity in the backward pass (STE)."""
    fmt = as_format(fmt)

    def rounded(x: jax.Array) -> jax.Array:
        return dequantize(quantize(x, fmt, reduce_axes=reduce_axes), x.dtype)

    ste = jax.custom_vjp(rounded)
    ste.defvjp(lambda x: (rounded(x), None), lambda _, g: (g,))
    return ste(w)


@dataclass(frozen=True)
class QATModel(WrappedModel):
    """A Model-like wrapper that fake-quantises the `targets` kernels of `inner` in `apply`.

    `fmt`: 'int8' or 'int4' (per-channel scales) or a QuantFormat of those with a block size.
    """

    inner: Any
    fmt: QuantFormat | str = "int8"
    targets: Targets = None
    plans: Mapping[Path, KernelPlan] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        fmt = as_format(self.fmt)
        if fmt.name not in ("int8", "int4"):
            raise ConfigError(f"quantisation-aware training supports formats 'int8' and 'int4', got {fmt.name!r}")
        object.__setattr__(self, "fmt", fmt)
        if self.targets is not None and not isinstance(self.targets, str):
            object.__setattr__(self, "targets", tuple(self.targets))  # immutable, like the rest of the wrapper
        object.__setattr__(self, "plans", plan_kernels(self.inner, self.targets, fmt, what="QAT"))


    def init(self, rng: jax.Array) -> Any:
        return self.inner.init(rng)

    def abstract_params(self) -> Any:
        return self.inner.abstract_params()

    def logical_axes(self) -> Any:
        return self.inner.logical_axes()

    def fake_quantized_params(self, params: Any) -> Any:
        flat = traverse_util.flatten_dict(params)
        for path, plan in self.plans.items():
            flat[path] = fake_quantize(flat[path], self.fmt, plan.reduce_axes)
        return traverse_util.unflatten_dict(flat)

    def apply(self, params: Any, batch: Mapping[str, jax.Array], *, rng: jax.Array | None = None,
              train: bool = False) -> dict[str, jax.Array]:
        return self.inner.apply(self.fake_quantized_params(params), batch, rng=rng, train=train)

    def with_options(self, **changes: Any) -> QATModel:
        return dataclasses.replace(self, inner=self.inner.with_options(**changes))

    def quantized_model(self) -> QuantizedModel:
        """The deployed form: the same kernels stored in the same format (what the loss saw)."""
        return QuantizedModel(self.inner, self.fmt, self.targets)


def export_quantized(model: QATModel, params: Any, directory: str) -> tuple[QuantizedModel, Any]:
    """Quantise the trained float weights and write them (see `jtrain.quant.io.save_quantized`)."""
    from jtrain.quant.io import save_quantized

    qmodel = model.quantized_model()
    qparams = jax.jit(qmodel.quantize_params)(params)
    save_quantized(directory, qmodel, qparams)
    return qmodel, qparams
