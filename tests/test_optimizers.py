"""make_optimizer's contract: names, optim_args, clipping, masked lr-scaled decay, errors."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jtrain.optim import OPTIMIZER_NAMES, decay_mask, make_optimizer, schedule_free_eval_params
from jtrain.optim.muon import muon_dimension_numbers

PARAMS = {
    "model": {
        "embed_tokens": {"embedding": jnp.ones((32, 8))},
        "layers_0": {
            "mlp": {"up_proj": {"kernel": jnp.ones((8, 16)), "bias": jnp.ones(16)}},
            "norm": {"scale": jnp.ones(8)},
        },
    },
    "lm_head": {"kernel": jnp.ones((8, 32))},
}
LOW_RANK_KW = dict(optim_target_modules="all-linear", optim_args={"rank": 4})


def _kwargs(name: str) -> dict:
    from jtrain.optim.factory import LOW_RANK_OPTIMIZERS

    return LOW_RANK_KW if name in LOW_RANK_OPTIMIZERS else {}


def test_required_names_present() -> None:
    required = {
        "adamw_torch", "adamw_torch_fused", "adamw", "adamw_bf16", "adamw_anyprecision", "adafactor",
        "lion", "lion_32bit", "lion_8bit", "sgd", "rmsprop", "schedule_free_adamw", "muon", "adamw_8bit",
        "galore_adamw", "apollo_adamw",
    }
    assert required <= set(OPTIMIZER_NAMES)


# One name per builder (aliases share one, see test_optim_train.py).
_DISTINCT = tuple(n for n in OPTIMIZER_NAMES if n not in ("adamw_torch_fused", "adamw", "adamw_bnb_8bit",
                                                        "adamw_torch_8bit", "lion_32bit", "paged_adamw_32bit",
                                                        "paged_adamw_8bit", "paged_lion_32bit", "paged_lion_8bit",
                                                        "adamw_torch_xla", "adamw_torch_npu_fused",
                                                        "paged_ademamix_32bit", "paged_ademamix_8bit",
                                                        "rmsprop_bnb_32bit"))


@pytest.mark.parametrize("name", _DISTINCT)
def test_abstract_init_and_jitted_update(name: str) -> None:
    """Abstract first: state shapes come from eval_shape; the update lowers under jit."""
    opt = make_optimizer(name, 1e-3, weight_decay=0.1, **_kwargs(name))
    abstract = jax.eval_shape(opt.init, PARAMS)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))
    jax.jit(opt.update, donate_argnums=1).lower(PARAMS, abstract, PARAMS)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="adamw_torch.*galore_adamw"):
        make_optimizer("adamw_typo", 1e-3)


def test_every_hf_optim_name_is_built_or_refused_with_its_reason_when_the_arguments_are_built(tmp_path) -> None:
    """HF checks `optim` against its names when TrainingArguments is built; jtrain accepted any string
    then and failed at train() with "unknown optimizer" for HF's own names too. Every HF name is now
    either built or refused at construction with why; a typo gets the closest name."""
    from transformers.training_args import OptimizerNames

    from jtrain import TrainingArguments
    from jtrain.errors import ConfigError
    from jtrain.optim.factory import HF_ONLY_OPTIMIZERS

    hf = {n.value for n in OptimizerNames}
    assert hf <= set(OPTIMIZER_NAMES) | set(HF_ONLY_OPTIMIZERS) and not set(OPTIMIZER_NAMES) & set(HF_ONLY_OPTIMIZERS)
    assert set(HF_ONLY_OPTIMIZERS) <= hf  # the table names only HF's
    for name in sorted(hf & set(OPTIMIZER_NAMES)):
        assert TrainingArguments(str(tmp_path), optim=name).optim == name
    with pytest.raises(ConfigError, match=r"optim 'lomo' is one of HF's optimizers that jtrain does not build \(LOMO"):
        TrainingArguments(str(tmp_path), optim="lomo")
    with pytest.raises(ConfigError, match=r"unknown optim 'adamx' \(did you mean `adamw`\?\)"):
        TrainingArguments(str(tmp_path), optim="adamx")


@pytest.mark.parametrize("optim_args", ["momentum=0.9,nesterovv=True", {"momentum": 0.9, "nesterovv": True}])
def test_unknown_optim_args_key_is_named(optim_args) -> None:
    with pytest.raises(ValueError, match="'nesterovv'.*did you mean 'nesterov'"):
        make_optimizer("sgd", 1e-3, optim_args=optim_args)


def test_optim_args_errors() -> None:
    with pytest.raises(ValueError, match="key=value"):
        make_optimizer("sgd", 1e-3, optim_args="momentum")
    with pytest.raises(ValueError):
        make_optimizer("sgd", 1e-3, optim_args="momentum=fast")
    with pytest.raises(ValueError, match="boolean"):
        make_optimizer("sgd", 1e-3, optim_args="momentum=0.9,nesterov=maybe")
    with pytest.raises(ValueError, match="unknown optim_args key 'rank'"):
        make_optimizer("adamw_torch", 1e-3, optim_args="rank=4")  # AdamW takes no optim_args


def test_hf_string_and_dict_optim_args_agree() -> None:
    from jtrain.optim.args import resolve_optim_args
    from jtrain.optim.builders import ADAFACTOR_ARGS, SGD_ARGS

    from_str = resolve_optim_args("sgd", "momentum = 0.9, nesterov = true", SGD_ARGS)
    from_dict = resolve_optim_args("sgd", {"momentum": 0.9, "nesterov": True}, SGD_ARGS)
    assert from_str == from_dict == {"momentum": 0.9, "dampening": 0.0, "nesterov": True}
    assert resolve_optim_args("adafactor", "beta1=None", ADAFACTOR_ARGS)["beta1"] is None
    assert resolve_optim_args("adafactor", "beta1=0.9", ADAFACTOR_ARGS)["beta1"] == 0.9


@pytest.mark.parametrize("max_grad_norm", [None, 0.0, -1.0])
def test_clipping_disabled(max_grad_norm) -> None:
    grads = jax.tree.map(lambda p: 10.0 * p, PARAMS)
    opt = make_optimizer("sgd", 1.0, max_grad_norm=max_grad_norm)
    updates, _ = jax.jit(opt.update)(grads, opt.init(PARAMS), PARAMS)
    jax.tree.map(lambda u, g: np.testing.assert_array_equal(u, -g), updates, grads)


def test_clipping_uses_torch_formula() -> None:
    grads = jax.tree.map(lambda p: 10.0 * p, PARAMS)
    norm = float(optax.tree.norm(grads))
    opt = make_optimizer("sgd", 1.0, max_grad_norm=1.0)
    updates, _ = jax.jit(opt.update)(grads, opt.init(PARAMS), PARAMS)
    # torch: g * max_norm / (norm + 1e-6); float32 products -> 1 ulp of relative error.
    jax.tree.map(lambda u, g: np.testing.assert_allclose(u, -g / (norm + 1e-6), rtol=2e-7), updates, grads)


def test_clipping_takes_the_steps_norm() -> None:
    """The train step passes its own norm of the gradients (`grad_norm`) so the clip skips a second
    reduction: the clip must use it (shown with a deliberately different value), give the same
    updates as recomputing when it is the true norm, and reach the clip through the ZeRO-2 wrapper."""
    from jtrain.compiled import constrain_gradients
    from jtrain.optim.transforms import global_norm_f32

    grads = jax.tree.map(lambda p: 10.0 * p, PARAMS)
    opt = make_optimizer("sgd", 1.0, max_grad_norm=1.0)
    state = opt.init(PARAMS)
    recomputed, _ = jax.jit(opt.update)(grads, state, PARAMS)
    given, _ = jax.jit(lambda g, s, p: opt.update(g, s, p, grad_norm=global_norm_f32(g)))(grads, state, PARAMS)
    jax.tree.map(np.testing.assert_array_equal, given, recomputed)
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    wrapped = constrain_gradients(opt, jax.tree.map(lambda _: one_device, PARAMS))
    forced, _ = jax.jit(lambda g, s, p: wrapped.update(g, s, p, grad_norm=jnp.float32(4.0)))(grads, state, PARAMS)
    # 4.0 stands in for the norm: coefficient 1 / (4 + 1e-6), float32 products -> 1 ulp.
    jax.tree.map(lambda u, g: np.testing.assert_allclose(u, -g / (4.0 + 1e-6), rtol=2e-7), forced, grads)


@pytest.mark.parametrize(
    "name",
    ["adamw_torch", "adamw_8bit", "adamw_bf16", "lion", "muon", "adafactor", "sgd"],
)
def test_decay_is_masked_and_follows_the_schedule(name: str) -> None:
    """torch semantics p -= lr(t) * wd * p: with zero grads every direction is 0 and the
    update is exactly the masked, lr-scheduled decay (SGD's coupled L2 coincides here)."""
    schedule = optax.linear_schedule(1.0, 0.25, transition_steps=3)
    opt = make_optimizer(name, schedule, weight_decay=0.1, **_kwargs(name))
    zeros = jax.tree.map(jnp.zeros_like, PARAMS)
    mask = decay_mask(PARAMS)
    state, update = opt.init(PARAMS), jax.jit(opt.update)
    for step in range(3):
        updates, state = update(zeros, state, PARAMS)
        lr = float(schedule(step))
        expected = jax.tree.map(lambda p, m: -lr * 0.1 * p if m else jnp.zeros_like(p), PARAMS, mask)
        # exact up to float32 rounding of lr * wd * p with p = 1
        jax.tree.map(lambda u, e: np.testing.assert_allclose(u, e, rtol=1e-6, atol=0), updates, expected)


def test_low_rank_optimizers_decay_as_hf_builds_them_and_say_so(caplog) -> None:
    """HF's Trainer builds galore_torch's / apollo_torch's optimizers with the learning rate only, leaving the
    packages' weight decay: none, except galore_torch's 8-bit AdamW (bitsandbytes' 0.01, on every parameter;
    GaLore's AdamWs also keep their betas and eps). jtrain does the same, and the warning names what was set
    and not applied (tests/test_optim_hf_model_parity.py: the same numbers as the packages)."""
    zeros = jax.tree.map(jnp.zeros_like, PARAMS)
    for name, said, decay in (("galore_adamw", "weight_decay=0.1, adam_epsilon=1e-06", 0.0),
                              ("galore_adamw_8bit", "weight_decay=0.1, adam_epsilon=1e-06", 0.01),
                              ("galore_adafactor", "weight_decay=0.1", 0.0),
                              ("apollo_adamw", "weight_decay=0.1", 0.0)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="jtrain.optim.low_rank_builders"):
            opt = make_optimizer(name, 1.0, weight_decay=0.1, adam_epsilon=1e-6, **_kwargs(name))
        updates, _ = jax.jit(opt.update)(zeros, opt.init(PARAMS), PARAMS)
        # params are ones and the learning rate 1: each update is -decay, exactly
        assert all(np.array_equal(u, np.full(u.shape, -decay, np.float32)) for u in jax.tree.leaves(updates)), name
        assert f"{name}: {said} not applied: HF's Trainer builds" in caplog.text


def test_layerwise_names_are_their_optimizer_unclipped_as_hfs(caplog) -> None:
    """HF's layer-wise GaLore/APOLLO step each parameter in torch's backward hooks; the Trainer's clipping then
    finds no gradients. jtrain builds the same optimizer without clipping, says so, and refuses gradient
    accumulation at construction as HF refuses it at train()."""
    from jtrain import TrainingArguments
    from jtrain.errors import ConfigError

    grads = jax.tree.map(lambda p: 10.0 * jnp.ones_like(p), PARAMS)  # global norm far above 1
    run = lambda opt: jax.jit(opt.update)(grads, opt.init(PARAMS), PARAMS)[0]  # noqa: E731
    with caplog.at_level("WARNING", logger="jtrain.optim.factory"):
        layerwise = run(make_optimizer("galore_adamw_layerwise", 1e-3, max_grad_norm=1.0, **LOW_RANK_KW))
    assert "galore_adamw_layerwise: max_grad_norm=1.0 not applied" in caplog.text
    unclipped = run(make_optimizer("galore_adamw", 1e-3, max_grad_norm=0, **LOW_RANK_KW))
    clipped = run(make_optimizer("galore_adamw", 1e-3, max_grad_norm=1.0, **LOW_RANK_KW))
    jax.tree.map(np.testing.assert_array_equal, layerwise, unclipped)
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(layerwise), jax.tree.leaves(clipped)))
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=1, or use 'galore_adafactor'"):
        TrainingArguments(output_dir="unused", optim="galore_adafactor_layerwise", gradient_accumulation_steps=2)


