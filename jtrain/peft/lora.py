"""LoRA as a params-tree transform plus a Linen method interceptor (no model rewrite).

`apply_lora(model, config)` returns a `LoraModel` with the `Model` interface whose params are
`{"base": <the base model's params>, "lora": {<module path>: {"lora_A", "lora_B"}}}`. In `apply`,
`flax.linen.intercept_methods` catches `__call__` of every targeted `nn.Dense`/`nn.DenseGeneral`
and adds `scale * dropout(x) A B` to its output, so any Model-like object whose forward uses those
layers (a plain `Model`, a `QuantizedModel`) can be adapted without knowing its code.

Layout: factors are stored like Flax kernels so they shard like their base weight.
`lora_A` is `[*in_dims, r]` with the base kernel's input logical axes, `lora_B` is
`[r, *out_dims]` with its output axes (the rank axis is replicated). PEFT's 2-D
`lora_A.weight [r, in]` and `lora_B.weight [out, r]` are these flattened and transposed, exactly as
`jtrain.models.convert` maps kernels to `nn.Linear.weight` (see `jtrain.peft.peft_io`).
Shape letters: R = LoRA rank.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from dataclasses import dataclass
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from jtrain.errors import ConfigError
from jtrain.models.convert import layer_paths
from jtrain.models.wrapper import WrappedModel
from jtrain.peft.adapted_dense import MAGNITUDE, dora_output, lora_delta, weight_norm
from jtrain.peft.config import LoraConfig, matches_target
from jtrain.peft.sites import (dense_sites, dummy_batch, float_kernel_shapes, input_axes, kernel_axes, kernel_specs,
                               module_name)

RANK_AXIS = "lora_rank"  # logical name of the rank axis; no sharding rule names it, so it is replicated
# Heads PEFT adds to modules_to_save for sequence classification (PeftModelForSequenceClassification).
_CLASSIFIER_HEADS = ("classifier", "score")


@dataclass(frozen=True)
class LoraTarget:
    """One adapted Dense/DenseGeneral: where it is and the shapes/axes of its factors."""

    path: tuple[str, ...]  # Flax module path inside the base params
    name: str  # HF dotted module name (what target_modules and PEFT keys use)
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    in_axes: tuple[Any, ...]  # logical names of the base kernel's input dims (None if unknown)
    out_axes: tuple[Any, ...]
    layers: int = 0  # > 0: a module of a scanned layer stack; its factors carry a leading [layers] axis
    r: int = 0  # this module's rank (`rank_pattern`, else the config's r)
    scaling: float = 0.0  # this module's update scale (alpha / r, per `alpha_pattern` and `rank_pattern`)

    @property
    def layer_names(self) -> tuple[str, ...]:
        """The HF module name of every layer this target adapts (PEFT keys; one when unscanned)."""
        if not self.layers:
            return (self.name,)
        return tuple(module_name(p[:-1]) for p in layer_paths(self.path + ("kernel",), self.layers))

    @property
    def fan_in(self) -> int:
        return math.prod(self.in_shape)

    @property
    def fan_out(self) -> int:
        return math.prod(self.out_shape)


def _kaiming_uniform(rng: jax.Array, shape: tuple[int, ...], fan_in: int) -> jax.Array:
    """torch's `kaiming_uniform_(a=sqrt(5))` (nn.Linear's and PEFT's lora_A init): U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(rng, shape, jnp.float32, -bound, bound)


def _product(t: LoraTarget, a: jax.Array, b: jax.Array) -> jax.Array:
    """A B in the base kernel's layout [*in, *out], per layer for a stacked target ([layers, *in, *out])."""
    if not t.layers:
        return jnp.tensordot(a, b, axes=1)
    n = t.layers
    ab = jnp.matmul(a.reshape(n, t.fan_in, -1), b.reshape(n, -1, t.fan_out))
    return ab.reshape(n, *t.in_shape, *t.out_shape)


