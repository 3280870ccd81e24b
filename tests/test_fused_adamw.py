"""The one-pass CPU AdamW (`jtrain.optim.fused_adamw`) against optax's chain and torch's AdamW."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from test_optim_adamw_parity import MAX_GRAD_NORM, PEAK_LR, STEPS, WARMUP, WD, _torch_run
from test_optim_problems import jax_loss, linear_warmup_decay, make_batches, max_abs_diff

from jtrain.errors import ConfigError
from jtrain.losses import causal_lm_loss
from jtrain.models import cpu_gemm
from jtrain.optim import fused_adamw, make_optimizer
from jtrain.optim.transforms import global_norm_f32
from jtrain.state import TrainState
from jtrain.step import make_train_step
from tiny import padded_lm_batch, tiny_llama

PARAMS = {"dense": {"kernel": jnp.linspace(-1, 1, 96 * 40).reshape(96, 40), "bias": jnp.linspace(0, 1, 40)},
          "norm": {"scale": jnp.ones(96)}, "head": {"kernel": jnp.linspace(2, -2, 40 * 7).reshape(40, 7)}}


def _grad_sums(step: int) -> dict:
    key = jax.random.key(step)
    # Sums over ~1000 tokens of alternating size, so the clip is active on some steps only.
    scale = 3000.0 if step % 2 else 100.0
    return jax.tree.map(lambda p: scale * jax.random.normal(jax.random.fold_in(key, p.size), p.shape), PARAMS)


def _run(tx: optax.GradientTransformation, fused: bool, steps: int = 6) -> tuple[dict, object]:
    """`steps` updates from gradient sums, as the train step does them (mean, norm, clip, lr factor)."""
    spec = fused_adamw.spec_of(tx)
    denom, lr_factor = jnp.float32(1000.0), jnp.float32(0.5)

    @jax.jit
    def step(params, opt_state, grad_sums):
        grad_norm = global_norm_f32(jax.tree.map(lambda g: g / denom, grad_sums))
        if fused:
            assert fused_adamw.applies(spec, params, grad_sums, opt_state, single_device=True)
            return fused_adamw.update(spec, grad_sums, denom, grad_norm, params, opt_state, lr_factor)
        updates, opt_state = optax.with_extra_args_support(tx).update(
            jax.tree.map(lambda g: g / denom, grad_sums), opt_state, params, grad_norm=grad_norm)
        return optax.apply_updates(params, jax.tree.map(lambda u: u * lr_factor, updates)), opt_state

    params, opt_state = PARAMS, tx.init(PARAMS)
    for i in range(steps):
        params, opt_state = step(params, opt_state, _grad_sums(i))
    return params, opt_state


@pytest.mark.parametrize("learning_rate", [3e-2, optax.linear_schedule(3e-2, 1e-3, 6)], ids=["constant", "schedule"])
@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0], ids=["clipped", "unclipped"])
def test_fused_update_matches_the_optax_chain(learning_rate, max_grad_norm) -> None:
    tx = make_optimizer("adamw_torch", learning_rate, weight_decay=0.1, max_grad_norm=max_grad_norm)
    want, want_state = _run(tx, fused=False)
    got, got_state = _run(tx, fused=True)
    assert jax.tree.structure(got_state) == jax.tree.structure(want_state)
    # Counts are exact; floats may differ by a few float32 roundings per element and step (the
    # kernel folds clip / count into one factor and may fuse a multiply-add), so 2e-6 of each
    # leaf's largest value after 6 steps (measured: 2e-7). Decaying the norm or bias, or a wrong
    # bias correction, moves them by 1e-3 and more.
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path((want, want_state))[0]]
    for path, w, g in zip(paths, jax.tree.leaves((want, want_state)), jax.tree.leaves((got, got_state))):
        if jnp.issubdtype(w.dtype, jnp.integer):
            assert int(w) == int(g), path
        else:
            assert float(jnp.max(jnp.abs(w - g))) <= 2e-6 * float(jnp.max(jnp.abs(w))), path


def test_fused_update_matches_torch_adamw() -> None:
    """The parity problem of test_optim_adamw_parity, through the fused pass: torch's AdamW with
    HF's decay groups, clip_grad_norm_ and linear warm-up/decay schedule."""
    batches = make_batches(STEPS)
    model, params0, norms = _torch_run(batches)
    assert 0 < sum(n > MAX_GRAD_NORM for n in norms) < STEPS
    tx = make_optimizer("adamw_torch_fused", linear_warmup_decay(PEAK_LR, WARMUP, STEPS), weight_decay=WD,
                        max_grad_norm=MAX_GRAD_NORM)
    spec = fused_adamw.spec_of(tx)

    @jax.jit
    def step(params, opt_state, x, y):
        grads = jax.grad(jax_loss)(params, x, y)
        return fused_adamw.update(spec, grads, jnp.float32(1.0), global_norm_f32(grads), params, opt_state,
                                  jnp.float32(1.0))

    params, opt_state = params0, tx.init(params0)
    assert fused_adamw.applies(spec, params, params, opt_state, single_device=True)
    for x, y in batches:
        params, opt_state = step(params, opt_state, x, y)
    # The same 1e-5 as test_optim_adamw_parity (float32 on both sides, measured there: 6e-7).
    with torch.no_grad():
        assert max_abs_diff(params, model) <= 1e-5


