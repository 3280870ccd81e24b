"""Small optax transformations that reproduce PyTorch/HF semantics exactly.

optax ships close relatives of these, but each differs from torch in a detail that breaks
step-for-step parity with HF's Trainer (clip denominator, SGD dampening on the first step,
where RMSprop's momentum sees the learning rate). Parity is what lets users move a recipe
from HF to jtrain without re-tuning, so the torch versions live here.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

# torch.nn.utils.clip_grad_norm_ divides by (norm + 1e-6); copied so clipped steps match.
_TORCH_CLIP_EPS = 1e-6


def global_norm_f32(tree: Any) -> jax.Array:
    """L2 norm over all leaves, accumulated in float32 even for bf16 grads."""
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def clip_coefficient(norm: jax.Array, max_norm: float) -> jax.Array:
    """torch's `clip_grad_norm_` factor for gradients of global norm `norm`: min(1, c / (norm + 1e-6))."""
    return jnp.minimum(max_norm / (norm + _TORCH_CLIP_EPS), 1.0)


def clip_by_global_norm_torch(max_norm: float, *, takes_grad_norm: bool = False) -> optax.GradientTransformation:
    """Global-norm clipping as `torch.nn.utils.clip_grad_norm_`: g * min(1, c / (|g| + 1e-6)).

    With `takes_grad_norm` (only where this is the chain's first transform, so its input is the
    gradients themselves), a `grad_norm` extra argument, the train step's `global_norm_f32` of the
    same gradients, is used instead of a second pass over them (58M float32 gradients: 232 MB)."""

    def update(updates, state, params=None, *, grad_norm=None, **extra_args):
        del params, extra_args
        norm = grad_norm if takes_grad_norm and grad_norm is not None else global_norm_f32(updates)
        coef = clip_coefficient(norm, max_norm)
        return jax.tree.map(lambda g: (g * coef).astype(g.dtype), updates), state

    return optax.GradientTransformationExtraArgs(lambda _: optax.EmptyState(), update)


def learning_rate_at(learning_rate: float | optax.Schedule, count: jax.Array) -> jax.Array:
    """The learning rate for the step numbered `count` (0 for the first update)."""
    if callable(learning_rate):
        return jnp.asarray(learning_rate(count), jnp.float32)
    return jnp.asarray(learning_rate, jnp.float32)


class CountState(NamedTuple):
    """Just a step counter (int32, 0 before the first update)."""

    count: jax.Array


