"""`make_optimizer`: HF `TrainingArguments.optim` names -> one optax chain.

Every chain is `clip (torch semantics) -> optimizer`, with weight decay masked by
`decay_mask` (no decay on biases and norm weights, as HF's Trainer). Decay follows the
torch optimizer HF would build for that name: decoupled `p -= lr(t) * wd * p` for the
Adam/Lion/Muon/low-rank family and Adafactor; L2 added to the gradient (coupled) for SGD and
RMSprop, because that is what `torch.optim.SGD/RMSprop(weight_decay=...)` do.
"""
from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import optax

from jtrain.optim import builders, fused_adamw, low_rank_builders
from jtrain.optim.args import resolve_optim_args
from jtrain.optim.decay_mask import decay_mask
from jtrain.optim.targets import Layout
from jtrain.optim.transforms import clip_by_global_norm_torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptimizerConfig:
    """Everything a builder may read; `extra` holds the resolved optim_args."""

    name: str
    learning_rate: float | optax.Schedule
    weight_decay: float
    b1: float
    b2: float
    eps: float
    target_modules: list[str] | str | None
    extra: Mapping[str, Any]
    warmup_steps: int = 0  # TrainingArguments' warmup, which HF hands to the schedule-free optimizers
    peak_learning_rate: float | None = None  # TrainingArguments' learning_rate, the rate HF builds them with
    param_layout: Layout | None = None  # the model's kernels as HF's weights (targets.kernel_layout)


_REGISTRY: dict[str, tuple[Callable[[OptimizerConfig], optax.GradientTransformation], dict]] = {
    "adamw_torch": (builders.adamw, {}),
    "adamw_torch_fused": (builders.adamw, {}),
    "adamw": (builders.adamw, {}),
    "adamw_bf16": (builders.adamw_low_precision, builders.LOW_PRECISION_BF16_ARGS),
    "adamw_anyprecision": (builders.adamw_low_precision, builders.ANYPRECISION_ARGS),
    "adamw_8bit": (builders.adamw_8bit, builders.EIGHT_BIT_ARGS),
    "adamw_bnb_8bit": (builders.adamw_8bit, builders.EIGHT_BIT_ARGS),
    "adamw_torch_8bit": (builders.adamw_8bit, builders.EIGHT_BIT_ARGS),
    "adafactor": (builders.adafactor, builders.ADAFACTOR_ARGS),
    "lion": (builders.lion, {}),
    "lion_32bit": (builders.lion, {}),
    "lion_8bit": (builders.lion_8bit, builders.EIGHT_BIT_ARGS),
    "sgd": (builders.sgd, builders.SGD_ARGS),
    "rmsprop": (builders.rmsprop, builders.RMSPROP_ARGS),
    "schedule_free_adamw": (builders.schedule_free, builders.SCHEDULE_FREE_ARGS),
    "schedule_free_sgd": (builders.schedule_free_sgd, builders.SCHEDULE_FREE_SGD_ARGS),
    "schedule_free_radam": (builders.schedule_free_radam, builders.SCHEDULE_FREE_RADAM_ARGS),
    "muon": (builders.muon, builders.MUON_ARGS),
    "galore_adamw": (low_rank_builders.galore, low_rank_builders.GALORE_ARGS),
    "galore_adamw_8bit": (low_rank_builders.galore_8bit, low_rank_builders.GALORE_ARGS),
    "galore_adafactor": (low_rank_builders.galore_adafactor, low_rank_builders.GALORE_ARGS),
    "apollo_adamw": (low_rank_builders.apollo, low_rank_builders.APOLLO_ARGS),
    "adagrad": (builders.adagrad, builders.ADAGRAD_ARGS),
    "rmsprop_bnb": (builders.rmsprop_bnb, builders.RMSPROP_BNB_ARGS),
    "rmsprop_bnb_32bit": (builders.rmsprop_bnb, builders.RMSPROP_BNB_ARGS),
    "rmsprop_bnb_8bit": (builders.rmsprop_bnb, builders.RMSPROP_BNB_ARGS),
    "ademamix": (builders.ademamix, builders.ADEMAMIX_ARGS),
    "stable_adamw": (builders.stable_adamw, builders.STABLE_ADAMW_ARGS),
    # The same update as the name without the prefix or suffix: a paged (bitsandbytes) state only moves
    # between GPU and host memory under pressure, and XLA's / NPU's AdamW are torch's AdamW on a device.
    "paged_adamw_32bit": (builders.adamw, {}),
    "paged_adamw_8bit": (builders.adamw_8bit, builders.EIGHT_BIT_ARGS),
    "paged_lion_32bit": (builders.lion, {}),
    "paged_lion_8bit": (builders.lion_8bit, builders.EIGHT_BIT_ARGS),
    "paged_ademamix_32bit": (builders.ademamix, builders.ADEMAMIX_ARGS),
    "ademamix_8bit": (builders.ademamix_8bit, builders.ADEMAMIX_8BIT_ARGS),
    "paged_ademamix_8bit": (builders.ademamix_8bit, builders.ADEMAMIX_8BIT_ARGS),
    "adamw_torch_xla": (builders.adamw, {}),
    "adamw_torch_npu_fused": (builders.adamw, {}),
}
# HF's layer-wise GaLore/APOLLO step each parameter inside torch's backward hooks (to hold one gradient at a
# time); its clipping then sees no gradients and clips nothing. The update is the optimizer's own: jtrain
# builds it without clipping (`make_optimizer` says so when max_grad_norm is set), one step after the backward.
LAYERWISE = {f"{name}_layerwise": name for name in ("galore_adamw", "galore_adamw_8bit", "galore_adafactor",
                                                     "apollo_adamw")}
