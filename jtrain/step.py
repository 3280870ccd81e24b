"""The pure, compiled train and eval steps.

`make_train_step` binds the static collaborators (apply fn, loss fn, optax chain, schedule)
and returns `train_step(state, batch) -> (state, metrics)`: the only thing that runs on the
device per update. Batches carry a leading micro-batch axis [k, b, ...]; gradient
accumulation is a `lax.scan` over it, and the summed loss and gradients are divided once by
the total number of real tokens, so k micro-batches equal one batch of k*b rows.

Example (a research loop without the Trainer)::

    step = jax.jit(make_train_step(model.apply, causal_lm_loss, tx), donate_argnums=0)
    for batch in batches:            # leaves shaped [k, b, L]
        state, metrics = step(state, batch)
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from jtrain.losses import LossOutput
from jtrain.param_split import combine
from jtrain.state import TrainState

ApplyFn = Callable[..., Mapping[str, jax.Array]]
LossFn = Callable[[Mapping[str, jax.Array], Mapping[str, jax.Array]], LossOutput]
Batch = Mapping[str, jax.Array]


def _loss_and_grads(apply_fn: ApplyFn, loss_fn: LossFn, params: Any, batch: Batch, rng: jax.Array,
                    frozen: Any = None):
    def summed(p: Any) -> tuple[jax.Array, LossOutput]:
        out = loss_fn(apply_fn(combine(p, frozen), batch, rng=rng, train=True), batch)
        return out.loss_sum, out

    (_, out), grads = jax.value_and_grad(summed, has_aux=True)(params)
    return out, grads


def accumulate_gradients(apply_fn: ApplyFn, loss_fn: LossFn, params: Any, batch: Batch, rng: jax.Array,
                         frozen: Any = None):
    """Sum loss, weight, stats and gradients over the leading micro-batch axis with `lax.scan`.

    Gradients are taken with respect to `params` only; `frozen` (see `jtrain.param_split`) is
    combined with them for the forward pass and gets no gradient."""
    k = jax.tree.leaves(batch)[0].shape[0]

    def body(carry, xs):
        i, micro = xs
        out, grads = _loss_and_grads(apply_fn, loss_fn, params, micro, jax.random.fold_in(rng, i), frozen)
        return jax.tree.map(jnp.add, carry, (out, grads)), None

    first_out, first_grads = jax.eval_shape(
        lambda: _loss_and_grads(apply_fn, loss_fn, params, jax.tree.map(lambda x: x[0], batch), rng, frozen)
    )
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (first_out, first_grads))
    (out, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(k), batch))
    return out, grads


def make_train_step(
    apply_fn: ApplyFn,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    lr_schedule: Callable[[jax.Array], jax.Array] | float | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """Build the pure train step. Non-finite updates are never applied: the step keeps the old
    params and optimizer state, counts the skip, and reports `nonfinite`; the host decides
    whether that stops training (the default) or is only counted."""

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        rng, step_rng = jax.random.split(state.rng)
        out, grad_sums = accumulate_gradients(apply_fn, loss_fn, state.params, batch, step_rng, state.frozen)
        denom = jnp.maximum(out.weight, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grad_sums)
        loss = out.loss_sum / denom
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        updates = jax.tree.map(lambda u: u * state.lr_factor.astype(u.dtype), updates)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = state.replace(
            step=state.step + 1,
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            rng=rng,
            skipped=state.skipped + (~finite).astype(jnp.int32),
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": _learning_rate(lr_schedule, state.step) * state.lr_factor,
            "num_tokens": out.weight,
            "nonfinite": (~finite).astype(jnp.int32),
            **{k: v for k, v in out.stats.items()},
        }
        return new_state, metrics

    return train_step


def _learning_rate(schedule: Callable | float | None, step: jax.Array) -> jax.Array:
    if schedule is None:
        return jnp.float32(jnp.nan)
    if callable(schedule):
        return jnp.asarray(schedule(step), jnp.float32)
    return jnp.float32(schedule)


def make_eval_step(apply_fn: ApplyFn, loss_fn: LossFn) -> Callable[[Any, Batch], dict]:
    """Build the pure eval step: `eval_step(params, batch) -> summed loss, weight and stats`.

    Reductions happen on the device, so evaluation never gathers full logits for its metrics.
    """

    def eval_step(params: Any, batch: Batch) -> dict:  # params: the full tree (`TrainState.full_params()`)
        out = loss_fn(apply_fn(params, batch, rng=None, train=False), batch)
        return {"loss_sum": out.loss_sum, "weight": out.weight, **out.stats}

    return eval_step
