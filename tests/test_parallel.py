"""One mesh for data, FSDP and tensor parallelism: every mesh trains like one device.

Each mesh runs the same 5 updates of the tiny Llama through the `Trainer` (global micro-batch
8 rows, 2 micro-batches per update, same start params, same data order) and must report the
single-device losses. The runs are cached per module: one compilation per mesh.
"""

from __future__ import annotations

import collections

import jax
import numpy as np
import pytest

from jtrain import ConfigError, Trainer, TrainingArguments
from jtrain.compiled import build_compiled_steps
from jtrain.data.loader import ArrayDataset, HostLoader
from jtrain.models import create_model
from jtrain.sharding import MESH_AXES, make_mesh, resolve_mesh_shape, sharding_rules
from tiny import TINY_LLAMA, LossRecorder, lm_rows, tiny_llama

STEPS, ACCUM, GLOBAL_MICRO = 5, 2, 8
MESHES = {
    "data8": {"data": 8},
    "fsdp8": {"fsdp": 8},
    "fsdp4_tensor2": {"fsdp": 4, "tensor": 2},
    "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2},
}
# Every mesh computes the same float32 math in a different reduction order: matmuls split over
# `tensor` or `embed` sum partial products across devices, and the gradient of a row-split batch is
# summed by an all-reduce instead of inside one dot. Each such sum differs by a few ulp (float32
# eps 1.2e-7); five Adam updates at lr 1e-2 carry those differences into later losses. rtol 2e-6
# (~16 ulp) bounds that; a real sharding bug (a missing all-reduce, a half-applied update) moves
# the loss by 1e-2 or more.
LOSS_RTOL = 2e-6



def _args(tmp_path, mesh_shape, fsdp="", **overrides):
    dp = mesh_shape.get("data", 1) * mesh_shape.get("fsdp", 1)
    return TrainingArguments(**{
        **dict(output_dir=str(tmp_path / "out"), max_steps=STEPS, per_device_train_batch_size=GLOBAL_MICRO // dp,
               gradient_accumulation_steps=ACCUM, learning_rate=1e-2, logging_steps=STEPS, save_strategy="no",
               disable_tqdm=True, mesh_shape=mesh_shape, fsdp=fsdp), **overrides})


@pytest.fixture(scope="module")
def start_params():
    return jax.device_get(jax.jit(tiny_llama().init)(jax.random.key(0)))


@pytest.fixture(scope="module")
def dataset():
    return ArrayDataset(lm_rows(64, 16, seed=0))


@pytest.fixture(scope="module")
def run_mesh(tmp_path_factory, start_params, dataset):
    """Train once per mesh name (cached); returns (trainer, per-update losses)."""
    runs: dict[str, tuple[Trainer, list[float]]] = {}

    def run(name: str):
        if name not in runs:
            record = LossRecorder()
            mesh_shape = {"data": 1} if name == "single" else MESHES[name]
            trainer = Trainer(tiny_llama(), _args(tmp_path_factory.mktemp(name), mesh_shape), train_dataset=dataset,
                              callbacks=[record], params=start_params)
            trainer.train()
            assert trainer.steps.compile_log.counts["train"] == 1
            runs[name] = (trainer, record.losses)
        return runs[name]

    return run


@pytest.mark.parametrize("name", list(MESHES))
def test_mesh_trains_like_one_device(run_mesh, name):
    _, reference = run_mesh("single")
    trainer, losses = run_mesh(name)
    assert dict(trainer.mesh.shape) == {**dict.fromkeys(MESH_AXES, 1), **MESHES[name]}
    rel = np.abs(np.array(losses) - reference) / np.abs(reference)
    print(f"{name}: losses {np.round(losses, 6).tolist()}, max relative delta vs one device {rel.max():.2e}")
    assert len(losses) == STEPS and losses[-1] < losses[0]
    np.testing.assert_allclose(losses, reference, rtol=LOSS_RTOL)