@dataclass(frozen=True)
class LoraModel(WrappedModel):
    """A base Model with LoRA adapters; same interface as `jtrain.models.Model`.

    Example::

        lora = apply_lora(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
        params = lora.init_from_base(base_params, jax.random.key(0))
        logits = lora.apply(params, {"input_ids": ids})["logits"]
    """

    base: Any
    lora_config: LoraConfig
    targets: tuple[LoraTarget, ...]
    modules_to_save: tuple[str, ...] = ()
    base_model_name_or_path: str | None = None  # written to adapter_config.json (PEFT loads the base from it)

    # ---- the Model interface (config, task, inputs: WrappedModel) ------------------------
    @property
    def inner(self) -> Any:
        return self.base

    @property
    def module(self) -> Any:
        return self.base.module

    def _dummy_inputs(self, *args: Any, **kwargs: Any) -> dict[str, jax.Array]:
        return dummy_batch(self.base)

    def init(self, rng: jax.Array) -> Any:
        """Fresh base params and fresh adapters (fine-tuning usually wants `init_from_base`)."""
        base_rng, lora_rng = jax.random.split(rng)

        def both(r1: jax.Array, r2: jax.Array) -> dict:
            base = self.base.init(r1)
            return {"base": base, "lora": self.init_adapters(r2, base)}

        return jax.jit(both)(base_rng, lora_rng)

    def init_from_base(self, base_params: Any, rng: jax.Array) -> dict:
        """The full tree for a pretrained base: its params (not copied) and freshly initialised adapters."""
        return {"base": base_params, "lora": jax.jit(self.init_adapters)(rng, base_params)}

    @property
    def module_count(self) -> int:
        """Adapted modules counted per layer (a scanned target adapts one module in every layer)."""
        return sum(len(t.layer_names) for t in self.targets)

    def init_adapters(self, rng: jax.Array, base_params: Any = None) -> dict:
        """PEFT's init: A kaiming-uniform(a=sqrt 5) on [r, in], B zero (random too if init_lora_weights=False);
        with DoRA, each magnitude starts at its feature's norm ||W + s A B|| (so the output starts at
        the base's), which is why the base params are needed then.

        Each module's key comes from its HF name's rank among all adapted modules, so a scanned
        model draws the same adapters as the unscanned one, stacked."""
        flat = {}
        order = sorted(((name, t, i) for t in self.targets for i, name in enumerate(t.layer_names)),
                       key=lambda item: _natural_key(item[0]))
        factors: dict[tuple[str, ...], list] = {t.path: [None] * len(t.layer_names) for t in self.targets}
        for k, (_, t, layer) in enumerate(order):
            ka, kb = jax.random.split(jax.random.fold_in(rng, k))
            r = t.r
            a = _kaiming_uniform(ka, (r, t.fan_in), t.fan_in).T.reshape(*t.in_shape, r)
            if self.lora_config.init_lora_weights:
                b = jnp.zeros((r, *t.out_shape), jnp.float32)
            else:
                b = _kaiming_uniform(kb, (t.fan_out, r), r).T.reshape(r, *t.out_shape)
            factors[t.path][layer] = (a, b)
        for t in self.targets:
            a, b = zip(*factors[t.path])
            flat[t.path + ("lora_A",)] = jnp.stack(a) if t.layers else a[0]
            flat[t.path + ("lora_B",)] = jnp.stack(b) if t.layers else b[0]
        if self.lora_config.use_dora:
            if base_params is None:
                raise ConfigError("DoRA adapters start from the base weights: call init_from_base(base_params, rng)")
            # A quantised base (QLoRA) starts its magnitudes from the dequantised weights, as PEFT does with
            # bitsandbytes; its forward dequantises before the layers run, so the interceptor sees floats too.
            dequantize = getattr(self.base, "dequantized_params", None)
            kernels = traverse_util.flatten_dict(base_params if dequantize is None else dequantize(base_params))
            for t in self.targets:
                norm = functools.partial(weight_norm, scale=t.scaling)
                kernel, a, b = kernels[t.path + ("kernel",)], flat[t.path + ("lora_A",)], flat[t.path + ("lora_B",)]
                flat[t.path + (MAGNITUDE,)] = jax.vmap(norm)(kernel, a, b) if t.layers else norm(kernel, a, b)
        return traverse_util.unflatten_dict(flat)

    def abstract_params(self) -> Any:
        base = self.base.abstract_params()
        return {"base": base, "lora": jax.eval_shape(self.init_adapters, jax.random.key(0), base)}

    def logical_axes(self) -> Any:
        """Base specs unchanged; A gets the base kernel's input axes + rank, B rank + output axes."""
        flat = {}
        for t in self.targets:
            stack = ("layers",) if t.layers else ()
            flat[t.path + ("lora_A",)] = P(*stack, *t.in_axes, RANK_AXIS)
            flat[t.path + ("lora_B",)] = P(*stack, RANK_AXIS, *t.out_axes)
            if self.lora_config.use_dora:
                flat[t.path + (MAGNITUDE,)] = P(*stack, *t.out_axes)
        return {"base": self.base.logical_axes(), "lora": traverse_util.unflatten_dict(flat)}

    def apply(self, params: Any, batch: Mapping[str, jax.Array], *, rng: jax.Array | None = None,
              train: bool = False) -> dict[str, jax.Array]:
        """The base forward with every targeted layer's output plus scale * dropout(x) A B.

        A scanned target's stacked factors are put beside its stacked kernel in the base tree, so
        the layer scan (or the pipeline's per-stage scan) hands each layer its own slice, which the
        interceptor reads from the Dense module's variables."""
        by_path = {t.path: t for t in self.targets if not t.layers}
        lora = traverse_util.flatten_dict(params["lora"])
        rate = float(self.lora_config.lora_dropout)
        stacked = [t for t in self.targets if t.layers]
        base_rng = lora_rng = None
        if rng is not None:
            base_rng, lora_rng = jax.random.split(rng)
        drop = train and rate > 0.0 and lora_rng is not None
        base = params["base"]
        if len(by_path) < len(self.targets):
            flat = dict(traverse_util.flatten_dict(base))
            flat.update({k: v for k, v in lora.items() if k[:-1] not in by_path})
            base = traverse_util.unflatten_dict(flat)

        def dropped(x: jax.Array, key: jax.Array) -> jax.Array:
            keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
            return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)

        dora = self.lora_config.use_dora

        def intercept(next_fun, args, kwargs, context):
            y = next_fun(*args, **kwargs)
            mod = context.module
            if context.method_name != "__call__" or not isinstance(mod, (nn.Dense, nn.DenseGeneral)):
                return y
            x = args[0].astype(y.dtype)
            target, was_dropped = by_path.get(tuple(mod.path)), False
            if target is not None:
                a, b = lora[target.path + ("lora_A",)], lora[target.path + ("lora_B",)]
                magnitude = lora.get(target.path + (MAGNITUDE,))
                if drop:
                    x = dropped(x, jax.random.fold_in(lora_rng, zlib.crc32(target.name.encode())))
                    was_dropped = True
            elif mod.has_variable("params", "lora_A"):  # this layer's slice of a scanned target
                a, b = mod.get_variable("params", "lora_A"), mod.get_variable("params", "lora_B")
                magnitude = mod.get_variable("params", MAGNITUDE) if dora else None
                if drop and mod.has_rng("dropout"):
                    x = dropped(x, mod.make_rng("dropout"))
                    was_dropped = True
            else:
                return y
            scale = target.scaling if target is not None else _stacked_scaling(stacked, tuple(mod.path))
            axes = input_axes(mod, x.ndim)
            if dora:
                return dora_output(y, x, mod, axes, a, b, magnitude, scale, was_dropped)
            return y + (scale * lora_delta(x, a, b, axes)).astype(y.dtype)

        with nn.intercept_methods(intercept):
            return self.base.apply(base, batch, rng=base_rng, train=train)

    def with_options(self, **changes: Any) -> LoraModel:
        """Same adapters around `base.with_options(**changes)`; the adapters' layout follows the base's
        `scan_layers`, so changing that needs `apply_lora` on the re-laid-out base instead."""
        scanned = bool(getattr(self.config, "scan_layers", False))
        if "scan_layers" in changes and bool(changes["scan_layers"]) != scanned:
            raise ConfigError("cannot switch scan_layers on a LoRA model (the adapters are laid out for the "
                              "base's layers): set scan_layers on the base model, then apply LoRA")
        return dataclasses.replace(self, base=self.base.with_options(**changes))

    # ---- what trains ----------------------------------------------------------------------
    def is_trainable(self, path: tuple[str, ...]) -> bool:
        """Adapters, `modules_to_save` and the biases `bias` selects; the rest of the base is frozen."""
        if not path:
            return False
        if path[0] == "lora":
            return True
        inner = path[1:]
        if self.modules_to_save and _within(inner[:-1], self.modules_to_save):
            return True
        if inner[-1] == "bias":
            if self.lora_config.bias == "all":
                return True
            if self.lora_config.bias == "lora_only":
                return tuple(inner[:-1]) in {t.path for t in self.targets}
        return False

    # ---- merge / unmerge ------------------------------------------------------------------
    def delta(self, params: Any, target: LoraTarget) -> jax.Array:
        """scale * A B in the base kernel's layout [*in, *out] (PEFT's scale * B @ A, transposed)."""
        lora = params["lora"]
        node = lora
        for p in target.path:
            node = node[p]
        return target.scaling * _product(target, node["lora_A"], node["lora_B"])

    def _fold(self, params: Any, base: Any, sign: float) -> Any:
        flat = dict(traverse_util.flatten_dict(base))
        for t in self.targets:
            key = t.path + ("kernel",)
            kernel = flat.get(key)
            if kernel is None or not hasattr(kernel, "dtype") or not jnp.issubdtype(kernel.dtype, jnp.floating):
                raise ConfigError(f"cannot merge LoRA into `{t.name}`: its base kernel is not a float array "
                                  "(a quantised base cannot be merged into its codes; `merged_export` dequantises "
                                  "it first)")
            merged = kernel.astype(jnp.float32) + sign * self.delta(params, t)
            if self.lora_config.use_dora:  # PEFT's DoRA merge: each output feature rescaled to its magnitude
                node = params["lora"]
                for p in t.path:
                    node = node[p]
                norm = jnp.sqrt(jnp.sum(merged * merged, axis=tuple(range(bool(t.layers),
                                                                          bool(t.layers) + len(t.in_shape)))))
                factor = node[MAGNITUDE] / norm
                merged = merged * factor.reshape(*factor.shape[:bool(t.layers)], *(1,) * len(t.in_shape),
                                                 *t.out_shape)
            flat[key] = merged.astype(kernel.dtype)
        return traverse_util.unflatten_dict(flat)

    def merge(self, params: Any) -> Any:
        """Base params with W + scale * B A folded into every adapted kernel (PEFT's merge_and_unload).

        The result is a plain params tree of the base model: apply it with `lora_model.base`."""
        return self._fold(params, params["base"], 1.0)

    def merged_export(self, params: Any) -> tuple[Any, Any]:
        """(plain model, float params) with the adapters folded in: what an HF export of the merged
        model holds. A quantised base (QLoRA) is dequantised first, as one merges QLoRA adapters into
        the dequantised weights with PEFT; the codes themselves never change."""
        from jtrain.models.wrapper import hf_exportable

        model, base = hf_exportable(self.base, params["base"])
        return model, self._fold(params, base, 1.0)

    def unmerge(self, merged_base: Any, params: Any) -> Any:
        """The base params back from merged ones (W - scale * B A), given the adapters in `params`.

        Not for DoRA: its merge rescales by the norm of the unmerged weight, which the merged
        weight does not determine (PEFT caches it at merge time); keep the base params instead."""
        if self.lora_config.use_dora:
            raise ConfigError("unmerge cannot undo a DoRA merge (the scale depends on the unmerged weight's norm); "
                              "keep the base params and merge again instead")
        return self._fold(params, merged_base, -1.0)


