"""Weight quantisation: formats vs a float64 numpy reference, storage, STE, QAT, PTQ, sharding, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.stats import norm
from tiny import TINY_LLAMA, lm_rows, tiny_llama

from jtrain.checkpoint import CheckpointWriter, restore_state
from jtrain.compiled import build_compiled_steps
from jtrain.errors import CheckpointError, ConfigError
from jtrain.losses import causal_lm_loss
from jtrain.memory import tree_nbytes
from jtrain.models import create_model
from jtrain.quant import (
    NF4_LEVELS,
    QATModel,
    QuantFormat,
    QuantizedModel,
    QuantizedTensor,
    compare_eval_loss,
    dequantize,
    evaluate_loss,
    export_quantized,
    fake_quantize,
    load_quantized,
    post_training_quantize,
    quantize,
    save_quantized,
    storage_bits_per_param,
)
from jtrain.quant.formats import DOUBLE_QUANT_BLOCK
from jtrain.sharding import logical_to_mesh_spec, make_mesh
from jtrain.state import TrainState
from jtrain.step import make_train_step


# ---------------------------------------------------------------- numpy float64 reference
def ref_levels() -> np.ndarray:
    """NF4 as QLoRA builds it: N(0,1) quantiles of 8 positive and 7 negative bins, a zero, max-normalised."""
    offset = 0.9677083
    pos = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    neg = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    levels = np.sort(np.concatenate([pos, [0.0], neg]))
    return levels / levels.max()


def ref_quantize(w: np.ndarray, name: str, block: int | None, reduce_axes: tuple[int, ...] | None = None,
                 double_quant: bool = False) -> dict:
    """One format written independently in float64: dequantised weight, normalised values, grid,
    the stored scale (expanded to the weight's shape) and the scale as double quantisation stores it."""
    w = np.asarray(w, np.float64)
    if block is None:
        axes = tuple(range(w.ndim - 1)) if reduce_axes is None else reduce_axes
        absmax = np.max(np.abs(w), axis=axes, keepdims=True)
        expand = lambda s: np.broadcast_to(s, w.shape)
    else:
        absmax = np.abs(w.reshape(*w.shape[:-1], -1, block)).max(-1)
        expand = lambda s: np.repeat(s, block, axis=-1)
    stored = absmax
    if double_quant:  # int8 codes of absmax - mean, one scale per 256 flattened entries
        offset = absmax.mean()
        flat = (absmax - offset).reshape(-1)
        n = -(-flat.size // DOUBLE_QUANT_BLOCK)
        blocks = np.pad(flat, (0, n * DOUBLE_QUANT_BLOCK - flat.size)).reshape(n, -1)
        s2 = np.abs(blocks).max(1) / 127
        codes2 = np.clip(np.round(blocks / np.where(s2 > 0, s2, 1)[:, None]), -127, 127)
        stored = ((codes2 * s2[:, None]).reshape(-1)[: flat.size] + offset).reshape(absmax.shape)
    if name == "nf4":
        grid, div = ref_levels(), 1.0
    else:
        grid = np.arange(-{"int8": 127, "int4": 7}[name], {"int8": 127, "int4": 7}[name] + 1, dtype=np.float64)
        div = grid.max()
    scale, stored_scale = expand(absmax / div), expand(stored / div)
    x = w / np.where(scale > 0, scale, 1.0)  # codes come from the exact scale ...
    code = np.argmin(np.abs(x[..., None] - grid), axis=-1)
    return {"deq": grid[code] * stored_scale,  # ... values from the stored one
            "x": x, "grid": grid, "scale": scale, "stored_scale": stored_scale}


_jit_quantize = jax.jit(lambda w, fmt, axes: quantize(w, fmt, reduce_axes=axes),
                        static_argnums=(1, 2))  # eager quantize would compile op by op

CASES = {
    "nf4": (QuantFormat("nf4", 64), None),
    "nf4_double_quant": (QuantFormat("nf4", 64, double_quant=True), None),
    "int8_channel": (QuantFormat("int8", None), None),
    "int8_block32": (QuantFormat("int8", 32), None),
    "int4_channel": (QuantFormat("int4", None), None),
    "int4_block32": (QuantFormat("int4", 32), None),
    "int8_channel_3d": (QuantFormat("int8", None), (0, 1)),  # an o_proj-like [heads, head_dim, embed]
}


def _weight(shape, seed=0) -> np.ndarray:
    w = np.random.default_rng(seed).normal(0.0, 0.02, size=shape).astype(np.float32)
    w.reshape(-1)[::97] *= 8.0  # outliers, as trained weights have
    return w


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_matches_float64_reference(case):
    fmt, reduce_axes = CASES[case]
    shape = (4, 16, 128) if reduce_axes else (64, 256)
    w = _weight(shape)
    q = _jit_quantize(jnp.asarray(w), fmt, reduce_axes)
    got = np.asarray(jax.jit(dequantize)(q), np.float64)
    ref = ref_quantize(w, fmt.name, fmt.block_size, reduce_axes, fmt.double_quant)
    want, x, grid = ref["deq"], ref["x"], ref["grid"]
    # A float32 normalisation may round a value that lies within 1e-5 of a midpoint between two
    # grid points to the other side; such near-ties are the only allowed code differences.
    mids = (grid[1:] + grid[:-1]) / 2
    near_tie = np.min(np.abs(x[..., None] - mids), axis=-1) < 1e-5
    same = ~near_tie
    # float32 scale arithmetic against float64: 1e-6 relative to the weight's largest value
    np.testing.assert_allclose(got[same], want[same], rtol=0, atol=1e-6 * np.abs(w).max())
    assert near_tie.mean() < 1e-3
    # error bound of each format: half the widest grid step times the block's / channel's scale,
    # plus (double quantisation) the error of the stored scale, since |grid| <= 1 in scale units
    half_gap = 0.5 * np.max(np.diff(grid))
    bound = half_gap * ref["scale"] + np.abs(ref["stored_scale"] - ref["scale"]) * grid.max()
    assert np.all(np.abs(got - w) <= bound * (1 + 1e-5) + 1e-8)  # float32 rounding of the product
    rel = np.linalg.norm(got - w) / np.linalg.norm(w)
    print(f"{case}: {storage_bits_per_param(q):.3f} bits/param, relative error {rel:.4f}")


def test_nf4_levels_are_the_qlora_normal_quantiles():
    np.testing.assert_allclose(NF4_LEVELS, ref_levels(), atol=1e-6)  # table stored as float32
    assert NF4_LEVELS[7] == 0.0 and NF4_LEVELS[0] == -1.0 and NF4_LEVELS[-1] == 1.0


def test_codes_are_packed_two_per_byte_keeping_leading_dims():
    w = jnp.asarray(_weight((32, 4, 64)))
    q4 = quantize(w, QuantFormat("nf4", 16))
    assert q4.codes.shape == (32, 4, 32) and q4.codes.dtype == jnp.uint8
    assert q4.scales.shape == (32, 4, 4)
    q8 = quantize(w, "int8", reduce_axes=(0,))  # a q_proj: one scale per (head, head_dim) output
    assert q8.codes.shape == (32, 4, 64) and q8.codes.dtype == jnp.int8 and q8.scales.shape == (1, 4, 64)
    assert q4.shape == w.shape and q4.float_dtype == w.dtype  # remembers the weight it stands for


def test_nf4_storage_bits_per_param():
    w = jnp.asarray(_weight((256, 1024)))
    plain = storage_bits_per_param(_jit_quantize(w, QuantFormat("nf4", 64), None))
    double = storage_bits_per_param(_jit_quantize(w, QuantFormat("nf4", 64, double_quant=True), None))
    print(f"NF4 storage: {plain:.4f} bits/param; with double quantisation {double:.4f} bits/param")
    assert plain == 4.5  # 4-bit codes + one float32 absmax per 64 values, exactly
    assert abs(double - (4 + 8 / 64 + 32 / (64 * 256))) < 1e-3  # 4.127 + the per-tensor mean


# ---------------------------------------------------------------- straight-through estimator
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_fake_quant_forward_is_quantised_and_gradient_is_identity(fmt):
    rng = np.random.default_rng(1)
    w, x, y = _weight((16, 8)), rng.normal(size=(5, 16)), rng.normal(size=(5, 8))

    def loss(w_):
        return 0.5 * jnp.sum((jnp.asarray(x, jnp.float32) @ fake_quantize(w_, fmt, (0,)) - y) ** 2)

    grad = np.asarray(jax.grad(loss)(jnp.asarray(w)), np.float64)
    wq = ref_quantize(w, fmt, None, (0,))["deq"]
    want = x.T @ (x @ wq - y)  # d/dW of the loss at the quantised weight, passed straight through
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-5)  # float32 matmuls vs float64
    fq = np.asarray(fake_quantize(jnp.asarray(w), fmt, (0,)))
    np.testing.assert_array_equal(fq, np.asarray(dequantize(quantize(jnp.asarray(w), fmt, reduce_axes=(0,)))))


# ---------------------------------------------------------------- training helpers
def _batches(n: int, rows: int = 16, length: int = 16, seed: int = 0) -> list[dict]:
    data = lm_rows(n * rows, length, seed=seed)
    return [{k: jnp.asarray(v[i * rows:(i + 1) * rows]) for k, v in data.items()} for i in range(n)]


def _train(model, params, steps: int, lr: float = 1e-2, seed: int = 0):
    tx = optax.adam(lr)
    trainable = getattr(model, "is_trainable", None)
    from jtrain.param_split import split_params
    train, frozen = split_params(params, trainable) if trainable else (params, None)
    state = TrainState.create(train, tx, jax.random.key(seed), frozen=frozen or None)
    step = jax.jit(make_train_step(model.apply, causal_lm_loss, tx, lr_schedule=lr), donate_argnums=0)
    losses = []
    for i, batch in enumerate(_batches(4, seed=seed) * (steps // 4 + 1)):
        if i == steps:
            break
        state, metrics = step(state, {k: v[None] for k, v in batch.items()})
        losses.append(float(metrics["loss"]))
    return state.full_params(), losses


@pytest.fixture(scope="module")
def trained():
    model = tiny_llama()
    # partly trained (eval loss ~1.9, not ~0): the weights still decide the loss, so rounding them shows
    params, losses = _train(model, model.init(jax.random.key(0)), steps=16, lr=5e-3)
    assert losses[-1] < 0.6 * losses[0]
    return model, params


# ---------------------------------------------------------------- QAT
def test_qat_trains_and_exports_quantize_of_the_float_weights(tmp_path):
    # int4 is the harder format for QAT (int8's STE and rounding are covered above)
    fmt = "int4"
    model = tiny_llama()
    qat = QATModel(model, fmt, targets=["q_proj", "v_proj", "up_proj", "down_proj"])
    params, losses = _train(qat, model.init(jax.random.key(0)), steps=24)
    assert losses[-1] < 0.7 * losses[0], losses
    _, qparams = export_quantized(qat, params, str(tmp_path))
    for path, plan in qat.plans.items():
        node = qparams
        w = params
        for k in path:
            node, w = node[k], w[k]
        ref = _jit_quantize(w, QuantFormat(fmt, None), plan.reduce_axes)
        np.testing.assert_array_equal(np.asarray(node.codes), np.asarray(ref.codes))
        np.testing.assert_array_equal(np.asarray(node.scales), np.asarray(ref.scales))
    loaded_model, loaded = load_quantized(str(tmp_path), model)
    batch = _batches(1, seed=3)[0]
    # the deployed weights compute what the QAT forward computed (same rounding): equal logits up to
    # float32 reassociation between two separately compiled programs (logits are O(1): 1e-6)
    want = jax.jit(qat.apply)(params, batch)["logits"]
    got = jax.jit(loaded_model.apply)(loaded, batch)["logits"]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-6)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(qparams)):  # the file holds the export
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------- PTQ
def test_ptq_int8_close_to_float_and_int4_reported(trained, tmp_path):
    model, params = trained
    evals = _batches(2, seed=7)
    results = {}
    float_loss = evaluate_loss(model, params, evals, causal_lm_loss)
    for label, fmt in (("int8/channel", "int8"), ("int4/channel", "int4"), ("int4/block8", QuantFormat("int4", 8))):
        qmodel, qparams, report = post_training_quantize(model, params, fmt)
        cmp = compare_eval_loss(model, params, qmodel, qparams, evals, causal_lm_loss, float_loss=float_loss)
        results[label] = cmp
        print(f"PTQ {label}: eval loss float {cmp.eval_loss_float:.4f} quantised {cmp.eval_loss_quantized:.4f} "
              f"(delta {cmp.delta:+.4f}); {report.summary()}; bytes {tree_nbytes(qparams)} vs "
              f"{tree_nbytes(params)} float")
        assert np.isfinite(cmp.eval_loss_quantized)
    # int8 rounds each weight by at most 1/254 of its channel's max (~0.5% relative error): the
    # eval loss moves by well under 1% of its value; int4 (1/14 of the max) is reported, and a
    # coarser grid costs more than a finer one
    assert abs(results["int8/channel"].delta) < 0.01 * float_loss, results["int8/channel"]
    assert abs(results["int4/channel"].delta) > abs(results["int8/channel"].delta)
    # saved and loaded back: the same quantised model, bit for bit, so it evaluates to the same loss
    qmodel, qparams, _ = post_training_quantize(model, params, "int4")
    save_quantized(str(tmp_path), qmodel, qparams)
    loaded_model, loaded = load_quantized(str(tmp_path), model)
    assert loaded_model.plans.keys() == qmodel.plans.keys() and loaded_model.fmt == qmodel.fmt
    assert jax.tree.structure(loaded) == jax.tree.structure(qparams)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(qparams)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------- sharding
def _write_empty_json(path: str) -> None:
    with open(path, "w") as f:
        f.write("{}")


@pytest.mark.devices(8)
def test_quantized_nodes_shard_like_their_kernels_and_train_like_one_device(tmp_path):
    one_layer = create_model("llama", {**TINY_LLAMA, "num_hidden_layers": 1})  # compile time
    qmodel = QuantizedModel(one_layer, QuantFormat("nf4", 8, double_quant=True))
    batch = {k: v[None] for k, v in lm_rows(8, 16, seed=2).items()}
    assert jax.tree.structure(qmodel.abstract_params()) == jax.tree.structure(
        jax.eval_shape(qmodel.quantize_params, one_layer.abstract_params()))
    results, runs = {}, {}
    for name, shape in (("single", {"data": 1}), ("mesh", {"data": 2, "fsdp": 2, "tensor": 2})):
        mesh = make_mesh(shape)
        steps = build_compiled_steps(qmodel, mesh, optax.adam(1e-2), 1e-2, causal_lm_loss, seed=0)
        state = steps.init_state()
        frozen_before = jax.tree.map(np.asarray, state.frozen)
        for _ in range(2):  # the second step runs on updated trainable params
            state, metrics = steps.train_step(state, steps.place_train_batch(batch))
        results[name], runs[name] = float(metrics["loss"]), (steps, state)
        for a, b in zip(jax.tree.leaves(state.frozen), jax.tree.leaves(frozen_before)):
            np.testing.assert_array_equal(np.asarray(a), b)  # the quantised base never changes
        if name == "mesh":
            node = state.frozen["model"]["layers_0"]["mlp"]["gate_proj"]["kernel"]
            axes = qmodel.inner.logical_axes()["model"]["layers_0"]["mlp"]["gate_proj"]["kernel"]
            kernel_spec = logical_to_mesh_spec(axes)
            assert node.codes.sharding.spec == kernel_spec == jax.sharding.PartitionSpec("fsdp", "tensor")
            assert node.scales.sharding.spec == kernel_spec
            o_node = state.frozen["model"]["layers_0"]["self_attn"]["o_proj"]["kernel"]
            assert o_node.codes.sharding.spec == jax.sharding.PartitionSpec("tensor", None, "fsdp")
            assert len(node.codes.addressable_shards) == 8 and node.codes.addressable_shards[0].data.shape == (16, 16)
            assert "lm_head" in state.params and "model" in state.params  # norms, embeddings, head train
            assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state.opt_state))
            assert not any(x.dtype == jnp.uint8 for x in jax.tree.leaves(state.opt_state))
    # the mesh run reduces in a different order than one device: float32 rounding only
    np.testing.assert_allclose(results["mesh"], results["single"], rtol=1e-5)
    # a checkpoint of the sharded state restores the quantised nodes onto another mesh
    mesh_state = runs["mesh"][1]
    writer = CheckpointWriter(str(tmp_path))
    writer.save(mesh_state, 2, {}, _write_empty_json)
    writer.wait()
    restored = restore_state(str(tmp_path / "checkpoint-2"), runs["single"][1])  # a target on 1 device
    assert isinstance(restored.frozen["model"]["layers_0"]["mlp"]["up_proj"]["kernel"], QuantizedTensor)
    for a, b in zip(jax.tree.leaves((restored.frozen, restored.params)),
                    jax.tree.leaves((mesh_state.frozen, mesh_state.params))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------- bad input
def test_bad_input_names_the_problem(tmp_path):
    model = tiny_llama()
    with pytest.raises(ConfigError, match="unknown quantisation format 'fp3'"):
        QuantizedModel(model, "fp3")
    with pytest.raises(ConfigError, match=r"q_proj/kernel` of shape \(32, 4, 8\): block_size 64 does not divide"):
        QuantizedModel(model, "nf4", targets=["q_proj"])
    with pytest.raises(ConfigError, match=r"\['qproj'\] match no module"):
        QuantizedModel(model, QuantFormat("nf4", 8), targets=["q_proj", "qproj"])
    with pytest.raises(ConfigError, match="regex 'attn' matches no module"):
        QuantizedModel(model, QuantFormat("nf4", 8), targets="attn")
    with pytest.raises(ConfigError, match="needs a `block_size`"):
        QuantFormat("nf4", None)
    with pytest.raises(ConfigError, match="supports formats 'int8' and 'int4'"):
        QATModel(model, "nf4")
    with pytest.raises(ConfigError, match=r"weight` of shape \(8, 7\): 4-bit codes are packed"):
        quantize(jnp.ones((8, 7)), "int4")
    qmodel = QuantizedModel(model, "int8", targets=r"model\.layers\.\d+\.mlp\..*")
    assert len(qmodel.plans) == 6
    with pytest.raises(ConfigError, match="up_proj/kernel` is already quantised"):
        QATModel(qmodel, "int8", targets=["up_proj"])
    save_quantized(str(tmp_path), qmodel, jax.jit(qmodel.quantize_params)(model.init(jax.random.key(0))))
    bigger = create_model("llama", {**TINY_LLAMA, "intermediate_size": 128})
    with pytest.raises(CheckpointError, match=r"mlp/\w+_proj/kernel.codes' is int8\[\d+, \d+\], the model expects"):
        load_quantized(str(tmp_path), bigger)
    with pytest.raises(CheckpointError, match="not a quantised export"):
        load_quantized(str(tmp_path / "nowhere"), model)


def test_trainer_save_model_writes_a_loadable_hf_model_from_a_quantised_base(tmp_path):
    """save_model on a quantised base writes the dequantised weights in HF format: reloading them
    gives the logits the quantised model computes (exactly: both apply the same float kernels)."""
    from jtrain import Trainer, TrainingArguments
    from jtrain.models import from_pretrained

    qmodel = QuantizedModel(tiny_llama(), QuantFormat("int8", None), targets=["q_proj", "up_proj"])
    params = qmodel.init(jax.random.key(0))
    trainer = Trainer(qmodel, TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=1, report_to=[],
                                                save_strategy="no", disable_tqdm=True),
                      train_dataset=lm_rows(8, 16), params=params)
    trainer.train()
    trainer.save_model(str(tmp_path / "hf"))
    loaded, loaded_params = from_pretrained(str(tmp_path / "hf"))
    ids = {"input_ids": lm_rows(2, 16)["input_ids"]}
    expected = qmodel.apply(trainer.params, ids)["logits"]
    np.testing.assert_array_equal(np.asarray(loaded.apply(loaded_params, ids)["logits"]), np.asarray(expected))
