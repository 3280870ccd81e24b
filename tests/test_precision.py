"""Mixed precision: bf16 trains like float32, fp16 loss scaling rescues underflowing gradients,
the loss scale survives a checkpoint, and HF's precision flags map to the right policy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jtrain.args import TrainingArguments
from jtrain.checkpoint import CheckpointWriter, restore_state
from jtrain.compiled import build_compiled_steps
from jtrain.data.loader import ArrayDataset
from jtrain.errors import ConfigError
from jtrain.losses import LossOutput
from jtrain.precision import LossScale, PrecisionPolicy, policy_from_args
from jtrain.sharding import make_mesh
from jtrain.state import TrainState
from jtrain.step import make_eval_step, make_train_step
from jtrain.trainer import Trainer
from tests.tiny import lm_rows, tiny_llama


def _train_eval(tmp_path, **flags) -> tuple[float, Trainer]:
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=4, learning_rate=3e-3,
                             save_strategy="no", disable_tqdm=True, logging_steps=100, mesh_shape={"data": 1},
                             warmup_steps=0, **flags)
    trainer = Trainer(tiny_llama(), args, train_dataset=ArrayDataset(lm_rows(32, 16, seed=1)),
                      eval_dataset=ArrayDataset(lm_rows(16, 16, seed=2)))
    trainer.train()
    return trainer.evaluate()["eval_loss"], trainer


def test_bf16_training_matches_float32_within_margin(tmp_path):
    loss32, _ = _train_eval(tmp_path / "f32")
    loss16, trainer = _train_eval(tmp_path / "bf16", bf16=True)
    # Master params and optimizer state stay float32 under bf16 (only the compute is half).
    assert {x.dtype for x in jax.tree.leaves(trainer.train_state.params)} == {jnp.dtype("float32")}
    assert {x.dtype for x in jax.tree.leaves(trainer.train_state.opt_state) if jnp.issubdtype(x.dtype, jnp.floating)} \
        == {jnp.dtype("float32")}
    assert trainer.train_state.loss_scale is None  # bf16 needs no loss scaling
    # Margin 0.05 nats (about 1.5% of a loss near 3.5): bf16 keeps 8 mantissa bits, so each matmul
    # is rounded at ~0.4%; over 8 updates of a 2-layer model this moves the loss by ~1e-2, while a
    # bug (half-precision master weights, a half-precision loss) moves it by far more.
    print(f"eval loss float32 {loss32:.5f}, bf16 {loss16:.5f}")
    assert abs(loss16 - loss32) < 0.05


def test_fp16_llama_runs_on_cpu_with_loss_scaling(tmp_path):
    """fp16 through the whole Trainer on the CPU backend (XLA:CPU takes the float16 x float16 -> float32
    dots the attention and the float32 logits need): the forward matches float32 on the same weights,
    and training with dynamic loss scaling learns, skipping exactly the updates that overflowed."""
    def trainer(path, params=None, **flags):
        args = TrainingArguments(output_dir=str(path), max_steps=8, per_device_train_batch_size=4,
                                 learning_rate=3e-3, save_strategy="no", disable_tqdm=True, logging_steps=100,
                                 mesh_shape={"data": 1}, warmup_steps=0, **flags)
        return Trainer(tiny_llama(), args, train_dataset=ArrayDataset(lm_rows(32, 16, seed=1)),
                       eval_dataset=ArrayDataset(lm_rows(16, 16, seed=2)), params=params)

    f32 = trainer(tmp_path / "f32")
    f32.train()
    trained = jax.device_get(f32.params)
    loss32 = f32.evaluate()["eval_loss"]
    # The same trained weights evaluated in float16: each op rounds to 11 bits (~5e-4 relative); measured
    # 2e-5 nats apart here, bound 1e-2; a float16 softmax/loss or unscaled logits would move it more.
    loss16_same = trainer(tmp_path / "same", params=trained, fp16=True).evaluate()["eval_loss"]
    print(f"trained weights: eval loss float32 {loss32:.5f}, fp16 {loss16_same:.5f}")
    assert 0 < abs(loss16_same - loss32) < 1e-2
    fp16 = trainer(tmp_path / "fp16", fp16=True)
    before16 = fp16.evaluate()["eval_loss"]
    fp16.train()
    after16 = fp16.evaluate()["eval_loss"]
    scale = fp16.train_state.loss_scale
    assert {x.dtype for x in jax.tree.leaves(fp16.train_state.params)} == {jnp.dtype("float32")}
    # The scale starts at 2**16 and halves at each overflowing (skipped) update, as torch's GradScaler.
    assert float(scale.scale) == 2.0 ** 16 / 2 ** int(scale.overflows) and int(scale.overflows) < 8
    assert after16 < before16 - 0.2  # the applied updates learned (float32 falls ~0.5 in 8 updates)


# ---- fp16 dynamic loss scaling, on a model built so that float16 gradients underflow -------------

# Two multiplications by 1e-4 in float16: the backward pass multiplies the cotangent (~0.5) by
# 1e-4 twice, giving ~5e-9 < 6e-8, float16's smallest subnormal, so the gradient flushes to zero.
# The factors come in with the batch (not as constants) so XLA cannot fold them into one constant.
_TINY = 1e-4


def _apply(dtype):
    def apply(params, batch, *, rng=None, train=False):
        x, tiny = batch["x"].astype(dtype), batch["tiny"].astype(dtype)
        return {"h": (x * params["w"].astype(dtype)) * tiny * tiny}
    return apply


def _loss(outputs, batch) -> LossOutput:
    h = outputs["h"].astype(jnp.float32)
    return LossOutput(jnp.sum(h * batch["t"]), jnp.float32(batch["t"].shape[-1]), {})


def _state(tx, loss_scale):
    params = {"w": jnp.ones((4,), jnp.float32)}
    return TrainState.create(params, tx, jax.random.key(0), loss_scale=loss_scale)


# Targets <= 0.5 so that the scaled cotangent (t x 2**16) stays below float16's max (65504).
_BATCH = {"x": jnp.array([[[1.0, 2.0, 3.0, 4.0]]]), "t": jnp.array([[[0.5, -0.25, 0.5, 0.125]]]),
          "tiny": jnp.full((1, 1, 4), _TINY)}


def test_unscaled_fp16_gradients_underflow_and_loss_scaling_recovers_them():
    tx = optax.sgd(1e6)  # large lr: gradients are ~1e-9, so the update is ~1e-3, well above f32 rounding
    one_row = {"x": _BATCH["x"][0], "tiny": _BATCH["tiny"][0]}
    grads = lambda dtype: jax.grad(lambda p: _loss(_apply(dtype)(p, one_row), {"t": _BATCH["t"][0]})[0])(  # noqa: E731
        {"w": jnp.ones((4,), jnp.float32)})["w"]
    assert np.all(np.asarray(grads(jnp.float16)) == 0.0), "the constructed case must underflow in float16"
    assert np.all(np.asarray(grads(jnp.float32)) != 0.0)

    ref = jax.jit(make_train_step(_apply(jnp.float32), _loss, tx))
    plain = jax.jit(make_train_step(_apply(jnp.float16), _loss, tx))
    scaled = jax.jit(make_train_step(_apply(jnp.float16), _loss, tx))
    s_ref, s_plain, s_scaled = _state(tx, None), _state(tx, None), _state(tx, LossScale.create())
    for _ in range(3):
        s_ref, _ = ref(s_ref, _BATCH)
        s_plain, _ = plain(s_plain, _BATCH)
        s_scaled, m = scaled(s_scaled, _BATCH)
        assert int(m["overflow"]) == 0 and int(m["nonfinite"]) == 0 and float(m["loss_scale"]) == 2.0 ** 16
    np.testing.assert_array_equal(s_plain.params["w"], np.ones(4))  # no gradient reached the weights
    moved = np.asarray(s_ref.params["w"]) - 1.0
    assert np.all(np.abs(moved) > 1e-4)
    # rtol 5e-3: float16 rounds each of the few products to 11 bits (~5e-4 relative); the scaled
    # run must reproduce the float32 update, not merely move.
    np.testing.assert_allclose(np.asarray(s_scaled.params["w"]) - 1.0, moved, rtol=5e-3)


def test_overflow_halves_the_scale_skips_the_update_and_is_not_divergence():
    tx = optax.sgd(1e5)
    step = jax.jit(make_train_step(_apply(jnp.float16), _loss, tx))
    # A start scale so large that the scaled cotangent overflows float16 (max 65504) at once.
    state = _state(tx, LossScale.create(init_scale=2.0 ** 40))
    seen = []
    for _ in range(30):
        state, m = step(state, _BATCH)
        seen.append((float(m["loss_scale"]), int(m["overflow"]), int(m["nonfinite"])))
        if not m["overflow"]:
            break
    assert seen[0] == (2.0 ** 40, 1, 0)  # an overflow is reported as such, never as `nonfinite`
    assert all(s[2] == 0 for s in seen)
    assert all(b[0] == a[0] / 2 for a, b in zip(seen, seen[1:]))  # halved after each overflow
    assert seen[-1][1] == 0 and len(seen) > 1
    overflows = len(seen) - 1
    assert int(state.loss_scale.overflows) == overflows and int(state.skipped) == overflows
    assert int(state.step) == len(seen)


def test_nonfinite_loss_is_still_divergence_under_fp16():
    tx = optax.sgd(1.0)
    step = jax.jit(make_train_step(_apply(jnp.float16), _loss, tx))
    bad = {**_BATCH, "t": jnp.full_like(_BATCH["t"], jnp.nan)}
    state, m = step(_state(tx, LossScale.create()), bad)
    assert int(m["nonfinite"]) == 1 and int(m["overflow"]) == 0
    np.testing.assert_array_equal(state.params["w"], np.ones(4))


def test_loss_scale_grows_after_a_run_of_good_steps_and_respects_its_floor():
    s = LossScale.create(init_scale=8.0, growth_interval=3)
    for _ in range(2):
        s = s.update(jnp.bool_(True))
    assert float(s.scale) == 8.0 and int(s.good_steps) == 2
    s = s.update(jnp.bool_(True))
    assert float(s.scale) == 16.0 and int(s.good_steps) == 0
    s = s.update(jnp.bool_(False))
    assert float(s.scale) == 8.0 and int(s.overflows) == 1
    floor = LossScale.create(init_scale=1.0).update(jnp.bool_(False))
    assert float(floor.scale) == 1.0  # min_scale: halving stops at 1


def _write_empty_json(path: str) -> None:
    with open(path, "w") as fh:
        fh.write("{}")


def test_loss_scale_round_trips_through_a_checkpoint(tmp_path):
    mesh = make_mesh({"data": 1})
    steps = build_compiled_steps(tiny_llama(), mesh, optax.sgd(0.1), 0.1, _loss, seed=0,
                                 precision=PrecisionPolicy(compute_dtype="float16", loss_scaling=True))
    state = steps.init_state()
    assert float(state.loss_scale.scale) == 2.0 ** 16
    state = state.replace(loss_scale=state.loss_scale.replace(
        scale=jnp.float32(512.0), good_steps=jnp.int32(17), overflows=jnp.int32(5)))
    writer = CheckpointWriter(str(tmp_path))
    writer.save(state, 3, {"loader_state.json": {}, "jtrain_meta.json": {}}, _write_empty_json)
    writer.wait()
    restored = restore_state(str(tmp_path / "checkpoint-3"), steps.init_state())
    assert float(restored.loss_scale.scale) == 512.0
    assert int(restored.loss_scale.good_steps) == 17 and int(restored.loss_scale.overflows) == 5
    assert restored.loss_scale.growth_interval == 2000


def test_precision_flags_map_to_the_policy():
    a = TrainingArguments
    assert policy_from_args(a()) == PrecisionPolicy()
    p = policy_from_args(a(bf16=True))
    assert (p.compute_dtype, p.eval_dtype, p.cast_eval_params, p.loss_scaling) == ("bfloat16", "bfloat16", False, False)
    p = policy_from_args(a(fp16=True))
    assert (p.compute_dtype, p.loss_scaling) == ("float16", True)
    p = policy_from_args(a(bf16_full_eval=True))
    assert (p.compute_dtype, p.eval_dtype, p.cast_eval_params) == ("float32", "bfloat16", True)
    assert policy_from_args(a(tf32=True)).matmul_precision == "tensorfloat32"
    assert policy_from_args(a(tf32=False)).matmul_precision == "highest"
    assert policy_from_args(a()).matmul_precision is None
    with pytest.raises(ConfigError, match="bf16_full_eval.*fp16_full_eval"):
        policy_from_args(a(bf16_full_eval=True, fp16_full_eval=True))


def test_full_eval_casts_params_and_tf32_sets_matmul_precision_in_the_step():
    seen = {}

    def apply(params, batch, *, rng=None, train=False):
        seen["dtype"] = params["w"].dtype
        seen["precision"] = jax.config.jax_default_matmul_precision
        return {"h": batch["x"] * params["w"]}

    step = make_eval_step(apply, lambda o, b: LossOutput(jnp.sum(o["h"]), jnp.float32(1), {}),
                          param_dtype="bfloat16", matmul_precision="tensorfloat32")
    jax.jit(step)({"w": jnp.ones(3)}, {"x": jnp.ones(3)})
    assert seen == {"dtype": jnp.dtype("bfloat16"), "precision": "tensorfloat32"}
