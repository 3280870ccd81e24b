"""Schedule-Free AdamW, RAdam and SGD (Defazio et al., 2024), step for step as the `schedulefree`
package HF's Trainer builds them from, across a second `train()` too (its own update count goes on while
HF's scheduler restarts). The state is optax's `ScheduleFreeState`.

Caveat for evaluation and checkpoint export: the params that the train step carries are
the gradient-evaluation point y, an interpolation between the fast iterate z and the
averaged iterate x. The model to *evaluate* (and save for inference) is x, which
`schedule_free_eval_params(opt_state, params)` recovers. Evaluating y instead typically
reports a worse loss than the run has actually reached.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from optax.contrib import ScheduleFreeState
from optax.contrib import schedule_free_eval_params as _optax_eval_params


Ramp = Callable[[jax.Array], jax.Array]
"""The factor on HF's scheduled rate at schedulefree's update count k (its `group['k']`)."""


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
    """AdamW without momentum under schedule-free averaging; decay masked, taken at y, and scaled by
    the rate with the normalised gradient, as schedulefree's AdamWScheduleFree. `warmup_steps` is
    schedulefree's own ramp (HF passes its `warmup_steps` to it), on top of HF's scheduler."""
    return _averaged(_adam_direction(b2, eps, weight_decay, mask), learning_rate, _warmup(warmup_steps), b1,
                     weight_lr_power)


def schedule_free_radam(
    learning_rate: float | optax.Schedule,
    *,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
    mask: Any,
    weight_lr_power: float = 2.0,
) -> optax.GradientTransformation:
    """schedulefree's RAdamScheduleFree as HF builds it (no warm-up of its own, `silent_sgd_phase`):
    while RAdam's variance estimate is not yet defined (rho_t <= 4: the first 4 updates at b2 = 0.999)
    the rate is 0 and only the second moment moves; after that the Adam step's rate is scaled by the
    rectification term, which rises towards 1. The direction is AdamW's: schedulefree steps with the raw
    gradient while rho_t <= 4, but at rate 0, where the two directions give the same update."""
    return _averaged(_adam_direction(b2, eps, weight_decay, mask), learning_rate,
                     lambda k: _rectification(b2, k + 1), b1, weight_lr_power)


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
    return _averaged(optax.add_decayed_weights(weight_decay, mask), learning_rate, _warmup(warmup_steps), momentum,
                     weight_lr_power)


def _adam_direction(b2: float, eps: float, weight_decay: float, mask: Any) -> optax.GradientTransformation:
    """Adam's normalised gradient without momentum (bias-corrected, eps outside the root), plus the
    masked decay taken at y, before the rate."""
    return optax.chain(optax.scale_by_rms(decay=b2, eps=eps, eps_in_sqrt=False, bias_correction=True),
                       optax.add_decayed_weights(weight_decay, mask))


def _warmup(warmup_steps: int) -> Ramp | None:
    """schedulefree's own warm-up, (k + 1) / warmup_steps (so the first update already moves)."""
    if warmup_steps <= 0:
        return None
    return lambda k: jnp.minimum(1.0, (k + 1) / warmup_steps)


def _rho(b2: float, t: jax.Array) -> jax.Array:
    """RAdam's length of the approximated simple moving average after t updates,
    rho_inf - 2 t b2^t / (1 - b2^t), accurate in float32. Written with x = -t log(b2) it is
    (rho_inf - c) + c g(x), c = 2 / -log(b2), g(x) = 1 - x / (e^x - 1): the two constants near
    2 / (1 - b2) cancel in float64 on the host, and g takes its series below x = 0.5 (formed directly
    it loses 4 digits there). The direct float32 formula is 1e-4 off in the first rectification terms."""
    log_b2 = math.log(b2)
    c = 2.0 / -log_b2
    x = t.astype(jnp.float32) * -log_b2
    x2 = x * x
    series = x / 2 - x2 / 12 + x2 * x2 / 720 - x2 * x2 * x2 / 30240
    g = jnp.where(x < 0.5, series, 1 - x / jnp.expm1(jnp.maximum(x, 0.5)))
    return (2.0 / (1.0 - b2) - 1.0 - c) + c * g