def test_low_rank_optimizers_need_targets() -> None:
    for name in ("galore_adamw", "galore_adamw_8bit", "galore_adafactor", "apollo_adamw"):
        with pytest.raises(ValueError, match="optim_target_modules"):
            make_optimizer(name, 1e-3).init(PARAMS)
        with pytest.raises(ValueError, match="No target modules"):
            make_optimizer(name, 1e-3, optim_target_modules=["v_proj"]).init(PARAMS)
    with pytest.raises(ValueError, match="proj_type"):
        make_optimizer("galore_adamw", 1e-3, optim_target_modules="all-linear", optim_args="proj_type=diagonal")
    with pytest.raises(ValueError, match="scale_type"):
        make_optimizer("apollo_adamw", 1e-3, optim_target_modules="all-linear", optim_args="scale_type=row")
    with pytest.raises(ValueError, match="proj='random'"):
        make_optimizer("apollo_adamw", 1e-3, optim_target_modules="all-linear", optim_args="proj=svd")


def test_target_matching_follows_hf() -> None:
    from jtrain.optim.targets import LOW_RANK, low_rank_labels

    by_regex = low_rank_labels(PARAMS, r".*mlp\.up_proj", "galore_adamw")
    by_list = low_rank_labels(PARAMS, ["up_proj"], "galore_adamw")
    assert by_regex == by_list
    assert by_list["model"]["layers_0"]["mlp"]["up_proj"] == {"kernel": LOW_RANK, "bias": "full"}
    every = low_rank_labels(PARAMS, "all_linear", "galore_adamw")
    assert every["lm_head"]["kernel"] == LOW_RANK and every["model"]["embed_tokens"]["embedding"] == "full"


