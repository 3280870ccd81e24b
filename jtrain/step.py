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

import contextlib
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from jtrain.losses import LossOutput
from jtrain.models import cpu_gemm
from jtrain.optim import fused_adamw
from jtrain.optim.transforms import global_norm_f32
from jtrain.param_split import combine
from jtrain.precision import cast_floating
from jtrain.state import TrainState

ApplyFn = Callable[..., Mapping[str, jax.Array]]
LossFn = Callable[[Mapping[str, jax.Array], Mapping[str, jax.Array]], LossOutput]
Batch = Mapping[str, jax.Array]


def _loss_and_grads(apply_fn: ApplyFn, loss_fn: LossFn, params: Any, batch: Batch, rng: jax.Array,
                    frozen: Any = None, scale: jax.Array | None = None):
    """(loss output, gradients of the summed loss); with `scale`, of the summed loss x scale."""

    def summed(p: Any) -> tuple[jax.Array, LossOutput]:
        out = loss_fn(apply_fn(combine(p, frozen), batch, rng=rng, train=True), batch)
        return (out.loss_sum if scale is None else out.loss_sum * scale), out

    (_, out), grads = jax.value_and_grad(summed, has_aux=True)(params)
    return out, grads


def accumulate_gradients(apply_fn: ApplyFn, loss_fn: LossFn, params: Any, batch: Batch, rng: jax.Array,
                         frozen: Any = None, scale: jax.Array | None = None):
    """Sum loss, weight, stats and gradients over the leading micro-batch axis with `lax.scan`.

    Gradients are taken with respect to `params` only; `frozen` (see `jtrain.param_split`) is
    combined with them for the forward pass and gets no gradient. With a loss `scale` (fp16
    loss scaling) the gradients are those of the scaled loss; the returned loss is unscaled."""
    k = jax.tree.leaves(batch)[0].shape[0]

    def body(carry, xs):
        i, micro = xs
        out, grads = _loss_and_grads(apply_fn, loss_fn, params, micro, jax.random.fold_in(rng, i), frozen, scale)
        return jax.tree.map(jnp.add, carry, (out, grads)), None

    first_out, first_grads = jax.eval_shape(
        lambda: _loss_and_grads(apply_fn, loss_fn, params, jax.tree.map(lambda x: x[0], batch), rng, frozen, scale)
    )
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (first_out, first_grads))
    (out, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(k), batch))
    return out, grads


def matmul_precision_scope(precision: str | None) -> contextlib.AbstractContextManager:
    """JAX's default matmul precision while tracing a step (HF's `tf32`); a no-op for None."""
    return jax.default_matmul_precision(precision) if precision else contextlib.nullcontext()


def make_train_step(
    apply_fn: ApplyFn,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    lr_schedule: Callable[[jax.Array], jax.Array] | float | None = None,
    matmul_precision: str | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """Build the pure train step. Non-finite updates are never applied: the step keeps the old
    params and optimizer state, counts the skip, and reports `nonfinite`; the host decides
    whether that stops training (the default) or is only counted.

    A state with a `loss_scale` (`jtrain.precision.LossScale`, fp16) trains with dynamic loss
    scaling: an overflow of the scaled gradients skips the update, halves the scale and is
    reported as `overflow`, not `nonfinite` (see `jtrain.precision` for when it still is).
    `matmul_precision` is JAX's default matmul precision inside the step (HF's `tf32`)."""

    fused = fused_adamw.spec_of(tx)  # a `make_optimizer` AdamW: one pass per parameter on the CPU

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        with matmul_precision_scope(matmul_precision):
            return _train_step(state, batch)

    def _train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        rng, step_rng = jax.random.split(state.rng)
        scaler = state.loss_scale
        scale = None if scaler is None else scaler.scale
        out, grad_sums = accumulate_gradients(apply_fn, loss_fn, state.params, batch, step_rng, state.frozen, scale)
        denom = jnp.maximum(out.weight, 1.0)
        grad_denom = denom if scale is None else denom * scale

        loss = out.loss_sum / denom
        # The division is written twice on purpose: the norm's reduction and the optimizer's update
        # each fuse it, so the divided gradients are never stored (a pass over them saved), and the
        # clip reuses this norm (`grad_norm`) instead of a second reduction (`make_optimizer`).
        grad_norm = global_norm_f32(jax.tree.map(lambda g: g / grad_denom, grad_sums))
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(params_and_opt: tuple[Any, Any]) -> tuple[Any, Any]:
            return _optimizer_update(tx, fused, grad_sums, grad_denom, grad_norm, *params_and_opt, state.lr_factor)

        params, opt_state = _where_finite(finite, update, (state.params, state.opt_state))
        extra: dict = {}
        nonfinite = ~finite
        new_scaler = None
        if scaler is not None:
            overflow = jnp.isfinite(loss) & ~jnp.isfinite(grad_norm)
            # An overflow is expected under fp16; only a non-finite loss, or an overflow at the
            # floor of the scale, means the run diverged (see jtrain.precision).
            nonfinite = ~jnp.isfinite(loss) | (overflow & (scale <= scaler.min_scale))
            new_scaler = scaler.update(~overflow)
            extra = {"loss_scale": scale, "overflow": overflow.astype(jnp.int32)}
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            rng=rng,
            skipped=state.skipped + (~finite).astype(jnp.int32),
            loss_scale=new_scaler,
        )
        metrics = {
            **_input_token_counts(batch),
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": _learning_rate(lr_schedule, state.step) * state.lr_factor,
            "num_tokens": out.weight,
            "nonfinite": nonfinite.astype(jnp.int32),
            **extra,
            # accuracy is an evaluation metric: leaving "correct" out lets XLA drop the argmax pass
            **{k: v for k, v in out.stats.items() if k != "correct"},
        }
        return new_state, metrics

    return train_step


