"""`QuantizedModel`: a Model whose selected kernels are stored quantised and frozen (QLoRA's base).

Its params tree is the inner model's with each selected kernel replaced by a
`QuantizedTensor` node. `is_trainable` is False for those nodes, so `build_compiled_steps`
puts them in `TrainState.frozen`: no gradient, no optimizer state. `apply` dequantises them
inside the traced forward pass (so inside the compiled step; XLA keeps only the float
temporaries a layer needs) and calls the inner model. `logical_axes` gives the nodes' arrays
the specs of the kernel they replace, so they shard like it.

Example::

    qmodel = QuantizedModel(model, "nf4", targets=["q_proj", "v_proj", "up_proj"])
    qparams = qmodel.quantize_params(float_params)
    print(quantization_report(float_params, qparams).summary())
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jtrain.errors import ConfigError
from jtrain.memory import tree_nbytes
from jtrain.models.wrapper import WrappedModel
from jtrain.quant.formats import (
    QuantFormat,
    QuantizedTensor,
    as_format,
    check_quantizable,
    dequantize,
    input_axes,
    quantize,
    quantized_spec,
)
from jtrain.quant.targets import Path, Targets, select_kernels


def is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedTensor)


@dataclass(frozen=True)
class KernelPlan:
    """One selected kernel: its logical spec and the axes per-channel scales reduce over."""

    path: Path
    shape: tuple[int, ...]
    spec: tuple[Any, ...]
    reduce_axes: tuple[int, ...]


def plan_kernels(model: Any, targets: Targets, fmt: QuantFormat, *, what: str = "quantisation") -> dict:
    """path -> KernelPlan for the kernels `targets` selects, every one checked against `fmt`."""
    abstract = model.abstract_params()
    specs = traverse_util.flatten_dict(model.logical_axes())
    flat = traverse_util.flatten_dict(abstract)
    plans = {}
    for path in select_kernels(abstract, targets, what=what):
        if is_quantized(flat[path]):
            raise ConfigError(f"`{'/'.join(path)}` is already quantised: wrap the float model instead of a "
                              "QuantizedModel")
        shape, spec = tuple(flat[path].shape), tuple(specs[path])
        check_quantizable(shape, fmt, "/".join(path))
        stacked = bool(spec) and spec[0] == "layers"
        layer_spec = spec[1:] if stacked else spec
        n_in = 2 if layer_spec and layer_spec[0] == "heads" else 1
        plans[path] = KernelPlan(path, shape, spec, input_axes(len(shape), n_in, stacked))
    return plans


def _map_quantized(fn: Any, tree: Any) -> Any:
    return jax.tree.map(lambda x: fn(x) if is_quantized(x) else x, tree, is_leaf=is_quantized)


@dataclass(frozen=True)
class QuantizedModel(WrappedModel):
    """A Model-like wrapper storing the `targets` kernels of `inner` in format `fmt`, frozen.

    `targets`: PEFT-style names or a full-match regex over module names (`jtrain.quant.targets`);
    None quantises every kernel except the task head. Bad targets or a block size that does not
    divide a kernel's last dimension raise ConfigError when the wrapper is built.
    """

    inner: Any
    fmt: QuantFormat | str = "nf4"
    targets: Targets = None
    plans: Mapping[Path, KernelPlan] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fmt", as_format(self.fmt))
        if self.targets is not None and not isinstance(self.targets, str):
            object.__setattr__(self, "targets", tuple(self.targets))  # immutable, like the rest of the wrapper
        object.__setattr__(self, "plans", plan_kernels(self.inner, self.targets, self.fmt))

    # --- the Model interface (config, task, inputs: WrappedModel) ------------------------

    def quantize_params(self, params: Any) -> Any:
        """The quantised tree from the inner model's float params (traceable; jit it for speed)."""
        flat = traverse_util.flatten_dict(params)
        for path, plan in self.plans.items():
            flat[path] = quantize(flat[path], self.fmt, reduce_axes=plan.reduce_axes, name="/".join(path))
        return traverse_util.unflatten_dict(flat)

    def init(self, rng: jax.Array) -> Any:
        """Quantised fresh params (the float init exists only inside the compiled init)."""
        return jax.jit(lambda r: self.quantize_params(self.inner.init(r)))(rng)

    def abstract_params(self) -> Any:
        return jax.eval_shape(self.quantize_params, self.inner.abstract_params())

    def logical_axes(self) -> Any:
        """The inner specs, with each quantised node's arrays given specs from its kernel's."""
        flat_specs = traverse_util.flatten_dict(self.inner.logical_axes())
        flat_abstract = traverse_util.flatten_dict(self.abstract_params())
        for path in self.plans:
            flat_specs[path] = quantized_spec(flat_abstract[path], flat_specs[path])
        return traverse_util.unflatten_dict(flat_specs)

    def is_trainable(self, path: tuple[str, ...]) -> bool:
        """Quantised kernels are frozen; every other param (norms, embeddings, heads) trains."""
        return tuple(path) not in self.plans

    def compute_dtype(self) -> Any:
        dtype = getattr(self.inner.config, "dtype", None)
        return None if dtype is None else jnp.dtype(dtype)

    def dequantized_params(self, params: Any, dtype: Any = None) -> Any:
        """The float tree the inner model applies (each node dequantised to `dtype`, default: its own)."""
        return _map_quantized(lambda q: dequantize(q, dtype), params)

    def apply(self, params: Any, batch: Mapping[str, jax.Array], *, rng: jax.Array | None = None,
              train: bool = False) -> dict[str, jax.Array]:
        """Dequantise on the fly (in the compute dtype), then run the inner model."""
        return self.inner.apply(self.dequantized_params(params, self.compute_dtype()), batch, rng=rng, train=train)

    def with_options(self, **changes: Any) -> QuantizedModel:
        """Same quantisation around `inner.with_options(**changes)` (targets are re-resolved)."""
        return dataclasses.replace(self, inner=self.inner.with_options(**changes))