def apply_lora(model: Any, config: LoraConfig | Mapping[str, Any], *, strict: bool = True) -> LoraModel:
    """Adapt `model` (a `jtrain.models.Model` or any Model-like wrapper) with LoRA.

    Refuses, naming the module: targets that match no Dense layer, and a rank larger than a
    target's input or output size. `strict=False` (reading a PEFT file) ignores
    `modules_to_save` names the model lacks, as PEFT does (its SEQ_CLS configs list both
    `classifier` and `score`). Example::

        lora = apply_lora(model, LoraConfig(r=8, lora_alpha=16))   # PEFT's default targets
    """
    if isinstance(model, LoraModel):
        raise ConfigError("the model already has LoRA adapters: merge them first or adapt the base model")
    cfg = config if isinstance(config, LoraConfig) else LoraConfig.from_dict(config)
    model_type = getattr(model.config, "model_type", "")
    wanted = cfg.targets_for(model_type)
    sites = dense_sites(model)
    specs = kernel_specs(model)
    kernel_shapes = float_kernel_shapes(model)
    targets = []
    for path, (in_shape, out_shape) in sites.items():
        in_axes, out_axes, stacked = kernel_axes(specs, path, len(in_shape), len(in_shape) + len(out_shape))
        target = LoraTarget(path, module_name(path), in_shape, out_shape, in_axes, out_axes,
                            kernel_shapes[path][0] if stacked else 0)
        matched = [cfg.selects(name, wanted) for name in target.layer_names]
        if not any(matched):
            continue
        if not all(matched):  # one stacked kernel serves every layer: adapt all of them or none
            raise ConfigError(f"peft.target_modules {wanted!r} selects `{target.layer_names[matched.index(True)]}` "
                              f"but not `{target.layer_names[matched.index(False)]}`; with scan_layers the layers "
                              "share one stacked kernel, so a target must select a module in every layer (or set "
                              "model.scan_layers false)")
        name = target.layer_names[0] if target.layers else target.name
        ranks = {(cfg.rank_for(n), cfg.scaling_for(n)) for n in target.layer_names}
        if len(ranks) > 1:  # one stacked factor array serves every layer: one rank and scale for all
            raise ConfigError(f"peft.rank_pattern / alpha_pattern give the layers of `{name}` different ranks or "
                              "scales; with scan_layers the layers share one stacked adapter, so a pattern must treat "
                              "every layer alike (or set model.scan_layers false)")
        (r, scaling), = ranks
        if r > min(math.prod(in_shape), math.prod(out_shape)):
            raise ConfigError(f"peft.r={r} is larger than module `{name}` allows "
                              f"(in {math.prod(in_shape)}, out {math.prod(out_shape)} features): lower r")
        targets.append(dataclasses.replace(target, r=r, scaling=scaling))
    if cfg.use_dora:  # the norm is taken over the float kernel (a quantised base's, dequantised)
        quantised = hasattr(model, "dequantized_params")
        own = traverse_util.flatten_dict(model.abstract_params())
        for t in targets:
            leaf = own.get(t.path + ("kernel",))
            if not quantised and not (hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)):
                raise ConfigError(f"DoRA (use_dora) needs the float kernel of `{t.name}`, which this base does "
                                  "not hold: use plain LoRA here")
    if not targets:
        leaves = sorted({module_name(p).rsplit(".", 1)[-1] for p in sites})
        raise ConfigError(f"peft.target_modules {wanted!r} matches no Dense layer of this {model_type or 'model'}; "
                          f"layer names it has: {', '.join(leaves)}")
    save = tuple(cfg.modules_to_save or ())
    paths = [p[:-1] for p in traverse_util.flatten_dict(model.abstract_params())]
    if getattr(model, "task", None) == "sequence_classification":
        save += tuple(h for h in _CLASSIFIER_HEADS if h not in save and any(p[:1] == (h,) for p in paths))
    if save:
        missing = [m for m in save if not any(_within(p, (m,)) for p in paths)]
        if missing and strict:
            raise ConfigError(f"peft.modules_to_save {missing} names no module of this model")
        save = tuple(m for m in save if m not in missing)
    targets.sort(key=lambda t: _natural_key(t.name))
    return LoraModel(model, cfg, tuple(targets), save)


def _stacked_scaling(stacked: list[LoraTarget], path: tuple[str, ...]) -> float:
    """The scale of the scanned target whose layer is running at module `path`. Inside the layer scan
    the path is the target's own; a pipeline stage applies the layer on its own, so its path is a
    suffix of the target's (the part inside the layer)."""
    scales = {t.scaling for t in stacked}
    if len(scales) == 1:
        return scales.pop()
    found = {t.scaling for t in stacked if t.path[-len(path):] == path or path[-len(t.path):] == t.path}
    if len(found) != 1:
        raise ConfigError(f"cannot tell which LoRA target module `{'/'.join(path)}` is, to pick its scale "
                          "(rank_pattern / alpha_pattern): give the adapted modules one rank and alpha")
    return found.pop()


def _within(module_path: tuple[str, ...], names: tuple[str, ...]) -> bool:
    """Whether a module or one of its parents matches `names` (PEFT wraps a whole module to save)."""
    return any(matches_target(module_name(module_path[:k]), names) for k in range(1, len(module_path) + 1))


def _natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def adapter_param_count(params: Any) -> int:
    """Number of adapter parameters (the `lora` subtree)."""
    return int(sum(np.size(x) for x in jax.tree.leaves(params["lora"])))