def test_only_make_optimizer_adamw_on_one_cpu_applies(monkeypatch) -> None:
    tx = make_optimizer("adamw_torch", 1e-3, weight_decay=0.01)
    spec, state = fused_adamw.spec_of(tx), tx.init(PARAMS)
    assert fused_adamw.applies(spec, PARAMS, PARAMS, state, single_device=True)
    assert not fused_adamw.applies(spec, PARAMS, PARAMS, state, single_device=False)  # sharded: XLA's chain
    assert fused_adamw.spec_of(optax.adamw(1e-3)) is None  # a user's own chain
    assert fused_adamw.spec_of(make_optimizer("lion", 1e-3)) is None
    assert fused_adamw.spec_of(make_optimizer("adamw_bf16", 1e-3)) is None  # bf16 moments
    half = jax.tree.map(lambda p: p.astype(jnp.bfloat16), PARAMS)
    assert not fused_adamw.applies(spec, half, half, tx.init(half), single_device=True)
    monkeypatch.setenv(fused_adamw.ENV, "off")
    assert not fused_adamw.applies(spec, PARAMS, PARAMS, state, single_device=True)
    monkeypatch.setenv(fused_adamw.ENV, "fast")
    with pytest.raises(ConfigError, match="JTRAIN_CPU_FUSED_ADAMW"):
        fused_adamw.applies(spec, PARAMS, PARAMS, state, single_device=True)


def _train(monkeypatch, mode: str, nan_at: int | None = None) -> tuple[TrainState, str]:
    monkeypatch.setenv(fused_adamw.ENV, mode)
    model = tiny_llama()
    tx = make_optimizer("adamw_torch", optax.linear_schedule(1e-2, 0.0, 10), weight_decay=0.01)

    def loss_fn(outputs, batch):
        out = causal_lm_loss(outputs, batch)
        return out._replace(loss_sum=out.loss_sum * batch["poison"][0])

    # One device, as the Trainer traces its step for a one-device mesh (the tests see 8 CPU devices).
    step = jax.jit(cpu_gemm.traced_on(True, make_train_step(model.apply, loss_fn, tx)), donate_argnums=0)
    state = TrainState.create(model.init(jax.random.key(0)), tx, jax.random.key(1))
    hlo = ""
    for i in range(4):
        batch = {k: v[None] for k, v in padded_lm_batch(4, 16, seed=i).items()}
        batch["poison"] = jnp.full((1, 1), jnp.nan if i == nan_at else 1.0)
        hlo = hlo or step.lower(state, batch).as_text()
        state, metrics = step(state, batch)
        assert int(metrics["nonfinite"]) == int(i == nan_at)
    return state, hlo


def test_train_step_runs_the_kernel_and_matches_the_chain(monkeypatch) -> None:
    fused, hlo = _train(monkeypatch, "auto", nan_at=2)
    assert fused_adamw.TARGET in hlo
    chain, hlo = _train(monkeypatch, "off", nan_at=2)
    assert fused_adamw.TARGET not in hlo
    assert int(fused.skipped) == int(chain.skipped) == 1
    assert int(fused.opt_state[1][0].count) == int(chain.opt_state[1][0].count) == 3  # the skipped step counts not
    # 1e-5 of each leaf's largest value (measured: 1.6e-6). Looser than the test above because the two
    # steps are separate programs: XLA fuses the backward differently around a different update, so the
    # gradients themselves differ in float32 rounding (the second moments by 1.5e-6), and Adam's
    # normalisation amplifies that where a gradient is near eps. A wrong decay or bias correction is 1e-3.
    for w, g in zip(jax.tree.leaves((chain.params, chain.opt_state)), jax.tree.leaves((fused.params, fused.opt_state))):
        w, g = np.asarray(w), np.asarray(g)
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * max(float(np.max(np.abs(w))), 1e-30))


def test_a_skipped_step_leaves_the_donated_state_untouched(monkeypatch) -> None:
    """The kernel writes parameters and moments in place: under the non-finite guard's
    conditional a skipped step must still see the old values, bit for bit."""
    monkeypatch.setenv(fused_adamw.ENV, "auto")
    model = tiny_llama()
    tx = make_optimizer("adamw_torch", 1e-2, weight_decay=0.01)
    step = jax.jit(cpu_gemm.traced_on(True, make_train_step(model.apply, lambda o, b: causal_lm_loss(o, b)._replace(
        loss_sum=causal_lm_loss(o, b).loss_sum * jnp.nan), tx)), donate_argnums=0)
    state = TrainState.create(model.init(jax.random.key(0)), tx, jax.random.key(1))
    before = jax.tree.map(np.array, (state.params, state.opt_state))
    state, metrics = step(state, {k: v[None] for k, v in padded_lm_batch(2, 8).items()})
    assert int(metrics["nonfinite"]) == 1
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves((state.params, state.opt_state))):
        np.testing.assert_array_equal(np.asarray(b), a)