_REGISTRY.update({layerwise: _REGISTRY[name] for layerwise, name in LAYERWISE.items()})
# The names whose builders read OptimizerConfig.param_layout (a weight's shape as HF's tensors); the Trainer
# builds the layout (the model's conversion maps: 0.5-1.5 s for the 58M benchmark model) only for these.
LOW_RANK_OPTIMIZERS = frozenset(name for name, (build, _) in _REGISTRY.items() if build in (
    low_rank_builders.galore, low_rank_builders.galore_8bit, low_rank_builders.galore_adafactor,
    low_rank_builders.apollo))
"""The names that need `optim_target_modules` (HF's GaLore and APOLLO)."""
LAYOUT_OPTIMIZERS = LOW_RANK_OPTIMIZERS | frozenset(name for name, (build, _) in _REGISTRY.items() if build in (
    builders.adafactor, builders.muon, builders.stable_adamw))

OPTIMIZER_NAMES: tuple[str, ...] = tuple(_REGISTRY)

HF_ONLY_OPTIMIZERS: dict[str, str] = {
    "adamw_torch_4bit": "torchao's 4-bit AdamW states are not implemented (adamw_8bit is)",
    **dict.fromkeys(("lomo", "adalomo"), "LOMO fuses the update into torch's backward to save GPU memory; "
                                         "not implemented"),
    "grokadamw": "not implemented: GrokAdamW's momentum for a tensor depends on that tensor's position in "
                 "torch's parameter order, which jtrain's parameter tree does not have",
}
"""HF `optim` names jtrain does not build, and why (a test keeps the two tables covering HF's names)."""


def check_optimizer_name(name: str, gradient_accumulation_steps: int = 1) -> None:
    """Raise a ConfigError for an `optim` jtrain cannot build: HF's with the reason, others with the
    closest name, a layer-wise one with gradient accumulation (HF refuses it); called when TrainingArguments
    is built, as HF checks its names then."""
    from jtrain.coerce import closest_key_hint
    from jtrain.errors import ConfigError

    if name in LAYERWISE and gradient_accumulation_steps != 1:
        raise ConfigError(f"optim {name!r} does not support gradient accumulation (HF's layer-wise optimizers step "
                          f"inside the backward): set gradient_accumulation_steps=1, or use {LAYERWISE[name]!r}")
    if name in _REGISTRY:
        return
    if name in HF_ONLY_OPTIMIZERS:
        raise ConfigError(f"optim {name!r} is one of HF's optimizers that jtrain does not build "
                          f"({HF_ONLY_OPTIMIZERS[name]}); jtrain's: {', '.join(OPTIMIZER_NAMES)}")
    raise ConfigError(f"unknown optim {name!r}{closest_key_hint(name, OPTIMIZER_NAMES)}; jtrain's: "
                      f"{', '.join(OPTIMIZER_NAMES)}")