def test_a_selected_kernel_that_is_not_2d_is_named_in_a_warning(caplog) -> None:
    """Without the model's layout a 3-D kernel cannot be read as a matrix: it gets plain Adam, and the
    warning says so, once per set of modules."""
    from jtrain.optim.targets import low_rank_labels

    params = {**PARAMS, "attn": {"q_proj": {"kernel": jnp.ones((8, 2, 4))}}}
    with caplog.at_level("WARNING", logger="jtrain.optim.targets"):
        for _ in range(2):  # labels are computed at init and again when the update is traced
            labels = low_rank_labels(params, ["q_proj", "up_proj"], "galore_adamw")
    assert labels["attn"]["q_proj"]["kernel"] == "full"
    assert len(caplog.records) == 1
    assert caplog.records[0].getMessage().startswith(
        "galore_adamw: optim_target_modules selects 1 kernel(s) that are not 2-D, which get plain Adam (pass "
        "make_optimizer the model's param_layout")
    with pytest.raises(ValueError, match=r"selected but not: attn\.q_proj"):
        low_rank_labels(params, ["q_proj"], "apollo_adamw")


@pytest.mark.parametrize("model_type, options", [("llama", {}), ("llama", {"scan_layers": True}), ("gpt2", {}),
                                                 ("mixtral", {})])
