"""Schedule-Free AdamW and SGD (Defazio et al., 2024) via `optax.contrib.schedule_free`, step for
step as the `schedulefree` package HF's Trainer builds them from.

Caveat for evaluation and checkpoint export: the params that the train step carries are
the gradient-evaluation point y, an interpolation between the fast iterate z and the
averaged iterate x. The model to *evaluate* (and save for inference) is x, which
`schedule_free_eval_params(opt_state, params)` recovers. Evaluating y instead typically
reports a worse loss than the run has actually reached.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax
from optax.contrib import ScheduleFreeState
from optax.contrib import schedule_free_eval_params as _optax_eval_params


def schedule_free_adamw(
    learning_rate: float | optax.Schedule,
    *,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
    mask: Any,
    warmup_steps: int = 0,
    weight_lr_power: float = 2.0,
) -> optax.GradientTransformation:
    """AdamW without momentum wrapped in schedule-free averaging; decay masked and lr-scaled.

    `warmup_steps` multiplies `learning_rate` by schedulefree's linear ramp (HF passes its
    `warmup_steps` to schedulefree's AdamW for the same purpose).
    """
    lr = _with_warmup(learning_rate, warmup_steps) if warmup_steps > 0 else learning_rate
    inner = optax.chain(
        optax.scale_by_rms(decay=b2, eps=eps, eps_in_sqrt=False, bias_correction=True),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(lr),
    )
    return _averaged(inner, lr, b1, weight_lr_power)


def schedule_free_sgd(
    learning_rate: float | optax.Schedule,
    *,
    momentum: float,
    weight_decay: float,
    mask: Any,
    warmup_steps: int = 0,
    weight_lr_power: float = 2.0,
) -> optax.GradientTransformation:
    """schedulefree's SGDScheduleFree: plain SGD steps (decay added to the gradient at y) under
    schedule-free averaging with interpolation `momentum`; the warm-up as schedule_free_adamw's."""
    lr = _with_warmup(learning_rate, warmup_steps) if warmup_steps > 0 else learning_rate
    inner = optax.chain(optax.add_decayed_weights(weight_decay, mask), optax.scale_by_learning_rate(lr))
    return _averaged(inner, lr, momentum, weight_lr_power)


def _averaged(inner: optax.GradientTransformation, lr: float | optax.Schedule, b1: float,
              weight_lr_power: float) -> optax.GradientTransformation:
    """optax's schedule-free wrapper around `inner`. It reads the rate for its averaging weights at its
    own step count, which starts at 1, while the inner chain's count starts at 0: shifted back, both
    see update k's rate, as schedulefree's optimizers do (with a varying rate, a warm-up or HF's
    scheduler, they differed by one update)."""
    outer = (lambda count: lr(count - 1)) if callable(lr) else lr
    return optax.contrib.schedule_free(inner, learning_rate=outer, b1=b1, weight_lr_power=weight_lr_power)


def _with_warmup(learning_rate: float | optax.Schedule, warmup_steps: int) -> optax.Schedule:
    """schedulefree's warm-up: update k (from 0) runs at (k + 1) / warmup_steps of the rate, so the
    first update already moves (a ramp from 0 made it a no-op and shifted the whole warm-up)."""
    def schedule(count):
        ramp = jnp.minimum(1.0, (count + 1) / warmup_steps)
        base = learning_rate(count) if callable(learning_rate) else learning_rate
        return base * ramp

    return schedule


def _find_schedule_free_state(state: Any) -> ScheduleFreeState | None:
    if isinstance(state, ScheduleFreeState):
        return state
    if isinstance(state, (tuple, list)):
        for item in state:
            found = _find_schedule_free_state(item)
            if found is not None:
                return found
    if isinstance(state, dict):
        for item in state.values():
            found = _find_schedule_free_state(item)
            if found is not None:
                return found
    return None


def schedule_free_eval_params(opt_state: Any, params: Any) -> Any:
    """Params to evaluate/export for a schedule-free run (x, not the training point y).

    Accepts the full state of `make_optimizer("schedule_free_adamw", ...)` (a chain), and
    returns `params` unchanged for any other optimizer, so callers need not branch.

    Example:
        >>> eval_params = schedule_free_eval_params(opt_state, params)
    """
    sf_state = _find_schedule_free_state(opt_state)
    if sf_state is None:
        return params
    return _optax_eval_params(sf_state, params)
