"""Builders of the low-rank optimizers (GaLore, APOLLO), as HF's Trainer builds galore_torch's and apollo_torch's.

HF gives the `optim_target_modules` weights (nn.Linear modules only) the low-rank optimizer and every other
parameter the same optimizer without the projection, builds both with the learning rate only (APOLLO's
targeted group also gets adam_beta1/2 and adam_epsilon), and leaves each package's defaults in place:
TrainingArguments' weight_decay and decay groups are not used. jtrain follows it and says what is not applied.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import jax
import optax

from jtrain.optim.adafactor import hf_adafactor
from jtrain.optim.adamw_8bit import scale_by_adam_8bit
from jtrain.optim.apollo import scale_by_apollo
from jtrain.optim.galore import scale_by_galore
from jtrain.optim.targets import FULL, LOW_RANK, hf_tensor_shape, low_rank_labels, view_of
from jtrain.optim.transforms import decoupled_weight_decay, scale_by_transformers_adam

if TYPE_CHECKING:
    from jtrain.optim.factory import OptimizerConfig

logger = logging.getLogger(__name__)

GALORE_ARGS = {
    "rank": (128, int),
    "update_proj_gap": (200, int),
    "scale": (0.25, float),
    "proj_type": ("std", str),
}

APOLLO_ARGS = {
    "rank": (128, int),
    "update_proj_gap": (200, int),
    "scale": (1.0, float),
    "scale_type": ("channel", str),
    "proj": ("random", str),
    "proj_type": ("std", str),
    "seed": (0, int),
}

# galore_torch's and apollo_torch's AdamW defaults (betas, eps; no weight decay).
_PACKAGE_ADAM = (0.9, 0.999, 1e-6)
# bitsandbytes' AdamW8bit, which galore_torch's 8-bit optimizer is: its defaults, weight decay 0.01 on every
# parameter (HF's decay groups are not used), block-wise 8-bit moments for tensors of 4096 elements or more.
_BNB_ADAM, _BNB_WEIGHT_DECAY, _BNB_BLOCK, _BNB_MIN_8BIT = (0.9, 0.999, 1e-8), 1e-2, 256, 4096

# What each name leaves in place of TrainingArguments' values (for the warning).
_PACKAGE_DEFAULTS = {
    "galore_adamw": "galore_torch's AdamW: betas 0.9/0.999, eps 1e-6, no weight decay",
    "galore_adamw_8bit": "galore_torch's 8-bit AdamW (bitsandbytes'): betas 0.9/0.999, eps 1e-8, weight decay 0.01 "
                         "on every parameter",
    "galore_adafactor": "galore_torch's Adafactor: no weight decay",
    "apollo_adamw": "apollo_torch's AdamW: betas 0.9/0.999 and eps 1e-6 on the untargeted parameters (its "
                    "projected weights take adam_beta1/2 and adam_epsilon), no weight decay",
}


def _base_name(name: str) -> str:
    return name.removesuffix("_layerwise")


def _targeted(cfg: OptimizerConfig, low_rank: optax.GradientTransformation,
              full: optax.GradientTransformation) -> optax.GradientTransformation:
    """`low_rank` on the targeted kernels, `full` on every other parameter."""
    _warn_ignored_by_hf(cfg)

    def labels(params):
        return low_rank_labels(params, cfg.target_modules, cfg.name, cfg.param_layout)

    return optax.partition({LOW_RANK: low_rank, FULL: full}, labels)


def _warn_ignored_by_hf(cfg: OptimizerConfig) -> None:
    """TrainingArguments' values that HF's builder does not pass are said, not silently dropped."""
    name = _base_name(cfg.name)
    ignored = {"weight_decay": (cfg.weight_decay, 0.0)}
    if name.startswith("galore_adamw"):
        ignored.update(adam_beta1=(cfg.b1, 0.9), adam_beta2=(cfg.b2, 0.999), adam_epsilon=(cfg.eps, 1e-8))
    changed = [f"{k}={v!r}" for k, (v, default) in ignored.items() if v != default]
    if changed:
        logger.warning("%s: %s not applied: HF's Trainer builds it with the learning rate only, leaving %s, and "
                       "jtrain follows it", cfg.name, ", ".join(changed), _PACKAGE_DEFAULTS[name])


def _galore(cfg: OptimizerConfig, inner: optax.GradientTransformation) -> optax.GradientTransformation:
    x = cfg.extra
    return scale_by_galore(x["rank"], x["update_proj_gap"], x["scale"], x["proj_type"], inner,
                           view_of=view_of(cfg.param_layout))


def galore(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """galore_adamw: GaLore around galore_torch's AdamW (transformers' original Adam step) on the targeted
    kernels, that AdamW on the rest, then the learning rate."""
    adam = scale_by_transformers_adam(*_PACKAGE_ADAM)
    return optax.chain(_targeted(cfg, _galore(cfg, adam), adam), optax.scale_by_learning_rate(cfg.learning_rate))


def galore_8bit(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """galore_adamw_8bit: bitsandbytes' 8-bit AdamW, around GaLore's projection on the targeted kernels.

    The untargeted parameters decay in bitsandbytes' kernel (p (1 - lr wd) before the step); galore_torch
    steps a targeted weight's projection with decay off and then decays the updated weight, (p + update)
    (1 - lr wd). This is the optimizer galore_torch 1.0 means: with bitsandbytes 0.50 its positional arguments
    shift by one (`percentile_clipping` is gone) and set a trust ratio that zeroes the update of every 32-bit
    state in its GaLore group (docs/hf_api.md)."""
    lr = cfg.learning_rate
    adam = scale_by_adam_8bit(*_BNB_ADAM, _BNB_BLOCK, _BNB_MIN_8BIT)
    everywhere = lambda params: jax.tree.map(lambda _: True, params)  # noqa: E731
    low_rank = optax.chain(_galore(cfg, adam), optax.scale_by_learning_rate(lr),
                           decoupled_weight_decay(lr, _BNB_WEIGHT_DECAY, everywhere, of_updated=True))
    full = optax.chain(adam, optax.add_decayed_weights(_BNB_WEIGHT_DECAY), optax.scale_by_learning_rate(lr))
    return _targeted(cfg, low_rank, full)


def galore_adafactor(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """galore_adafactor: transformers' Adafactor (galore_torch's copy) as HF builds it, with the learning rate,
    no relative step and no parameter scaling; around GaLore's projection (each low-rank matrix factored and
    RMS-clipped on its own) on the targeted kernels, on HF's tensors elsewhere."""
    full = hf_adafactor(cfg.learning_rate, shape_of=lambda name, shape: hf_tensor_shape(cfg.param_layout, name, shape))
    return _targeted(cfg, _galore(cfg, hf_adafactor(cfg.learning_rate)), full)


def apollo(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """APOLLO-AdamW on `optim_target_modules` kernels, apollo_torch's AdamW (galore_torch's step) on the rest."""
    x = cfg.extra
    if x["proj"] != "random":
        raise ValueError(f"apollo_adamw supports proj='random' only (got {x['proj']!r}); use galore_adamw for SVD")
    direction = scale_by_apollo(
        x["rank"], x["update_proj_gap"], x["scale"], x["scale_type"], x["proj_type"],
        cfg.b1, cfg.b2, cfg.eps, x["seed"], view_of=view_of(cfg.param_layout),
    )
    adam = scale_by_transformers_adam(*_PACKAGE_ADAM)
    return optax.chain(_targeted(cfg, direction, adam), optax.scale_by_learning_rate(cfg.learning_rate))