def _bytes_per_device(tree) -> tuple[dict, int, int]:
    """(bytes held by each device, logical bytes, bytes of fully replicated leaves)."""
    held: dict = collections.Counter()
    total = replicated = 0
    for leaf in jax.tree.leaves(tree):
        total += leaf.nbytes
        replicated += leaf.nbytes if leaf.sharding.is_fully_replicated else 0
        for shard in leaf.addressable_shards:
            held[shard.device] += shard.data.nbytes
    return held, total, replicated


def test_fsdp8_holds_an_eighth_of_params_and_optimizer_state(run_mesh):
    trainer, _ = run_mesh("fsdp8")
    state = trainer.train_state
    for part, tree in (("params", state.params), ("opt_state", state.opt_state)):
        held, total, replicated = _bytes_per_device(tree)
        bound = (total - replicated) / 8 + replicated
        print(f"fsdp=8 {part}: {total} bytes in all, {replicated} replicated (norm scales, step counts); "
              f"per device max {max(held.values())} min {min(held.values())}, bound {bound:.0f}")
        assert len(held) == 8 and max(held.values()) <= bound
        assert replicated < 0.02 * total  # the remainder really is small: 1-D norm scales and scalars


def test_indivisible_heads_over_tensor_are_refused(tmp_path):
    model = create_model("llama", {**TINY_LLAMA, "hidden_size": 48, "num_attention_heads": 6,
                                   "num_key_value_heads": 6})
    trainer = Trainer(model, _args(tmp_path, {"data": 2, "tensor": 4}), train_dataset=ArrayDataset(lm_rows(16, 8)))
    with pytest.raises(ConfigError) as err:
        trainer.train()
    message = str(err.value)
    assert "self_attn/q_proj/kernel" in message and "`heads`=6" in message and "'tensor' of size 4" in message
    assert trainer.steps is None  # refused from abstract shapes, before anything was compiled


def test_indivisible_batch_rows_are_refused_before_compiling():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 1})
    steps = build_compiled_steps(tiny_llama(), mesh, _sgd(), 1e-2, _no_loss, seed=0)
    rows = {"input_ids": np.zeros((1, 6, 8), np.int32)}
    message = r"6 rows does not divide over mesh axes \('data', 'fsdp', 'expert'\) of size 4"
    with pytest.raises(ConfigError, match=message):
        steps.place_train_batch(rows)
    assert steps.compile_log.counts == {}


def _sgd():
    import optax

    return optax.sgd(1e-2)


def _no_loss(outputs, batch):  # never traced: the batch is refused first
    raise AssertionError("the step must not run")


def test_hybrid_shard_puts_hosts_on_data_and_a_host_on_fsdp():
    ones = dict.fromkeys(MESH_AXES, 1)  # every axis is in the shape; unused ones have size 1
    assert resolve_mesh_shape({}, "hybrid_shard", 8, local_devices=8) == {**ones, "data": 1, "fsdp": 8}
    assert resolve_mesh_shape({}, "hybrid_shard", 16, local_devices=4) == {**ones, "data": 4, "fsdp": 4}
    assert resolve_mesh_shape({}, "full_shard", 8) == {**ones, "data": 1, "fsdp": 8}
    assert resolve_mesh_shape({}, "", 8) == {**ones, "data": 8}
    with pytest.raises(ConfigError, match="mesh axis 'data' cannot be filled"):
        resolve_mesh_shape({"data": -1, "tensor": 3}, "", 8)


