"""LoRA as a params-tree transform: math, init, what trains, sharding, merge, memory, bad input.

References: numpy float64 for the adapted layer, the base model for zero-B and merged forwards,
a single-device run for the sharded one. Tolerances are stated beside each comparison.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml
from jax.sharding import PartitionSpec as P

from jtrain.compiled import build_compiled_steps
from jtrain.errors import ConfigError
from jtrain.losses import causal_lm_loss
from jtrain.models import create_model
from jtrain.param_split import leaf_paths
from jtrain.peft import LoraConfig, apply_lora
from jtrain.sharding import make_mesh
from tiny import TINY_LLAMA, lm_rows, tiny_llama

ALL_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
# Same float32 math in a different association order (x W + s (x A) B vs x (W + s A B)): a few ulps
# per op, amplified by two tiny layers to ~1e-6; a wrong scale, layout or sign moves logits by >1e-2.
SAME_MATH_ATOL = 1e-5


@pytest.fixture(scope="module")
def base():
    model = tiny_llama()
    return model, model.init(jax.random.key(0))


def _ids(seed: int = 0) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(seed).integers(1, 64, (2, 8)), jnp.int32)


def _logits(m, params, batch, **kw) -> np.ndarray:
    """Jitted forward (op-by-op dispatch is far slower than one compile on 2 cores)."""
    return np.asarray(jax.jit(lambda p, b: m.apply(p, b, **kw)["logits"])(params, batch))


def _lora(model, **kw):
    kw.setdefault("target_modules", ALL_ATTN + ["down_proj"])
    return apply_lora(model, LoraConfig(**{"r": 4, "lora_alpha": 8, **kw}))


def test_fresh_adapters_leave_the_model_unchanged_and_follow_peft_init(base):
    model, bp = base
    lora = _lora(model)
    params = lora.init_from_base(bp, jax.random.key(1))
    assert params["base"] is bp  # the pretrained base is used as is, never copied
    ids = {"input_ids": _ids()}
    np.testing.assert_array_equal(_logits(lora, params, ids),
                                  _logits(model, bp, ids))  # B = 0: exactly the base
    q = params["lora"]["model"]["layers_0"]["self_attn"]["q_proj"]
    assert q["lora_A"].shape == (32, 4) and q["lora_B"].shape == (4, 4, 8)
    bound = 1 / math.sqrt(32)  # kaiming_uniform(a=sqrt 5) on A [r, in]: U(-1/sqrt(in), 1/sqrt(in))
    a = np.asarray(q["lora_A"])
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.8 * bound and not np.any(np.asarray(q["lora_B"]))
    o = params["lora"]["model"]["layers_0"]["self_attn"]["o_proj"]
    assert o["lora_A"].shape == (4, 8, 4) and o["lora_B"].shape == (4, 32)  # o_proj input is (heads, head_dim)


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.DenseGeneral(32, axis=(-2, -1), use_bias=False, name="o_proj")(x)


class _OneLayer:
    """A minimal Model-like object: one o_proj-shaped DenseGeneral ([heads=4, head_dim=8] -> 32)."""

    config = types.SimpleNamespace(model_type="toy")
    task = "toy"

    def _dummy_inputs(self):
        return {"x": jnp.zeros((1, 4, 8))}

    def init(self, rng):
        return _Block().init(rng, jnp.zeros((1, 4, 8)))["params"]

    def abstract_params(self):
        return jax.eval_shape(self.init, jax.random.key(0))

    def logical_axes(self):
        return {"o_proj": {"kernel": P("heads", "head_dim", "embed")}}

    def apply(self, params, batch, *, rng=None, train=False):
        return {"logits": _Block().apply({"params": params}, batch["x"])}


@pytest.mark.parametrize("rslora", [False, True])
def test_adapted_layer_matches_float64_reference(rslora):
    """A two-input-axis DenseGeneral against numpy float64: y = x W^T + s x A^T B^T in PEFT's layout."""
    model = _OneLayer()
    lora = apply_lora(model, LoraConfig(r=4, lora_alpha=6, use_rslora=rslora, init_lora_weights=False,
                                        target_modules=["o_proj"]))
    params = lora.init_from_base(model.init(jax.random.key(0)), jax.random.key(2))
    scale = 6 / (math.sqrt(4) if rslora else 4)
    assert lora.lora_config.scaling == pytest.approx(scale)
    assert lora.targets[0].in_axes == ("heads", "head_dim") and lora.targets[0].out_axes == ("embed",)
    x = np.random.default_rng(0).normal(size=(3, 4, 8)).astype(np.float32)
    w = np.asarray(params["base"]["o_proj"]["kernel"], np.float64).reshape(32, 32)
    a = np.asarray(params["lora"]["o_proj"]["lora_A"], np.float64).reshape(32, 4).T  # PEFT's A [r, in]
    b = np.asarray(params["lora"]["o_proj"]["lora_B"], np.float64).T  # PEFT's B [out, r]
    xf = x.reshape(3, 32).astype(np.float64)
    ref = xf @ w + scale * xf @ a.T @ b.T
    assert np.abs(scale * xf @ a.T @ b.T).max() > 0.1  # the LoRA term is not negligible
    # float32 matmuls of 32-term sums vs float64: ~1e-6 relative on values of size ~1
    np.testing.assert_allclose(_logits(lora, params, {"x": x}), ref, atol=1e-5)
    merged = np.asarray(lora.merge(params)["o_proj"]["kernel"], np.float64).reshape(32, 32)
    np.testing.assert_allclose(xf @ merged, ref, atol=1e-5)  # float32 storage of W + s B A