def make_optimizer(
    name: str,
    learning_rate: float | optax.Schedule,
    *,
    weight_decay: float = 0.0,
    adam_beta1: float = 0.9,
    adam_beta2: float = 0.999,
    adam_epsilon: float = 1e-8,
    max_grad_norm: float | None = 1.0,
    optim_args: Mapping[str, Any] | str | None = None,
    optim_target_modules: list[str] | str | None = None,
    warmup_steps: int = 0,
    peak_learning_rate: float | None = None,
    param_layout: Layout | None = None,
) -> optax.GradientTransformation:
    """One optax chain: global-norm clipping (HF clips before the optimizer step) -> optimizer
    with weight decay masked by `decay_mask`.

    `max_grad_norm` <= 0 or None disables clipping, as in HF. `optim_args` is HF's
    "k=v,k2=v2" string or a dict; unknown keys raise. Optimizers that need params in
    `update` (all with weight decay) must be called as `opt.update(grads, state, params)`.
    `warmup_steps` is what HF hands the schedule-free optimizers (TrainingArguments' warmup, a
    ramp inside the optimizer); `optim_args` `warmup_steps` overrides it, and others ignore it.
    `peak_learning_rate` is the rate HF builds the optimizer with, which stable_adamw's `decouple_lr`
    takes as its `max_lr` when `learning_rate` is a schedule. `param_layout` (`targets.kernel_layout` of the
    model's conversion maps; the Trainer passes it) lets GaLore/APOLLO select and project kernels as HF's
    nn.Linear weights, and Adafactor and Muon see head-shaped and stacked kernels as HF's matrices; without it
    GaLore/APOLLO/Muon take 2-D `kernel` leaves and Adafactor factors every leaf's last two axes.

    Example:
        >>> opt = make_optimizer("adamw_torch", 3e-4, weight_decay=0.01)
        >>> state = opt.init(params)
        >>> updates, state = opt.update(grads, state, params)
    """
    check_optimizer_name(name)
    build, spec = _REGISTRY[name]
    config = OptimizerConfig(
        name=name,
        learning_rate=learning_rate,
        weight_decay=float(weight_decay),
        b1=float(adam_beta1),
        b2=float(adam_beta2),
        eps=float(adam_epsilon),
        target_modules=optim_target_modules,
        extra=resolve_optim_args(name, optim_args, spec),
        warmup_steps=int(warmup_steps),
        peak_learning_rate=peak_learning_rate,
        param_layout=param_layout,
    )
    if name in LAYERWISE and max_grad_norm is not None and max_grad_norm > 0:
        logger.warning("%s: max_grad_norm=%s not applied: HF's layer-wise optimizers step each parameter inside "
                       "the backward, before the Trainer's clipping (which then finds no gradients), so their "
                       "updates are unclipped; jtrain follows it (set max_grad_norm=0 to silence this)",
                       name, max_grad_norm)
        max_grad_norm = None
    tx = _clipped(build(config), max_grad_norm)
    if build is builders.adamw:  # the train step may run this chain as one pass per parameter on the CPU
        clip = float(max_grad_norm) if max_grad_norm is not None and max_grad_norm > 0 else None
        fused_adamw.register(tx, fused_adamw.AdamWSpec(config.b1, config.b2, config.eps, config.weight_decay,
                                                       learning_rate, clip))
    return tx


def _clipped(tx: optax.GradientTransformation, max_grad_norm: float | None) -> optax.GradientTransformation:
    """`tx` behind HF's global-norm clipping (torch's formula); `max_grad_norm` <= 0 or None: no clipping."""
    if max_grad_norm is None or max_grad_norm <= 0:
        return optax.chain(tx)
    return optax.chain(clip_by_global_norm_torch(float(max_grad_norm), takes_grad_norm=True), tx)


def make_optimizer_from_factory(
    factory: Callable[..., optax.GradientTransformation],
    kwargs: Mapping[str, Any] | None,
    learning_rate: float | optax.Schedule,
    *,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
) -> optax.GradientTransformation:
    """HF's `optimizer_cls_and_kwargs` in optax terms: `factory(learning_rate=schedule, **kwargs)`
    behind the same clipping as `make_optimizer`.

    As in HF, the Trainer's schedule drives the factory's learning rate, and the Trainer's
    `weight_decay` (when the factory takes one and `kwargs` do not set it) applies to the
    parameters HF decays (`decay_mask`, passed as `mask` when the factory takes one). Example::

        Trainer(model, args, optimizer_cls_and_kwargs=(optax.lion, {"b1": 0.95}))
    """
    kwargs = dict(kwargs or {})
    name = getattr(factory, "__name__", repr(factory))
    if "learning_rate" in kwargs:
        raise ValueError(f"optimizer_cls_and_kwargs: drop 'learning_rate' from {name}'s kwargs; the Trainer passes "
                         "its schedule (TrainingArguments.learning_rate, lr_scheduler_type, warmup) as learning_rate")
    try:
        accepted = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        accepted = {}
    if "learning_rate" not in accepted and not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        raise ValueError(f"optimizer_cls_and_kwargs: {name} takes no `learning_rate` argument; give an optax "
                         "optimizer factory such as optax.adamw or optax.lion")
    if "weight_decay" in accepted and "weight_decay" not in kwargs:  # also 0.0: optax.adamw's default is 1e-4
        kwargs["weight_decay"] = float(weight_decay)
        if "mask" in accepted and "mask" not in kwargs:
            kwargs["mask"] = decay_mask
    try:
        tx = factory(learning_rate=learning_rate, **kwargs)
    except TypeError as err:
        raise ValueError(f"optimizer_cls_and_kwargs: {name}(learning_rate=..., **{sorted(kwargs)}) failed: {err}") \
            from err
    return _clipped(tx, max_grad_norm)