def test_shard_grad_op_replicates_params_and_shards_optimizer_state(tmp_path, start_params, dataset, run_mesh):
    """ZeRO-2: same losses as one device; params whole on every device, Adam moments split 8 ways."""
    record = LossRecorder()
    args = _args(tmp_path, {"fsdp": 8}, fsdp="shard_grad_op")
    trainer = Trainer(tiny_llama(), args, train_dataset=dataset, callbacks=[record])
    # The preset goes in through `build_compiled_steps(rules=...)`; built here the way Trainer._setup does.
    trainer.create_optimizer_and_scheduler(STEPS)
    trainer.steps = build_compiled_steps(trainer.model, trainer.mesh, trainer.optimizer, trainer.lr_scheduler,
                                         trainer.compute_loss, seed=args.seed, rules=sharding_rules(args.fsdp))
    trainer.train_state = trainer.steps.init_state(start_params)
    trainer.train()
    _, reference = run_mesh("single")
    np.testing.assert_allclose(record.losses, reference, rtol=LOSS_RTOL)  # same reason as the meshes above
    params_held, params_total, _ = _bytes_per_device(trainer.train_state.params)
    opt_held, opt_total, opt_replicated = _bytes_per_device(trainer.train_state.opt_state)
    print(f"shard_grad_op: params {min(params_held.values())} of {params_total} bytes per device; "
          f"optimizer state max {max(opt_held.values())} of {opt_total} bytes per device")
    assert min(params_held.values()) == params_total
    assert max(opt_held.values()) <= (opt_total - opt_replicated) / 8 + opt_replicated


def test_activation_constraints_keep_activations_batch_split(run_mesh, dataset):
    """With the constraints, the step never flips activations between batch- and embed-split layouts.

    Measured on this model (collectives in the compiled step, fsdp=4 x tensor=2): without the
    constraints GSPMD emits 21 all-to-alls and ~3x the collective bytes; with them, none.
    """
    import time

    trainer, _ = run_mesh("fsdp4_tensor2")
    loader = HostLoader(dataset, global_batch_size=GLOBAL_MICRO * ACCUM, accum_steps=ACCUM)
    batch = trainer.steps.place_train_batch(loader.host_batch(0, 0))
    started = time.perf_counter()
    hlo = trainer.steps.train_step.lower(trainer.train_state, batch).compile().as_text()
    print(f"lower+compile again took {time.perf_counter() - started:.1f}s")
    assert "all-to-all" not in hlo and "all-gather" in hlo


def test_processes_split_the_batch_axes_never_tensor():
    from jtrain.sharding import _process_grid

    def grid(**split):  # processes per mesh axis, in MESH_AXES order
        return tuple(split.get(a, 1) for a in MESH_AXES)

    assert _process_grid({"data": 2, "fsdp": 4, "tensor": 1}, 2) == grid(data=2)  # hybrid: hosts on data
    assert _process_grid({"data": 1, "fsdp": 8, "tensor": 1}, 2) == grid(fsdp=2)  # full_shard across hosts
    assert _process_grid({"data": 2, "fsdp": 2, "tensor": 2}, 4) == grid(data=2, fsdp=2)
    with pytest.raises(ConfigError, match="'tensor' stay within a process"):
        _process_grid({"data": 1, "fsdp": 1, "tensor": 8}, 2)


# Optimizers whose state holds more, or less, than one array where its param has one: Adafactor's
# factored row and column, 8-bit moments (codes and block scales), GaLore's projectors beside masked-out
# params (on the attention's head-shaped kernels too) and its inner optimizer's state per low-rank matrix (here
# Adafactor's, factored; galore_adamw's Adam moments have the same place in the tree). Each trained through the
# Trainer used to fail building its state's shardings.
SPECIAL_STATES = {"adamw_8bit": dict(optim_args="min_8bit_size=0"), "adafactor": {},
                  "galore_adafactor": dict(optim_target_modules="all-linear", optim_args="rank=4")}


@pytest.mark.parametrize("optim", list(SPECIAL_STATES))
def test_optimizers_with_structured_state_train_on_fsdp8_like_one_device(tmp_path, start_params, dataset, optim):
    losses = []
    for mesh_shape in ({"data": 1}, {"fsdp": 8}):
        args = _args(tmp_path / str(len(losses)), mesh_shape, optim=optim, logging_steps=1, **SPECIAL_STATES[optim])
        trainer = Trainer(tiny_llama(), args, train_dataset=dataset, params=start_params)
        trainer.train()
        losses.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert len(losses[0]) == STEPS
    np.testing.assert_allclose(losses[1], losses[0], rtol=LOSS_RTOL)