def test_merge_and_unmerge(base):
    model, bp = base
    lora = _lora(model, init_lora_weights=False, bias="all")
    params = lora.init_from_base(bp, jax.random.key(3))
    batch = {"input_ids": _ids(1)}
    adapted = _logits(lora, params, batch)
    merged = lora.merge(params)
    assert jax.tree.structure(merged) == jax.tree.structure(bp)
    np.testing.assert_allclose(_logits(model, merged, batch), adapted, atol=SAME_MATH_ATOL)
    assert np.abs(adapted - _logits(model, bp, batch)).max() > 1e-2
    back = lora.unmerge(merged, params)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(bp)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)  # W + d - d in float32


def test_dropout_only_in_training_and_only_on_the_lora_input(base):
    model, bp = base
    lora = _lora(model, lora_dropout=0.5, init_lora_weights=False, target_modules=["q_proj"])
    params = lora.init_from_base(bp, jax.random.key(4))
    batch, rng = {"input_ids": _ids(2)}, jax.random.key(5)
    evaluated = _logits(lora, params, batch)
    np.testing.assert_array_equal(_logits(lora, params, batch, rng=rng, train=False), evaluated)
    trained = _logits(lora, params, batch, rng=rng, train=True)
    assert np.abs(trained - evaluated).max() > 1e-3
    # with B = 0 the LoRA branch is zero, so dropout (on its input only) leaves the base output intact
    fresh = _lora(model, lora_dropout=0.5, target_modules=["q_proj"])
    zero_b = fresh.init_from_base(bp, jax.random.key(4))
    np.testing.assert_array_equal(_logits(fresh, zero_b, batch, rng=rng, train=True),
                                  _logits(model, bp, batch))