def test_with_the_models_layout_hfs_linear_weights_are_selected_by_hfs_names(model_type, options, caplog) -> None:
    """The Trainer's layout: head-shaped and scanned kernels qualify (as HF's q_proj/o_proj Linear weights),
    names are HF's (`layers.0`, not `layers_0`), and what is not an nn.Linear in transformers 5 (GPT-2's Conv1D,
    Mixtral's router and stacked experts) gets plain Adam with HF's warning (checked against HF's own module
    types for these configs)."""
    from jtrain.models import create_model
    from jtrain.models.hub import model_leaf_maps
    from jtrain.optim.paths import named_leaves
    from jtrain.optim.targets import LOW_RANK, kernel_layout, low_rank_labels

    tiny = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, n_embd=32, n_layer=2, n_head=4)
    model = create_model(model_type, tiny, **options)
    layout = kernel_layout(model_leaf_maps(model))
    params = model.abstract_params()
    if model_type == "gpt2":  # its only nn.Linear, lm_head, is tied to the embedding: nothing to project
        nothing = r"only HF nn.Linear weights qualify \(selected but not: transformer\.h\.0\.attn\.c_attn"
        with caplog.at_level("WARNING", logger="jtrain.optim.targets"), pytest.raises(ValueError, match=nothing):
            low_rank_labels(params, "all-linear", "galore_adamw", layout)
        assert "8 weight(s) that are not nn.Linear in HF" in caplog.text
        return
    with caplog.at_level("WARNING", logger="jtrain.optim.targets"):
        labels = dict(named_leaves(low_rank_labels(params, "all-linear", "galore_adamw", layout)))
    chosen = [name for name, label in labels.items() if label == LOW_RANK]
    assert {m for name in chosen for m in layout[name].modules} == _hf_linear_modules(model_type, tiny)
    assert any(".layer." in name for name in chosen) == bool(options.get("scan_layers"))
    assert ("not nn.Linear in HF" in caplog.text) == (model_type == "mixtral")  # its router and stacked experts
    one = r"model\.layers\.1\.self_attn\.q_proj"
    if options.get("scan_layers"):  # one stacked kernel holds layers 0 and 1
        with pytest.raises(ValueError, match="selects only some layers of the scanned kernel"):
            low_rank_labels(params, one, "galore_adamw", layout)
    else:
        labels = named_leaves(low_rank_labels(params, one, "galore_adamw", layout))
        assert [n for n, label in labels if label == LOW_RANK] == ["model.layers_1.self_attn.q_proj.kernel"]