def test_every_optimizers_state_is_sharded_beside_its_params():
    """A state array of its parameter's shape takes the parameter's sharding; any other array (a factored
    statistic, a projector, a count) is replicated, 8-bit blocks aside; a MaskedNode stays empty."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jtrain.optim import OPTIMIZER_NAMES, make_optimizer
    from jtrain.optim.factory import LOW_RANK_OPTIMIZERS
    from jtrain.optim.quantize import QuantizedArray
    from jtrain.sharding import opt_state_shardings

    mesh = make_mesh({"fsdp": 8})
    params = jax.eval_shape(tiny_llama().init, jax.random.key(0))
    spec = lambda p: P("fsdp") if p.ndim and p.shape[0] % 8 == 0 else P()  # noqa: E731
    params_sharding = jax.tree.map(lambda p: NamedSharding(mesh, spec(p)), params)
    shapes = {tuple(p.shape) for p in jax.tree.leaves(params)}
    for name in OPTIMIZER_NAMES:
        kw = {"optim_target_modules": ["mlp"], "optim_args": "rank=4"} if name in LOW_RANK_OPTIMIZERS \
            else {"optim_args": "min_8bit_size=0"} if "8bit" in name else {}
        tx = make_optimizer(name, 1e-3, **kw)
        state = jax.eval_shape(tx.init, params)
        placed = opt_state_shardings(state, params_sharding, params, mesh)
        assert jax.tree.structure(placed) == jax.tree.structure(state), name
        blocks = lambda x: isinstance(x, QuantizedArray)  # noqa: E731  (their split: the test below)
        for leaf, sharding in zip(jax.tree.leaves(state, is_leaf=blocks), jax.tree.leaves(placed, is_leaf=blocks)):
            if not blocks(leaf) and sharding.spec != P():
                assert tuple(leaf.shape) in shapes and sharding.spec == spec(leaf), (name, leaf.shape, sharding)
        sharded = sum(s.spec != P() for s in jax.tree.leaves(placed))
        assert sharded > 0 or name == "sgd", name  # a full-size (or 8-bit) moment is split


def test_8bit_moments_are_split_over_the_axes_that_split_their_params():
    """FSDP with an 8-bit optimizer: each moment's blocks go over the param's mesh axes, so a device holds an
    eighth of the 8-bit state on fsdp=8 (replicated, it held more optimizer state than float32 AdamW's
    sharded moments); blocks that do not divide stay replicated."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jtrain.optim import make_optimizer
    from jtrain.optim.quantize import QuantizedArray
    from jtrain.sharding import opt_state_shardings

    mesh = make_mesh({"fsdp": 8})
    params = {"big": jax.ShapeDtypeStruct((64, 256), np.float32), "odd": jax.ShapeDtypeStruct((8, 96), np.float32)}
    shardings = {k: NamedSharding(mesh, P("fsdp", None)) for k in params}
    tx = make_optimizer("adamw_8bit", 1e-3, optim_args="min_8bit_size=0")
    placed = opt_state_shardings(jax.eval_shape(tx.init, params), shardings, params, mesh)
    moments = [node for node in jax.tree.leaves(placed, is_leaf=lambda x: isinstance(x, QuantizedArray))
               if isinstance(node, QuantizedArray)]
    big = [m for m in moments if m.absmax.spec == P(("fsdp",))]
    assert len(big) == 2 and all(m.dynamic_codes.spec == P(("fsdp",), None) for m in big)  # 64 blocks over 8
    assert sum(m.absmax.spec == P() for m in moments) == 2  # "odd": 3 blocks of 256 do not divide over 8
