"""Pipeline parallelism: a GPipe schedule over the `stage` axis inside the one compiled step.

The tiny Llama (4 scanned layers, 2 per stage) trains 4 updates on `stage: 2 x data: 2 x
tensor: 2` (8 fake devices) and must report the single-device losses; each stage's devices
hold only their own layers, and the stages hand activations on by collective-permute.
"""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest

from jtrain import ConfigError, Trainer, TrainingArguments
from jtrain.data.loader import ArrayDataset, HostLoader
from jtrain.models import create_model
from jtrain.pipeline_parallel import bubble_fraction, from_microbatches, to_microbatches
from tiny import TINY_LLAMA, LossRecorder, lm_rows

STEPS, ACCUM, GLOBAL_MICRO = 4, 2, 8
PP_MESH = {"stage": 2, "data": 2, "tensor": 2}
LAYERS = 4
# Same float32 math in a different order: tensor-split matmuls and the row-split gradient sum
# partial products across devices (a few ulp each; eps 1.2e-7); the pipeline itself only moves
# activations and adds no arithmetic. Four Adam updates at lr 1e-2 carry those differences into
# later losses; rtol 2e-6 (~16 ulp, as tests/test_parallel.py) bounds that. A schedule bug (a
# micro-batch skipped or run through the wrong stage's layers) moves the loss by 1e-2 or more.
LOSS_RTOL = 2e-6



def _model(layers: int = LAYERS):
    return create_model("llama", {**TINY_LLAMA, "num_hidden_layers": layers}, scan_layers=True)


def _args(tmp_path, mesh_shape):
    dp = mesh_shape.get("data", 1) * mesh_shape.get("fsdp", 1) * mesh_shape.get("expert", 1)  # the batch axes
    return TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=STEPS, per_device_train_batch_size=GLOBAL_MICRO // dp,
        gradient_accumulation_steps=ACCUM, learning_rate=1e-2, logging_steps=STEPS, save_strategy="no",
        disable_tqdm=True, mesh_shape=mesh_shape)


def _train(tmp_path, mesh_shape, params, model=None):
    record = LossRecorder()
    trainer = Trainer(model or _model(), _args(tmp_path, mesh_shape),
                      train_dataset=ArrayDataset(lm_rows(64, 16, seed=0)), callbacks=[record], params=params)
    trainer.run_metrics = trainer.train().metrics
    return trainer, record.losses


def test_stage2_data2_tensor2_trains_like_one_device(tmp_path):
    params = jax.device_get(_model().init(jax.random.key(0)))
    single, reference = _train(tmp_path / "single", {"data": 1}, params)
    trainer, losses = _train(tmp_path / "pp", PP_MESH, params)
    rel = np.abs(np.array(losses) - reference) / np.abs(reference)
    print(f"stage 2 x data 2 x tensor 2: losses {np.round(losses, 6).tolist()}, max relative delta {rel.max():.2e}")
    assert len(losses) == STEPS and losses[-1] < losses[0]
    np.testing.assert_allclose(losses, reference, rtol=LOSS_RTOL)
    assert trainer.steps.compile_log.counts["train"] == 1
    # MFU's model FLOPs leave out the bubble: 5 ticks of each stage run for 4 micro-batches, but the 8
    # devices are credited with exactly the one device's work (integer-valued counts, so float-exact)
    flops = [t.run_metrics["train_flops_per_step"] for t in (single, trainer)]
    assert flops[1] * 8 == pytest.approx(flops[0], rel=1e-12)

    # Each device holds half the layer stack (its stage's 2 layers), split again over tensor.
    q = trainer.train_state.params["model"]["layers"]["layer"]["self_attn"]["q_proj"]["kernel"]  # [4, 32, 4, 8]
    shard_shapes = {tuple(s.data.shape) for s in q.addressable_shards}
    assert shard_shapes == {(LAYERS // 2, 32, 2, 8)}
    stage_of = {s.device: s.index[0].start for s in q.addressable_shards}
    assert sorted(set(stage_of.values())) == [0, 2]  # layers 0-1 on one stage's devices, 2-3 on the other's

    # Stages hand activations on (collective-permute) and never gather each other's layers: the
    # only all-gathers are the loss's per-token statistics over the tensor-split vocabulary
    # ([rows, length - 1 = 15, tensor = 2]: the max and argmax of each vocabulary shard), no weight.
    loader = HostLoader(ArrayDataset(lm_rows(64, 16, seed=0)), global_batch_size=GLOBAL_MICRO * ACCUM,
                        accum_steps=ACCUM)
    batch = trainer.steps.place_train_batch(loader.host_batch(0, 0))
    hlo = trainer.steps.train_step.lower(trainer.train_state, batch).compile().as_text()  # a compile-cache hit
    assert "collective-permute" in hlo
    gathered = re.findall(r"= (\w+)\[([\d,]*)\]\S* all-gather\(", hlo)
    assert all(dims.split(",")[1:] == ["15", "2"] for _, dims in gathered), gathered


def test_lora_adapters_train_through_the_pipeline_like_one_device(tmp_path):
    """LoRA on the scanned stack: each layer's adapters travel with its kernel slice through the
    stages, sharded over `stage` like it; the losses are the single-device ones (LOSS_RTOL). The
    modules have different ranks and scales (PEFT's rank_pattern / alpha_pattern), which a stage,
    running its layers on their own, must still tell apart."""
    from jtrain.peft import LoraConfig, apply_lora

    lora = apply_lora(_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                           rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 24}))
    assert len({t.scaling for t in lora.targets}) == 3
    params = jax.device_get(lora.init_from_base(_model().init(jax.random.key(0)), jax.random.key(1)))
    _, reference = _train(tmp_path / "single", {"data": 1}, params, lora)
    trainer, losses = _train(tmp_path / "pp", PP_MESH, params, lora)
    print(f"LoRA, stage 2 x data 2 x tensor 2: losses {np.round(losses, 6).tolist()}")
    assert len(losses) == STEPS and losses[-1] < losses[0]
    np.testing.assert_allclose(losses, reference, rtol=LOSS_RTOL)
    a = trainer.train_state.params["lora"]["model"]["layers"]["layer"]["mlp"]["down_proj"]["lora_A"]  # [4, 64, 2]
    assert {s.index[0].start for s in a.addressable_shards} == {0, 2}  # layers 0-1 on one stage, 2-3 on the other
    assert set(trainer.train_state.params) == {"lora"}  # the base is frozen