def _optimizer_update(tx: optax.GradientTransformation, fused: fused_adamw.AdamWSpec | None, grad_sums: Any,
                      grad_denom: jax.Array, grad_norm: jax.Array, params: Any, opt_state: Any,
                      lr_factor: jax.Array) -> tuple[Any, Any]:
    """New (params, opt_state) from the summed gradients: the fused CPU AdamW where it applies, else
    `tx` on the mean gradients (the clip reusing the step's `grad_norm`), scaled by `lr_factor`."""
    if fused_adamw.applies(fused, params, grad_sums, opt_state, cpu_gemm.on_one_cpu()):
        return fused_adamw.update(fused, grad_sums, grad_denom, grad_norm, params, opt_state, lr_factor)
    mean = jax.tree.map(lambda g: g / grad_denom, grad_sums)
    updates, opt_state = optax.with_extra_args_support(tx).update(mean, opt_state, params, grad_norm=grad_norm)
    updates = jax.tree.map(lambda u: u * lr_factor.astype(u.dtype), updates)
    return optax.apply_updates(params, updates), opt_state


def _where_finite(finite: jax.Array, update: Callable[[Any], Any], old: Any) -> Any:
    """`update(old)` where `finite`, else `old` unchanged (a skipped step).

    On the CPU backend a `lax.cond`, so the update writes the donated buffers in place; a select
    per leaf keeps old and new values alive together, and XLA then copies the old parameters and
    moments so the update may overwrite them (the optimizer's part of the 58M-parameter CPU step
    took 0.21 s with selects, 0.13 s as a cond; the step ran 1.04x faster, benchmarks/TRIED.md).
    Accelerators keep the select: XLA's GPU conditional reads its predicate back to the host, a
    stream synchronisation every step."""
    if jax.default_backend() == "cpu":
        return jax.lax.cond(finite, update, lambda unchanged: unchanged, old)
    new = update(old)
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


def _input_token_counts(batch: Batch) -> dict:
    """The step's input tokens, padding included and not (HF's `include_num_input_tokens_seen` all /
    non_padding), counted on the global batch so every process sees the same numbers."""
    ids = batch.get("input_ids")
    if ids is None:
        return {}
    total = jnp.float32(ids.size)
    mask = batch.get("attention_mask")
    return {"input_tokens": total,
            "non_padding_tokens": total if mask is None else jnp.sum(mask, dtype=jnp.float32)}


def _learning_rate(schedule: Callable | float | None, step: jax.Array) -> jax.Array:
    if schedule is None:
        return jnp.float32(jnp.nan)
    if callable(schedule):
        return jnp.asarray(schedule(step), jnp.float32)
    return jnp.float32(schedule)


def make_eval_step(apply_fn: ApplyFn, loss_fn: LossFn, *, param_dtype: str | None = None,
                   matmul_precision: str | None = None,
                   predictions_fn: Callable[[Any, Batch], Any] | None = None,
                   label_names: Sequence[str] = ("labels",)) -> Callable[[Any, Batch], dict]:
    """Build the pure eval step: `eval_step(params, batch) -> summed loss, weight and stats`.

    Reductions happen on the device, so evaluation never gathers full logits for its metrics.
    `param_dtype` casts the floating params first (HF's `bf16_full_eval` / `fp16_full_eval`).
    With `predictions_fn(outputs, batch)` (the Trainer's `prediction_step`) the step also returns
    `predictions`, computed from the same forward pass as the loss. As HF's `prediction_step`, a
    batch without every one of `label_names` (a test set to predict on) computes no loss: the step
    then returns no `loss_sum` / `weight` (an empty `label_names` always computes it).
    """

    def eval_step(params: Any, batch: Batch) -> dict:  # params: the full tree (`TrainState.full_params()`)
        with matmul_precision_scope(matmul_precision):
            if param_dtype is not None:
                params = cast_floating(params, param_dtype)
            outputs = apply_fn(params, batch, rng=None, train=False)
            loss = {}
            if all(name in batch for name in label_names):  # the batch's keys: fixed when traced
                out = loss_fn(outputs, batch)
                loss = {"loss_sum": out.loss_sum, "weight": out.weight, **out.stats}
            extra = {} if predictions_fn is None else {"predictions": predictions_fn(outputs, batch)}
        return {**loss, **extra}

    return eval_step
