"""One builder per optimizer family: OptimizerConfig -> optax transformation (no clipping).

Each `*_ARGS` dict is the optim_args spec of that family: key -> (default, converter).
Defaults follow what HF's Trainer passes for the same `optim` name.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import jax.numpy as jnp
import optax

from jtrain.optim.adafactor import hf_adafactor
from jtrain.optim.adamw_8bit import (scale_by_adam_8bit, scale_by_ademamix_8bit, scale_by_lion_8bit,
                                     scale_by_rmsprop_8bit)
from jtrain.optim.args import optional_float, optional_str, parse_bool
from jtrain.optim.decay_mask import decay_mask
from jtrain.optim.low_precision import scale_by_adam_low_precision
from jtrain.optim.muon import muon_adamw
from jtrain.optim.schedule_free import schedule_free_adamw
from jtrain.optim.schedule_free import schedule_free_radam as schedule_free_radam_tx
from jtrain.optim.schedule_free import schedule_free_sgd as schedule_free_sgd_tx
from jtrain.optim.stable_adamw import stable_adamw as stable_adamw_tx
from jtrain.optim.targets import hf_tensor_shape, stacked_axes
from jtrain.optim.transforms import scale_by_torch_adagrad, scale_by_torch_rmsprop, scale_by_torch_sgd

if TYPE_CHECKING:
    from jtrain.optim.factory import OptimizerConfig



def _dtype(name: str) -> jnp.dtype:
    return jnp.dtype(str(name).replace("torch.", ""))


def _decoupled_tail(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """Masked decoupled decay then -lr(t): update = -lr * (direction + wd * p)."""
    return optax.chain(
        optax.add_decayed_weights(cfg.weight_decay, decay_mask),
        optax.scale_by_learning_rate(cfg.learning_rate),
    )


def adamw(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """torch.optim.AdamW: bias-corrected, eps outside the sqrt, decoupled decay lr*wd*p."""
    return optax.chain(optax.scale_by_adam(cfg.b1, cfg.b2, cfg.eps), _decoupled_tail(cfg))


ADEMAMIX_ARGS = {
    "beta1": (None, optional_float), "beta2": (None, optional_float), "beta3": (0.9999, float),
    "alpha": (5.0, float), "eps": (None, optional_float),
    "t_alpha": (None, optional_float), "t_beta3": (None, optional_float),
}


def ademamix(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """bitsandbytes' AdEMAMix (32-bit), as HF builds it: a fast and a slow EMA of the gradient mixed by
    `alpha` over Adam's bias-corrected second moment, decoupled decay; beta1, beta2 and eps from optim_args
    or the adam arguments. bitsandbytes takes `t_alpha` / `t_beta3` (the paper's warm-ups) and does not
    use them, so a run that sets them would not get what it asks for: refused."""
    direction = optax.contrib.scale_by_ademamix(*_ademamix_hyperparameters(cfg))
    return optax.chain(direction, _decoupled_tail(cfg))


def ademamix_8bit(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """bitsandbytes' AdEMAMix8bit: `ademamix` with its three moments stored block-wise in 8 bits."""
    x = cfg.extra
    direction = scale_by_ademamix_8bit(*_ademamix_hyperparameters(cfg), x["block_size"], x["min_8bit_size"])
    return optax.chain(direction, _decoupled_tail(cfg))


def _ademamix_hyperparameters(cfg: OptimizerConfig) -> tuple[float, float, float, float, float]:
    """(beta1, beta2, beta3, alpha, eps) as HF hands them to bitsandbytes (optim_args, else the adam args)."""
    from jtrain.errors import ConfigError

    x = cfg.extra
    if x["t_alpha"] is not None or x["t_beta3"] is not None:
        raise ConfigError("optim_args t_alpha / t_beta3: bitsandbytes' AdEMAMix, which HF's `ademamix` builds, "
                          "accepts them and does not use them (no warm-up of alpha or beta3); jtrain refuses "
                          "them rather than train differently from HF: remove them")
    pick = lambda key, default: default if x[key] is None else x[key]  # noqa: E731
    return pick("beta1", cfg.b1), pick("beta2", cfg.b2), x["beta3"], x["alpha"], pick("eps", cfg.eps)


STABLE_ADAMW_ARGS = {"decouple_lr": (False, parse_bool), "max_lr": (None, optional_float),
                     "kahan_sum": (None, optional_str)}


def stable_adamw(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """torch-optimi's StableAdamW with HF's arguments (adam betas and eps, decay per param group);
    `kahan_sum` only acts on 16-bit params, and jtrain's are float32 masters, so it changes nothing."""
    from jtrain.errors import ConfigError

    x = cfg.extra
    max_lr = x["max_lr"]
    if x["decouple_lr"] and max_lr is None:  # optimi takes the rate it was built with: HF's learning_rate
        max_lr = cfg.peak_learning_rate if callable(cfg.learning_rate) else float(cfg.learning_rate)
        if max_lr is None:
            raise ConfigError("optim_args decouple_lr=True with a schedule needs max_lr (the schedule's peak)")
    return stable_adamw_tx(cfg.learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                           mask=decay_mask, decouple_lr=x["decouple_lr"], max_lr=max_lr,
                           lead_of=lambda name: stacked_axes(cfg.param_layout, name))


LOW_PRECISION_BF16_ARGS = {
    "momentum_dtype": ("bfloat16", _dtype),
    "variance_dtype": ("bfloat16", _dtype),
    "stochastic_rounding": (True, parse_bool),
    "seed": (0, int),
}
# HF's adamw_anyprecision keys and defaults (float32 moments unless told otherwise).
ANYPRECISION_ARGS = {
    **LOW_PRECISION_BF16_ARGS,
    "momentum_dtype": ("float32", _dtype),
    "variance_dtype": ("float32", _dtype),
    "use_kahan_summation": (False, parse_bool),
    "compensation_buffer_dtype": ("bfloat16", _dtype),
}


def adamw_low_precision(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """AdamW with moments stored in low-precision dtypes (bf16 + stochastic rounding)."""
    x = cfg.extra
    if x.get("use_kahan_summation"):
        raise ValueError(
            "use_kahan_summation=True is not supported: jtrain keeps float32 master params; "
            "store only the moments in bfloat16 (momentum_dtype/variance_dtype)"
        )
    direction = scale_by_adam_low_precision(
        cfg.b1, cfg.b2, cfg.eps, _dtype(x["momentum_dtype"]), _dtype(x["variance_dtype"]),
        x["stochastic_rounding"], x["seed"],
    )
    return optax.chain(direction, _decoupled_tail(cfg))


EIGHT_BIT_ARGS = {"block_size": (256, int), "min_8bit_size": (4096, int)}
ADEMAMIX_8BIT_ARGS = {**ADEMAMIX_ARGS, **EIGHT_BIT_ARGS}


def adamw_8bit(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """AdamW with block-wise 8-bit moments."""
    x = cfg.extra
    direction = scale_by_adam_8bit(cfg.b1, cfg.b2, cfg.eps, x["block_size"], x["min_8bit_size"])
    return optax.chain(direction, _decoupled_tail(cfg))


def lion(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """Lion; betas are adam_beta1/adam_beta2, as HF passes them to bitsandbytes' Lion."""
    return optax.chain(optax.scale_by_lion(cfg.b1, cfg.b2), _decoupled_tail(cfg))


def lion_8bit(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """Lion with its momentum stored block-wise in 8 bits."""
    x = cfg.extra
    direction = scale_by_lion_8bit(cfg.b1, cfg.b2, x["block_size"], x["min_8bit_size"])
    return optax.chain(direction, _decoupled_tail(cfg))


ADAFACTOR_ARGS = {
    "scale_parameter": (False, parse_bool),
    "relative_step": (False, parse_bool),
    "warmup_init": (False, parse_bool),
    "clip_threshold": (1.0, float),
    "decay_rate": (-0.8, float),
    "beta1": (None, optional_float),
    "eps1": (1e-30, float),
    "eps2": (1e-3, float),
}


def adafactor(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """transformers' Adafactor with the Trainer's defaults (no relative step, no param scale)."""
    x = dict(cfg.extra)
    eps = (x.pop("eps1"), x.pop("eps2"))
    return hf_adafactor(cfg.learning_rate, weight_decay=cfg.weight_decay, mask=decay_mask, eps=eps,
                        shape_of=lambda name, shape: hf_tensor_shape(cfg.param_layout, name, shape), **x)


SGD_ARGS = {"momentum": (0.0, float), "dampening": (0.0, float), "nesterov": (False, parse_bool)}


def _coupled(cfg: OptimizerConfig, direction: optax.GradientTransformation) -> optax.GradientTransformation:
    """torch-style L2: wd * p is added to the gradient before the optimizer sees it."""
    return optax.chain(
        optax.add_decayed_weights(cfg.weight_decay, decay_mask),
        direction,
        optax.scale_by_learning_rate(cfg.learning_rate),
    )


def sgd(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """torch.optim.SGD (momentum, dampening, nesterov from optim_args; coupled L2 decay)."""
    x = cfg.extra
    return _coupled(cfg, scale_by_torch_sgd(x["momentum"], x["dampening"], x["nesterov"]))


RMSPROP_ARGS = {
    "momentum": (0.0, float),
    "alpha": (0.99, float),
    "eps": (1e-8, float),
    "centered": (False, parse_bool),
}
RMSPROP_BNB_ARGS = {**RMSPROP_ARGS, **EIGHT_BIT_ARGS}


def rmsprop(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """torch.optim.RMSprop with torch's defaults (HF passes no adam args to it)."""
    x = cfg.extra
    return _coupled(cfg, scale_by_torch_rmsprop(x["alpha"], x["eps"], x["centered"], x["momentum"]))


def rmsprop_bnb(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """bitsandbytes' RMSprop, as HF builds it (optim_args as its keywords): torch's update without
    momentum or centring (bitsandbytes refuses centred and does not use momentum), L2 decay in the
    gradient; with 8-bit state for `rmsprop_bnb_8bit`."""
    x = cfg.extra
    _refuse_bnb_rmsprop_options(x)
    if cfg.name.endswith("_8bit"):
        direction = scale_by_rmsprop_8bit(x["alpha"], x["eps"], x["block_size"], x["min_8bit_size"])
    else:
        direction = scale_by_torch_rmsprop(x["alpha"], x["eps"], False, 0.0)
    return _coupled(cfg, direction)


def _refuse_bnb_rmsprop_options(x: dict) -> None:
    from jtrain.errors import ConfigError

    if x["centered"]:
        raise ConfigError("optim_args centered=True: bitsandbytes' RMSprop refuses it (not implemented there); "
                          "optim rmsprop is torch's, which has it")
    if x["momentum"]:
        raise ConfigError(f"optim_args momentum={x['momentum']}: bitsandbytes' RMSprop takes it and does not use "
                          "it; remove it, or use optim rmsprop (torch's, with momentum)")
    if x["alpha"] == 0:
        raise ConfigError("optim_args alpha=0: bitsandbytes' RMSprop refuses it")


ADAGRAD_ARGS = {"lr_decay": (0.0, float), "eps": (1e-10, float), "initial_accumulator_value": (0.0, float)}


def adagrad(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """torch.optim.Adagrad, as HF builds it (lr_decay and eps from optim_args; coupled L2 decay)."""
    x = cfg.extra
    return _coupled(cfg, scale_by_torch_adagrad(x["lr_decay"], x["eps"], x["initial_accumulator_value"]))


SCHEDULE_FREE_ARGS = {"warmup_steps": (None, optional_float), "weight_lr_power": (2.0, float), "r": (0.0, float)}
SCHEDULE_FREE_SGD_ARGS = {**SCHEDULE_FREE_ARGS, "momentum": (0.9, float)}
# HF hands RAdamScheduleFree no warm-up (it needs none) and reads only these two from optim_args
SCHEDULE_FREE_RADAM_ARGS = {"weight_lr_power": (2.0, float), "r": (0.0, float)}


def _schedule_free_common(cfg: OptimizerConfig) -> dict:
    """What the schedule-free builders take as HF passes it: the warm-up where the optimizer has one
    (optim_args, else TrainingArguments' warmup_steps) and weight_lr_power; schedulefree's `r` only at
    its default 0."""
    from jtrain.errors import ConfigError

    x = cfg.extra
    if x["r"] != 0:
        raise ConfigError(f"optim_args r={x['r']}: schedule-free averaging with polynomial weights ((k+1)^r) is "
                          "not implemented; only r=0, HF's default")
    common = dict(mask=decay_mask, weight_lr_power=x["weight_lr_power"])
    if "warmup_steps" in x:
        common["warmup_steps"] = cfg.warmup_steps if x["warmup_steps"] is None else int(x["warmup_steps"])
    return common


def schedule_free(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """schedulefree's AdamWScheduleFree; evaluate with `schedule_free_eval_params`."""
    return schedule_free_adamw(cfg.learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                               **_schedule_free_common(cfg))


def schedule_free_radam(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """schedulefree's RAdamScheduleFree; evaluate with `schedule_free_eval_params`."""
    return schedule_free_radam_tx(cfg.learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                               **_schedule_free_common(cfg))


def schedule_free_sgd(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """schedulefree's SGDScheduleFree (momentum 0.9 unless optim_args say); evaluate with
    `schedule_free_eval_params`."""
    return schedule_free_sgd_tx(cfg.learning_rate, momentum=cfg.extra["momentum"], weight_decay=cfg.weight_decay,
                                **_schedule_free_common(cfg))


MUON_ARGS = {
    "beta": (0.95, float),
    "ns_steps": (5, int),
    "nesterov": (True, parse_bool),
    "consistent_rms": (0.2, optional_float),
}


def muon(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """Muon for hidden weight matrices, AdamW for embeddings, heads, biases and norms."""
    x = cfg.extra
    return muon_adamw(
        cfg.learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
        beta=x["beta"], ns_steps=x["ns_steps"], nesterov=x["nesterov"], consistent_rms=x["consistent_rms"],
        layout=cfg.param_layout,
    )
