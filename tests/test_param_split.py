"""Trainable/frozen split: the step differentiates and optimises only the trainable part."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import optax

from jtrain.compiled import build_compiled_steps
from jtrain.losses import causal_lm_loss
from jtrain.param_split import combine, leaf_paths, split_params
from jtrain.sharding import make_mesh
from jtrain.state import TrainState
from jtrain.step import make_train_step
from tiny import padded_lm_batch, tiny_llama


def _is_mlp(path: tuple[str, ...]) -> bool:
    return "mlp" in path


def test_split_and_combine_round_trip():
    params = tiny_llama().init(jax.random.key(0))
    train, frozen = split_params(params, _is_mlp)
    assert train and frozen
    assert all("mlp" in p for p in leaf_paths(train))
    assert not any("mlp" in p for p in leaf_paths(frozen))
    back = combine(train, frozen)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        assert a is b  # combined without copying


def test_frozen_params_get_no_update_and_no_optimizer_state():
    model = tiny_llama()
    params = model.init(jax.random.key(0))
    batch = {k: v[None] for k, v in padded_lm_batch(4, 16, seed=1).items()}
    tx = optax.adam(1e-2)
    train, frozen = split_params(params, _is_mlp)
    step = jax.jit(make_train_step(model.apply, causal_lm_loss, tx, lr_schedule=1e-2))
    state = TrainState.create(train, tx, jax.random.key(1), frozen=frozen)
    n_train = sum(x.size for x in jax.tree.leaves(train))
    n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state))
    assert n_opt == 2 * n_train + 1  # adam's mu and nu for the trainable part only, plus its count
    new, metrics = step(state, batch)
    for a, b in zip(jax.tree.leaves(new.frozen), jax.tree.leaves(frozen)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(not np.allclose(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(train)))
    # the loss of the split step is the full model's loss (same forward pass)
    full_state = TrainState.create(params, tx, jax.random.key(1))
    _, full_metrics = step(full_state, batch)
    np.testing.assert_allclose(float(metrics["loss"]), float(full_metrics["loss"]), rtol=1e-6)


@dataclasses.dataclass(frozen=True)
class _MlpOnly:
    """A Model whose non-MLP params are frozen (what a PEFT wrapper provides via `is_trainable`)."""

    inner: object

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def is_trainable(self, path: tuple[str, ...]) -> bool:
        return _is_mlp(path)


def test_compiled_steps_shard_the_frozen_part():
    model = _MlpOnly(tiny_llama())
    mesh = make_mesh({"fsdp": 2, "tensor": 2, "data": 2})
    steps = build_compiled_steps(model, mesh, optax.adam(1e-2), 1e-2, causal_lm_loss, seed=0)
    state = steps.init_state()
    assert state.frozen and all("mlp" not in p for p in leaf_paths(state.frozen))
    batch = steps.place_train_batch({k: v[None] for k, v in padded_lm_batch(8, 16, seed=2).items()})
    before = jax.tree.map(np.asarray, state.frozen)
    state, metrics = steps.train_step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    for a, b in zip(jax.tree.leaves(state.frozen), jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(a), b)
    out = steps.eval_step(state.full_params(), steps.place_eval_batch(padded_lm_batch(8, 16, seed=3)))
    assert float(out["weight"]) > 0
