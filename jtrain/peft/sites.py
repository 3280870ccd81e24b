"""Where a model's dense layers are, for LoRA to adapt: their HF module names, the input and output
dims each Dense/DenseGeneral contracts and produces (found by tracing one abstract forward, so any
Model-like wrapper works), and the shapes and logical axes of their float kernels.
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from jtrain.errors import ConfigError

_NUMBERED = re.compile(r"^(layers|layer|h)_(\d+)$")


def module_name(path: tuple[str, ...]) -> str:
    """Flax module path -> HF dotted module name (`model/layers_0/mlp` -> `model.layers.0.mlp`)."""
    return ".".join(_NUMBERED.sub(r"\1.\2", p) for p in path)


def dummy_batch(model: Any) -> dict[str, jax.Array]:
    make = getattr(model, "_dummy_inputs", None)
    return make() if make is not None else {"input_ids": jnp.zeros((1, 8), jnp.int32)}


def input_axes(module: nn.Module, ndim: int) -> tuple[int, ...]:
    """Positive indices of the input dims a Dense/DenseGeneral contracts."""
    if isinstance(module, nn.DenseGeneral):
        axis = module.axis if isinstance(module.axis, tuple) else (module.axis,)
        if module.batch_dims:
            raise ConfigError(f"LoRA on `{module_name(module.path)}`: DenseGeneral with batch_dims is not supported")
        return tuple(a % ndim for a in axis)
    return (ndim - 1,)


def _out_shape(module: nn.Module) -> tuple[int, ...]:
    f = module.features
    return tuple(f) if isinstance(f, (tuple, list)) else (int(f),)


def dense_sites(model: Any) -> dict[tuple[str, ...], tuple[tuple[int, ...], tuple[int, ...]]]:
    """Every Dense/DenseGeneral the model's forward calls: path -> (input dims, output dims).

    Found by tracing one abstract forward with a recording interceptor, so it works on any
    Model-like object without knowing its modules."""
    found: dict[tuple[str, ...], tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def record(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name == "__call__" and isinstance(mod, (nn.Dense, nn.DenseGeneral)) and args:
            x = args[0]
            axes = input_axes(mod, x.ndim)
            found[tuple(mod.path)] = (tuple(x.shape[a] for a in axes), _out_shape(mod))
        return next_fun(*args, **kwargs)

    def forward(params: Any) -> Any:
        with nn.intercept_methods(record):
            return model.apply(params, dummy_batch(model), rng=None, train=False)

    jax.eval_shape(forward, model.abstract_params())
    return found


def kernel_specs(model: Any) -> list[dict]:
    """Flat logical specs of `model` and of the models it wraps (`inner`/`base`), outermost first.

    A wrapper may store a kernel in another form (a quantised tensor with its own spec node); the
    wrapped model still has the plain kernel's PartitionSpec, which the adapters follow."""
    out, seen = [], 0
    while model is not None and seen < 4:
        out.append(traverse_util.flatten_dict(model.logical_axes()))
        model = getattr(model, "inner", None) or getattr(model, "base", None)
        seen += 1
    return out


def kernel_axes(specs: list[dict], path: tuple[str, ...], n_in: int, ndim: int):
    """(input axes, output axes, stacked) of the base kernel at `path`, whose per-layer rank is `ndim`;
    stacked when the spec has one more, leading `layers` axis (a scanned layer stack)."""
    found = (s.get(path + ("kernel",)) for s in specs)
    spec = next((s for s in found if isinstance(s, P)), None)
    spec = None if spec is None else tuple(spec)
    stacked = spec is not None and len(spec) == ndim + 1 and spec[0] == "layers"
    if stacked:
        spec = spec[1:]
    if spec is None or len(spec) != ndim:
        return (None,) * n_in, (None,) * (ndim - n_in), stacked
    return spec[:n_in], spec[n_in:], stacked


def float_kernel_shapes(model: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Module path -> shape of its float kernel, from the model inside any wrappers (a quantised
    base stores its kernels in another form; the shapes that matter are the float ones)."""
    from jtrain.models.wrapper import innermost

    flat = traverse_util.flatten_dict(innermost(model).abstract_params())
    return {path[:-1]: tuple(leaf.shape) for path, leaf in flat.items() if path[-1] == "kernel"}