def decoupled_weight_decay(
    learning_rate: float | optax.Schedule, weight_decay: float, mask: Any, *, of_updated: bool = False
) -> optax.GradientTransformation:
    """Adds -lr(t) * wd * p to already lr-scaled updates (torch's p -= lr*wd*p), or with `of_updated`
    -lr(t) * wd * (p + update): the weight decayed after its update, as galore_torch's 8-bit AdamW does.

    Used after optimizers that apply the learning rate internally (optax's muon), where
    `add_decayed_weights` can no longer be slotted in before the lr scaling.
    """

    def init(params):
        del params
        return CountState(jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("decoupled_weight_decay needs params")
        step = learning_rate_at(learning_rate, state.count) * weight_decay
        masks = mask(params) if callable(mask) else mask

        def apply(u, p, m):  # m is a static Python bool from the mask
            return (u - step * (p + u if of_updated else p)).astype(u.dtype) if m else u

        out = jax.tree.map(apply, updates, params, masks)
        return out, CountState(optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


class TorchSgdState(NamedTuple):
    """Momentum buffer and step count (torch seeds the buffer with the first gradient)."""

    count: jax.Array
    momentum: Any


def scale_by_torch_sgd(momentum: float, dampening: float, nesterov: bool) -> optax.GradientTransformation:
    """Direction of torch.optim.SGD (before -lr); L2 decay must be added to grads before this."""
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("nesterov SGD requires momentum > 0 and dampening = 0 (as in torch)")

    def init(params):
        bufs = jax.tree.map(jnp.zeros_like, params) if momentum else ()
        return TorchSgdState(jnp.zeros([], jnp.int32), bufs)

    def update(updates, state, params=None):
        del params
        if momentum == 0:
            return updates, state._replace(count=optax.safe_increment(state.count))
        first = state.count == 0

        def buf_fn(g, b):
            return jnp.where(first, g, momentum * b + (1.0 - dampening) * g).astype(b.dtype)

        bufs = jax.tree.map(buf_fn, updates, state.momentum)
        if nesterov:
            out = jax.tree.map(lambda g, b: g + momentum * b, updates, bufs)
        else:
            out = bufs
        return out, TorchSgdState(optax.safe_increment(state.count), bufs)

    return optax.GradientTransformation(init, update)


class TorchRmspropState(NamedTuple):
    """torch.optim.RMSprop buffers: square_avg, grad_avg (centered) and momentum_buffer."""

    square_avg: Any
    grad_avg: Any
    momentum: Any


def scale_by_torch_rmsprop(
    alpha: float, eps: float, centered: bool, momentum: float
) -> optax.GradientTransformation:
    """Direction of torch.optim.RMSprop (eps outside the sqrt; momentum before the lr)."""

    def init(params):
        # Buffers torch would not allocate are empty tuples, so state bytes match torch's.
        zeros = lambda use: jax.tree.map(jnp.zeros_like, params) if use else ()  # noqa: E731
        return TorchRmspropState(zeros(True), zeros(centered), zeros(momentum > 0))

    def update(updates, state, params=None):
        del params
        sq = jax.tree.map(lambda s, g: alpha * s + (1 - alpha) * g * g, state.square_avg, updates)
        ga = state.grad_avg
        if centered:
            ga = jax.tree.map(lambda a, g: alpha * a + (1 - alpha) * g, ga, updates)
            denom = jax.tree.map(lambda s, a: jnp.sqrt(s - a * a) + eps, sq, ga)
        else:
            denom = jax.tree.map(lambda s: jnp.sqrt(s) + eps, sq)
        out = jax.tree.map(lambda g, d: g / d, updates, denom)
        buf = state.momentum
        if momentum > 0:
            buf = jax.tree.map(lambda b, u: momentum * b + u, buf, out)
            out = buf
        return out, TorchRmspropState(sq, ga, buf)

    return optax.GradientTransformation(init, update)


class TorchAdagradState(NamedTuple):
    count: jax.Array  # updates applied so far (torch's `step` - 1 during an update)
    sum: Any  # running sum of squared gradients (torch's `state_sum`)


def scale_by_torch_adagrad(lr_decay: float, eps: float, initial_accumulator_value: float = 0.0
                           ) -> optax.GradientTransformation:
    """Direction of torch.optim.Adagrad: g / (sqrt(sum g^2) + eps) (eps outside the sqrt, 1e-10 by
    default, no starting accumulator: optax's adagrad puts eps inside and starts the sum at 0.1),
    divided by 1 + (step - 1) * lr_decay as torch's learning rate is."""

    def init(params):
        start = lambda p: jnp.full_like(p, initial_accumulator_value)  # noqa: E731
        return TorchAdagradState(jnp.zeros((), jnp.int32), jax.tree.map(start, params))

    def update(updates, state, params=None):
        del params
        total = jax.tree.map(lambda s, g: s + g * g, state.sum, updates)
        decay = 1.0 + state.count.astype(jnp.float32) * lr_decay
        out = jax.tree.map(lambda g, s: g / (jnp.sqrt(s) + eps) / decay, updates, total)
        return out, TorchAdagradState(optax.safe_increment(state.count), total)

    return optax.GradientTransformation(init, update)


def bias_correction(beta: float, t: jax.Array) -> jax.Array:
    """1 - beta**t in float32 to a few ulp: -expm1(t log beta), the log taken in float64 on the host
    (float32's 1 - 0.999**1 is 1.3e-5 off, which the first steps' sqrt carries into the update)."""
    return -jnp.expm1(t * math.log(beta))


def adam_moments(m: jax.Array, v: jax.Array, g: jax.Array, b1: float, b2: float) -> tuple[jax.Array, jax.Array]:
    """Adam's moving averages of g and g^2 (float32), one step on."""
    g = g.astype(jnp.float32)
    return b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g


def transformers_adam_direction(m: jax.Array, v: jax.Array, t: jax.Array, b1: float, b2: float, eps: float
                                ) -> jax.Array:
    """transformers' original AdamW direction, which GaLore's and APOLLO's packages keep: eps joins the
    uncorrected sqrt(v), and the bias corrections scale the step, sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)
    (torch's AdamW corrects v before adding eps)."""
    return m / (jnp.sqrt(v) + eps) * (jnp.sqrt(bias_correction(b2, t)) / bias_correction(b1, t))


def scale_by_transformers_adam(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """`transformers_adam_direction` for every leaf (optax's ScaleByAdamState: count, mu, nu)."""

    def init(params):
        zeros = jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params)
        return optax.ScaleByAdamState(jnp.zeros([], jnp.int32), zeros, zeros)

    def update(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        moments = jax.tree.map(lambda m, v, g: adam_moments(m, v, g, b1, b2), state.mu, state.nu, updates)
        mu, nu = (jax.tree.map(lambda _, pair: pair[i], updates, moments) for i in (0, 1))
        out = jax.tree.map(lambda m, v, g: transformers_adam_direction(m, v, t, b1, b2, eps).astype(g.dtype),
                           mu, nu, updates)
        return out, optax.ScaleByAdamState(count, mu, nu)

    return optax.GradientTransformation(init, update)