@dataclass(frozen=True)
class QuantReport:
    """Relative Frobenius error ||W - deq(q(W))|| / ||W|| per quantised tensor and overall."""

    per_tensor: dict[str, float]
    overall: float
    bits_per_param: float  # storage of the quantised tensors, scales included
    quantized_params: int

    def summary(self) -> str:
        worst = max(self.per_tensor, key=self.per_tensor.get) if self.per_tensor else "-"
        return (f"{len(self.per_tensor)} tensors ({self.quantized_params} params) at "
                f"{self.bits_per_param:.3f} bits/param; relative error overall {self.overall:.4f}, "
                f"worst {worst} {self.per_tensor.get(worst, 0.0):.4f}")


def quantization_report(float_params: Any, quantized_params: Any) -> QuantReport:
    """Compare float params with their quantised tree (computed in float64 on the host)."""
    flat_f = traverse_util.flatten_dict(float_params)
    flat_q = traverse_util.flatten_dict(quantized_params)
    per, err2, norm2, nbytes, count = {}, 0.0, 0.0, 0, 0
    for path, q in flat_q.items():
        if not is_quantized(q):
            continue
        w = np.asarray(flat_f[path], np.float64)
        d = np.asarray(dequantize(q, jnp.float32), np.float64)
        e2, n2 = float(np.sum((w - d) ** 2)), float(np.sum(w ** 2))
        per["/".join(path)] = math.sqrt(e2 / n2) if n2 > 0 else math.sqrt(e2)
        err2, norm2 = err2 + e2, norm2 + n2
        nbytes, count = nbytes + tree_nbytes(q), count + q.size
    overall = math.sqrt(err2 / norm2) if norm2 > 0 else 0.0
    return QuantReport(per, overall, 8.0 * nbytes / max(count, 1), count)