def _hf_linear_modules(model_type: str, config: dict) -> set[str]:
    """The modules HF's GaLore/APOLLO set-up projects: nn.Linear modules whose weight is a parameter of its own."""
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(model_type, **config))
    own = {name for name, _ in hf.named_parameters()}
    return {n for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear) and f"{n}.weight" in own}


def test_adafactor_option_validation() -> None:
    with pytest.raises(ValueError, match="warmup_init"):
        make_optimizer("adafactor", 1e-3, optim_args="warmup_init=True")


def test_anyprecision_rejects_kahan() -> None:
    with pytest.raises(ValueError, match="use_kahan_summation"):
        make_optimizer("adamw_anyprecision", 1e-3, optim_args="use_kahan_summation=True")


def test_muon_groups() -> None:
    dims = muon_dimension_numbers(PARAMS)
    assert dims["model"]["layers_0"]["mlp"]["up_proj"]["kernel"] is not None  # hidden matrix
    assert dims["model"]["embed_tokens"]["embedding"] is None  # AdamW
    assert dims["lm_head"]["kernel"] is None  # AdamW
    assert dims["model"]["layers_0"]["norm"]["scale"] is None  # 1-D -> AdamW


def test_schedule_free_eval_params() -> None:
    grads = jax.tree.map(lambda p: 0.1 * p, PARAMS)
    plain = make_optimizer("adamw_torch", 1e-2)
    assert schedule_free_eval_params(plain.init(PARAMS), PARAMS) is PARAMS
    opt = make_optimizer("schedule_free_adamw", 1e-2, optim_args="warmup_steps=2")
    state, params = opt.init(PARAMS), PARAMS
    for _ in range(3):
        updates, state = jax.jit(opt.update)(grads, state, params)
        params = optax.apply_updates(params, updates)
    x = schedule_free_eval_params(state, params)
    assert jax.tree.structure(x) == jax.tree.structure(params)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), x, params)
    assert max(jax.tree.leaves(moved)) > 0  # x differs from the training point y


def test_bfloat16_params_keep_their_dtype() -> None:
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), PARAMS)
    for name in ("adamw_torch", "adamw_8bit", "adafactor", "galore_adamw"):
        opt = make_optimizer(name, 1e-3, weight_decay=0.1, **_kwargs(name))
        updates, _ = jax.eval_shape(opt.update, params, opt.init(params), params)
        assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates)), name