def test_what_trains_follows_bias_and_modules_to_save():
    model = create_model("llama", {**TINY_LLAMA, "attention_bias": True})
    paths = leaf_paths(model.abstract_params())

    def trainable(**kw):
        lora = apply_lora(model, LoraConfig(r=2, target_modules=["q_proj"], **kw))
        return {"/".join(p) for p in paths if lora.is_trainable(("base",) + p)}

    assert trainable() == set()
    assert trainable(bias="lora_only") == {f"model/layers_{i}/self_attn/q_proj/bias" for i in range(2)}
    assert len(trainable(bias="all")) == 8  # q, k, v, o biases of 2 layers
    assert trainable(modules_to_save=["embed_tokens"]) == {"model/embed_tokens/embedding"}
    lora = apply_lora(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert lora.is_trainable(("lora", "model", "layers_0", "self_attn", "q_proj", "lora_A"))
    # sequence classification: the head trains in full, a nested head (RoBERTa's) as a whole, as PEFT's SEQ_CLS
    roberta = create_model("roberta", {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1,
                                       "num_attention_heads": 4, "intermediate_size": 64, "num_labels": 3},
                           "sequence_classification")
    lora = apply_lora(roberta, LoraConfig(r=2))
    assert lora.modules_to_save == ("classifier",)
    assert {"/".join(p) for p in leaf_paths(roberta.abstract_params()) if lora.is_trainable(("base",) + p)} == {
        f"classifier/{m}/{leaf}" for m in ("dense", "out_proj") for leaf in ("kernel", "bias")}


def test_regex_and_default_targets_follow_peft(base):
    model, _ = base
    names = [t.name for t in apply_lora(model, LoraConfig(r=2, target_modules=r".*layers\.1\.self_attn\.(q|v)_proj"))
             .targets]
    assert names == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    defaults = {t.name.rsplit(".", 1)[-1] for t in apply_lora(model, LoraConfig(r=2)).targets}
    assert defaults == {"q_proj", "v_proj"}  # PEFT's default for llama
    # a list entry matches whole trailing components only: "proj" is no module name
    with pytest.raises(ConfigError, match=r"matches no Dense layer.*q_proj"):
        apply_lora(model, LoraConfig(r=2, target_modules=["proj"]))


def test_bad_input_names_the_problem(base):
    model, _ = base
    with pytest.raises(ConfigError, match=r"peft.r=40 is larger than module `model.layers.0.self_attn.k_proj`"):
        apply_lora(model, LoraConfig(r=40, target_modules=["k_proj"]))
    with pytest.raises(ConfigError, match="bias must be one of"):
        LoraConfig(bias="some")
    with pytest.raises(ConfigError, match=r"lora_aplha \(did you mean lora_alpha\?\)"):
        LoraConfig.from_dict({"r": 4, "lora_aplha": 8})
    with pytest.raises(ConfigError, match="modules_to_save"):
        apply_lora(model, LoraConfig(r=2, modules_to_save=["classifier_head"]))
    # one stacked kernel serves every layer of a scanned model: a target in some layers only is refused
    with pytest.raises(ConfigError, match=r"selects `model.layers.0.self_attn.q_proj` but not "
                                          r"`model.layers.1.self_attn.q_proj`; with scan_layers"):
        apply_lora(tiny_llama(scan_layers=True), LoraConfig(r=2, target_modules=r"model\.layers\.0\.self_attn\.q_proj"))
    with pytest.raises(ConfigError, match="cannot switch scan_layers on a LoRA model"):
        apply_lora(tiny_llama(), LoraConfig(r=2)).with_options(scan_layers=True)


@dataclasses.dataclass(frozen=True)
class _Bf16Kernels:
    """A Model-like wrapper that stores kernels in bfloat16 and widens them inside apply (the shape of
    a quantised-base wrapper): LoRA must adapt it without knowing its internals."""

    inner: object

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def init(self, rng):
        return jax.tree.map(lambda x: x.astype(jnp.bfloat16), self.inner.init(rng))

    def abstract_params(self):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), self.inner.abstract_params())

    def apply(self, params, batch, *, rng=None, train=False):
        return self.inner.apply(jax.tree.map(lambda x: x.astype(jnp.float32), params), batch, rng=rng, train=train)


def test_wraps_any_model_like_object(base):
    model, bp = base
    wrapped = _Bf16Kernels(model)
    lora = _lora(wrapped, init_lora_weights=False)
    params = lora.init_from_base(jax.tree.map(lambda x: x.astype(jnp.bfloat16), bp), jax.random.key(6))
    batch = {"input_ids": _ids(3)}
    plain = _lora(model, init_lora_weights=False)
    ref = _logits(plain, {"base": jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), bp),
                          "lora": params["lora"]}, batch)
    np.testing.assert_allclose(_logits(lora, params, batch), ref, atol=SAME_MATH_ATOL)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_training_updates_only_adapters_and_shards_them_like_the_base(base, use_dora):
    """fsdp=4 x tensor=2 on 8 fake devices: adapter specs follow the base kernel's; the sharded run
    matches a single-device run; the base is bitwise unchanged and has no optimizer state. With DoRA
    the magnitudes shard like the kernel's outputs and its norm reduces over the fsdp-split inputs."""
    model, bp = base
    lora = _lora(model, lora_alpha=16, target_modules=ALL_ATTN, use_dora=use_dora)
    tx = optax.adamw(1e-2)
    params = lora.init_from_base(bp, jax.random.key(7))
    batches = [{k: v.reshape(1, *v.shape) for k, v in lm_rows(8, 16, seed=s).items()} for s in range(2)]

    def run(mesh):
        steps = build_compiled_steps(lora, mesh, tx, 1e-2, causal_lm_loss, seed=0)
        state = steps.init_state(params)
        losses = []
        for b in batches:
            state, m = steps.train_step(state, steps.place_train_batch(b))
            losses.append(float(m["loss"]))
        return steps, state, losses

    steps, state, losses = run(make_mesh({"data": 1, "fsdp": 4, "tensor": 2}))
    sh = steps.param_sharding
    q_kernel = sh["base"]["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"].spec
    q = sh["lora"]["model"]["layers_0"]["self_attn"]["q_proj"]
    o = sh["lora"]["model"]["layers_0"]["self_attn"]["o_proj"]
    assert tuple(q_kernel) == ("fsdp", "tensor", None)
    assert tuple(q["lora_A"].spec) == ("fsdp", None) and tuple(q["lora_B"].spec) == (None, "tensor", None)
    assert tuple(o["lora_A"].spec) == ("tensor", None, None) and tuple(o["lora_B"].spec) == (None, "fsdp")
    if use_dora:
        assert tuple(q["lora_magnitude_vector"].spec) == ("tensor", None)
        assert tuple(o["lora_magnitude_vector"].spec) == ("fsdp",)
    assert {p[0] for p in leaf_paths(state.params)} == {"lora"}
    assert leaf_paths(state.frozen) and all(p[0] == "base" for p in leaf_paths(state.frozen))
    for x, y in zip(jax.tree.leaves(state.frozen), jax.tree.leaves({"base": bp})):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert losses[-1] < losses[0]
    _, single, single_losses = run(make_mesh({"data": 1}))
    # sharded vs one device: same float32 math with reordered reductions over 2 steps; 1e-5 abs
    np.testing.assert_allclose(losses, single_losses, atol=1e-5)
    for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(single.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


def _opt_bytes(model, tx) -> int:
    steps = build_compiled_steps(model, make_mesh({"data": 1}), tx, 1e-3, causal_lm_loss, seed=0)
    state = jax.eval_shape(steps.init_state)
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.opt_state))