def _rectification(b2: float, t: jax.Array) -> jax.Array:
    """RAdam's rectification term at update t, 0 while rho_t <= 4 (schedulefree's silent SGD phase)."""
    rho_inf, rho = 2.0 / (1.0 - b2) - 1.0, _rho(b2, t)
    defined = rho > 4.0
    safe = jnp.where(defined, rho, 5.0)  # keeps the unused branch's square root finite
    rect = jnp.sqrt((safe - 4) * (safe - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * safe))
    return jnp.where(defined, rect, 0.0)


def _rate(learning_rate: float | optax.Schedule, ramp: Ramp | None, schedule_count: jax.Array,
          k: jax.Array) -> jax.Array:
    """Update k's rate: HF's scheduler at its own step times the optimizer's ramp at k. The two counts
    differ after a second `train()`: HF's new scheduler starts over while schedulefree's `group['k']`
    (ramp, bias correction, averaging) goes on."""
    base = learning_rate(schedule_count) if callable(learning_rate) else learning_rate
    if ramp is None:
        return jnp.asarray(base, jnp.float32)
    return base * ramp(k)


def _averaged(direction: optax.GradientTransformation, learning_rate: float | optax.Schedule, ramp: Ramp | None,
              b1: float, weight_lr_power: float) -> optax.GradientTransformation:
    """Schedule-free averaging (Defazio et al., 2024) around `direction` (the step before the rate):
    z moves by -rate x direction, x averages z with weights max_rate^weight_lr_power, and the params
    are y = b1 x + (1 - b1) z. The state is optax's `ScheduleFreeState` (so optax's eval-params
    helper reads it): its `step_count` is k + 1, and its base state is `(ScaleByScheduleState, direction's
    state)`, the scheduler's own count, which a second `train()` restarts (`carried_optimizer_state`).
    optax's own wrapper reads its rate at `step_count` alone, which cannot restart the schedule."""

    def init(params: Any) -> ScheduleFreeState:
        schedule = optax.ScaleByScheduleState(jnp.zeros([], jnp.int32))
        return ScheduleFreeState(b1=jnp.asarray(b1, jnp.float32), weight_sum=jnp.zeros([], jnp.float32),
                                 step_count=jnp.ones([], jnp.int32), max_lr=jnp.zeros([], jnp.float32),
                                 base_optimizer_state=(schedule, direction.init(params)),
                                 z=jax.tree.map(lambda t: t.copy(), params))

    def update(grads: Any, state: ScheduleFreeState, params: Any = None) -> tuple[Any, ScheduleFreeState]:
        schedule, inner = state.base_optimizer_state
        lr = _rate(learning_rate, ramp, schedule.count, state.step_count - 1)
        max_lr = jnp.maximum(state.max_lr, lr)
        weight = max_lr ** weight_lr_power
        weight_sum = state.weight_sum + weight
        # schedulefree takes 0 / 0 (a zero rate so far) as 0
        ck = jnp.where(weight_sum > 0, weight / jnp.where(weight_sum > 0, weight_sum, 1.0), 0.0)
        step, inner = direction.update(grads, inner, params)
        z = jax.tree.map(lambda zi, si: (zi - lr * si).astype(zi.dtype), state.z, step)
        # x is recomputed from y and the previous z rather than stored (one buffer fewer, as optax does)
        new_y = jax.tree.map(lambda yi, z0, z1: b1 * ((1 - ck) * (yi - (1 - b1) * z0) / b1 + ck * z1) + (1 - b1) * z1,
                             params, state.z, z)
        updates = jax.tree.map(lambda ny, yi: (ny - yi).astype(yi.dtype), new_y, params)
        schedule = optax.ScaleByScheduleState(schedule.count + 1)
        return updates, state._replace(weight_sum=weight_sum, step_count=state.step_count + 1, max_lr=max_lr,
                                       base_optimizer_state=(schedule, inner), z=z)

    return optax.GradientTransformation(init, update)


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