def test_microbatches_keep_rows_on_their_devices_and_round_trip():
    x = np.arange(8 * 3).reshape(8, 3)
    micro = to_microbatches(x, 4)
    assert micro.shape == (4, 2, 3) and micro[1, :, 0].tolist() == [3, 15]  # rows 1 and 5: one per half
    np.testing.assert_array_equal(from_microbatches(micro), x)
    assert bubble_fraction(2, 4) == pytest.approx(1 / 5)


@pytest.mark.parametrize("microbatches,warned", [(4, True), (2, False)])
def test_micro_batches_smaller_than_the_data_axis_are_named(microbatches, warned, caplog):
    """4 rows on `stage 2 x data 2`: 4 micro-batches leave 1 row each, which cannot split over the 2
    data-parallel devices, so GSPMD gives both the whole micro-batch (an all-gather of the rows in the
    compiled step) and they compute the same rows. That is logged, with the number that avoids it;
    2 micro-batches of 2 rows split cleanly and gather nothing."""
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jtrain.compiled import with_activation_sharding
    from jtrain.pipeline_parallel import with_pipeline_stages
    from jtrain.sharding import BATCH_AXES, ShardingRules, make_mesh
    from test_ring_attention import _forward_float_gathers

    model = create_model("llama", {**TINY_LLAMA, "num_hidden_layers": LAYERS}, scan_layers=True,
                         pipeline_microbatches=microbatches)
    mesh = make_mesh({"stage": 2, "data": 2})
    run_model = with_activation_sharding(with_pipeline_stages(model, mesh), mesh, ShardingRules())
    params = model.init(jax.random.key(0))
    ids = jax.device_put(jnp.ones((4, 16), jnp.int32), NamedSharding(mesh, P(BATCH_AXES)))
    loss = jax.jit(lambda p, ids: jnp.sum(run_model.apply(p, {"input_ids": ids})["logits"]))
    with caplog.at_level("WARNING", logger="jtrain.pipeline_parallel"):
        hlo = loss.lower(params, ids).compile().as_text()
    logged = [r.getMessage() for r in caplog.records if "data-parallel devices" in r.getMessage()]
    assert bool(logged) == warned and bool(_forward_float_gathers(hlo)) == warned
    if warned:
        assert "pipeline_microbatches=4 leaves 1 row(s)" in logged[0]
        assert "set the model option `pipeline_microbatches` to 2" in logged[0]


def test_mixture_of_experts_trains_through_the_pipeline_like_one_device(tmp_path):
    """Mixtral's aux loss reads every layer's router logits: the schedule returns each stage's sown
    logits per tick, drops the bubble ticks and restores layer and row order, so the loss (with the
    aux loss in it) and the routing statistics are the single-device ones (LOSS_RTOL)."""
    config = {**TINY_LLAMA, "num_hidden_layers": LAYERS, "num_local_experts": 4, "num_experts_per_tok": 2,
              "output_router_logits": True, "router_aux_loss_coef": 0.1}

    def model():
        return create_model("mixtral", config, scan_layers=True)

    params = jax.device_get(model().init(jax.random.key(0)))
    single, reference = _train(tmp_path / "single", {"data": 1}, params, model())
    for mesh in (PP_MESH, {"stage": 2, "expert": 2, "tensor": 2}):
        trainer, losses = _train(tmp_path / "-".join(map(str, mesh.values())), mesh, params, model())
        np.testing.assert_allclose(losses, reference, rtol=LOSS_RTOL, err_msg=str(mesh))
        logs = [{k: v for k, v in e.items() if k.startswith("moe_")} for e in trainer.state.log_history if "loss" in e]
        want = [{k: v for k, v in e.items() if k.startswith("moe_")} for e in single.state.log_history if "loss" in e]
        assert logs and logs[0] and logs[0].keys() == want[0].keys()
        for got, ref in zip(logs, want):
            np.testing.assert_allclose([got[k] for k in ref], list(ref.values()), rtol=LOSS_RTOL, err_msg=str(mesh))
    assert losses[-1] < losses[0]


def test_layer_count_not_splitting_into_stages_is_refused(tmp_path):
    trainer = Trainer(_model(layers=3), _args(tmp_path, PP_MESH), train_dataset=ArrayDataset(lm_rows(16, 8)))
    with pytest.raises(ConfigError, match=r"3 layers of `model/layers` do not split evenly into 2 pipeline stages"):
        trainer.train()
    assert trainer.steps is None  # refused from abstract shapes, before anything was compiled


def test_pipeline_needs_scanned_layers(tmp_path):
    model = create_model("llama", TINY_LLAMA)
    trainer = Trainer(model, _args(tmp_path, PP_MESH), train_dataset=ArrayDataset(lm_rows(16, 8)))
    with pytest.raises(ConfigError, match=r"needs stacked layers: set `model.scan_layers: true`"):
        trainer.train()