def test_optimizer_state_is_under_two_percent_of_full_fine_tuning():
    """The quickstart model (configs/quickstart.yaml) with r=8 on the attention projections PEFT adapts
    by default (q_proj, v_proj); AdamW, as the Trainer's default."""
    here = os.path.dirname(__file__)
    with open(os.path.join(here, "..", "configs", "quickstart.yaml")) as fh:
        cfg = yaml.safe_load(fh)
    model = create_model("llama", {**cfg["model"]["config"], "vocab_size": cfg["tokenizer"]["vocab_size"]})
    tx = optax.adamw(1e-3)
    full = _opt_bytes(model, tx)
    lora = _opt_bytes(apply_lora(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])), tx)
    print(f"\noptimizer state: full fine-tuning {full} bytes, LoRA r=8 on q_proj/v_proj {lora} bytes "
          f"({100 * lora / full:.2f}%)")
    assert lora < 0.02 * full


def test_lora_on_a_quantised_base_trains_only_the_adapters(base):
    """QLoRA's shape: apply_lora wraps jtrain.quant's QuantizedModel (int8 kernels dequantised inside
    apply); the adapters still take the float kernel's logical axes and only they change."""
    from jtrain.quant.model import QuantizedModel

    model, bp = base
    qmodel = QuantizedModel(model, "int8", targets=["q_proj", "v_proj"])
    lora = _lora(qmodel, target_modules=["q_proj", "v_proj"])
    assert lora.targets[0].in_axes == ("embed",) and lora.targets[0].out_axes == ("heads", "head_dim")
    steps = build_compiled_steps(lora, make_mesh({"data": 1}), optax.adamw(1e-2), 1e-2, causal_lm_loss, seed=0)
    state = steps.init_state(lora.init_from_base(qmodel.quantize_params(bp), jax.random.key(8)))
    frozen = jax.tree.map(np.asarray, state.frozen)
    batch = steps.place_train_batch({k: v[None] for k, v in lm_rows(8, 16, seed=4).items()})
    losses = []
    for _ in range(3):
        state, metrics = steps.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] and {p[0] for p in leaf_paths(state.params)} == {"lora"}
    for x, y in zip(jax.tree.leaves(state.frozen), jax.tree.leaves(frozen)):
        np.testing.assert_array_equal(np.asarray(x), y)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_lora_on_scanned_layers_matches_the_unscanned_model(tmp_path, use_dora):
    """scan_layers stacks each target's factors [layers, ...] beside its stacked kernel. From the same
    base and rng, the scanned LoRA model draws the same adapters (stacked), computes the same logits
    and adapter gradients (SAME_MATH_ATOL: the scan only reorders float32 sums), merges to the same
    kernels, and writes the same PEFT file (per-layer names), which loads back stacked. With DoRA the
    magnitudes (one [layers, *out] stack) follow the same way."""
    from jtrain.models import from_pretrained, save_pretrained
    from jtrain.peft.peft_io import adapter_state_dict, load_adapter, save_adapter

    base = tiny_llama()
    save_pretrained(base, base.init(jax.random.key(0)), tmp_path / "base")
    flat_model, flat_base = from_pretrained(tmp_path / "base")
    scan_model, scan_base = from_pretrained(tmp_path / "base", scan_layers=True)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
                        use_dora=use_dora)
    flat, scan = apply_lora(flat_model, config), apply_lora(scan_model, config)
    assert flat.module_count == scan.module_count == 6 and len(scan.targets) == 3
    assert all(t.layers == 2 for t in scan.targets)
    assert scan.logical_axes()["lora"]["model"]["layers"]["layer"]["mlp"]["down_proj"]["lora_A"] == \
        P("layers", "mlp", "lora_rank")
    p_flat = flat.init_from_base(flat_base, jax.random.key(1))
    p_scan = scan.init_from_base(scan_base, jax.random.key(1))

    def pair(flat_tree, scan_tree, i, *path):  # leaf `path` of unscanned layer i, and slice i of the stack
        a, b = flat_tree["model"][f"layers_{i}"], scan_tree["model"]["layers"]["layer"]
        for key in path:
            a, b = a[key], b[key]
        return a, b[i]

    for i in range(2):
        np.testing.assert_array_equal(*pair(p_flat["lora"], p_scan["lora"], i, "self_attn", "q_proj", "lora_B"))
    batch = {k: v[:4] for k, v in lm_rows(4, 16, seed=0).items()}
    adapted = _logits(flat, p_flat, batch)
    assert np.abs(adapted - _logits(flat_model, flat_base, batch)).max() > 1e-2  # the adapters act
    np.testing.assert_allclose(_logits(scan, p_scan, batch), adapted, atol=SAME_MATH_ATOL)

    def grads(model, params):
        loss = lambda lora: causal_lm_loss(model.apply({"base": params["base"], "lora": lora}, batch), batch).loss_sum
        return jax.jit(jax.grad(loss))(params["lora"])  # jitted: op-by-op dispatch is far slower

    g_flat, g_scan = grads(flat, p_flat), grads(scan, p_scan)
    m_flat, m_scan = flat.merge(p_flat), scan.merge(p_scan)
    for i in range(2):
        paths = (("self_attn", "v_proj", "lora_A"), ("mlp", "down_proj", "lora_B"))
        for path in paths + ((("mlp", "down_proj", "lora_magnitude_vector"),) if use_dora else ()):
            np.testing.assert_allclose(*pair(g_flat, g_scan, i, *path), atol=SAME_MATH_ATOL)
        np.testing.assert_allclose(*pair(m_flat, m_scan, i, "mlp", "down_proj", "kernel"), atol=SAME_MATH_ATOL)

    exported = adapter_state_dict(scan, p_scan)
    reference = adapter_state_dict(flat, p_flat)
    assert sorted(exported) == sorted(reference)
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight" in exported
    # Factors are drawn identically; DoRA's initial magnitudes are norms computed per layer or vmapped
    # over the stack, whose float32 sums may differ in the last bit (1 ulp: rtol 2.4e-7).
    same = lambda got, want, name: (np.testing.assert_allclose(got, want, rtol=2.4e-7, err_msg=name)
                                    if "magnitude" in name else np.testing.assert_array_equal(got, want, err_msg=name))
    for name, tensor in reference.items():
        same(exported[name], tensor, name)
    save_adapter(flat, p_flat, tmp_path / "adapter")
    loaded, p_loaded = load_adapter(scan_model, scan_base, tmp_path / "adapter")
    loaded_leaves = jax.tree_util.tree_leaves_with_path(p_loaded["lora"])
    for (path, got), want in zip(loaded_leaves, jax.tree.leaves(p_scan["lora"])):
        same(got, want, jax.tree_util.keystr(path))


def test_lora_dropout_on_scanned_layers_follows_the_rng():
    model = apply_lora(tiny_llama(scan_layers=True), LoraConfig(r=4, lora_dropout=0.5, init_lora_weights=False))
    params = model.init(jax.random.key(0))
    batch = {k: v[:2] for k, v in lm_rows(2, 16, seed=0).items()}
    apply = jax.jit(model.apply, static_argnames="train")
    evaluation = apply(params, batch)["logits"]
    np.testing.assert_array_equal(apply(params, batch, train=True)["logits"], evaluation)  # no rng: no dropout
    one = apply(params, batch, rng=jax.random.key(1), train=True)["logits"]
    np.testing.assert_array_equal(one, apply(params, batch, rng=jax.random.key(1), train=True)["logits"])
    assert not np.allclose(one, evaluation)
    assert not np.allclose(one, apply(params, batch, rng=jax.random.key(2), train=True)["logits"])
