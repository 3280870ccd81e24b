"""`make_optimizer`: HF `TrainingArguments.optim` names -> one optax chain.

Every chain is `clip (torch semantics) -> optimizer`, with weight decay masked by
`decay_mask` (no decay on biases and norm weights, as HF's Trainer). Decay follows the
torch optimizer HF would build for that name: decoupled `p -= lr(t) * wd * p` for the
Adam/Lion/Muon/low-rank family and Adafactor; L2 added to the gradient (coupled) for SGD and
RMSprop, because that is what `torch.optim.SGD/RMSprop(weight_decay=...)` do.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import optax

from jtrain.optim import builders
from jtrain.optim.args import resolve_optim_args
from jtrain.optim.transforms import clip_by_global_norm_torch


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
    "muon": (builders.muon, builders.MUON_ARGS),
    "galore_adamw": (builders.galore, builders.GALORE_ARGS),
    "apollo_adamw": (builders.apollo, builders.APOLLO_ARGS),
}

OPTIMIZER_NAMES: tuple[str, ...] = tuple(_REGISTRY)


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
) -> optax.GradientTransformation:
    """One optax chain: global-norm clipping (HF clips before the optimizer step) -> optimizer
    with weight decay masked by `decay_mask`.

    `max_grad_norm` <= 0 or None disables clipping, as in HF. `optim_args` is HF's
    "k=v,k2=v2" string or a dict; unknown keys raise. Optimizers that need params in
    `update` (all with weight decay) must be called as `opt.update(grads, state, params)`.

    Example:
        >>> opt = make_optimizer("adamw_torch", 3e-4, weight_decay=0.01)
        >>> state = opt.init(params)
        >>> updates, state = opt.update(grads, state, params)
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZER_NAMES)}")
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
    )
    parts = []
    if max_grad_norm is not None and max_grad_norm > 0:
        parts.append(clip_by_global_norm_torch(float(max_grad_norm)))
    parts.append(build(config))
    return optax.chain(*parts)
